"""Inpainting's blend on one sampling step: inside the fused pass, against the step then the blend's own passes.

A DDIM step (x in place, one eps operand) followed by the mask blend of pndm_fast/editing.py. Inside the fused
pass it reads x, eps, the mask and the two kept tensors and writes x: 6 tensors of traffic. As separate passes
(the step, then x *= mask, x += a K, x += s N) it moves 12. Buffers rotate through twice the last-level cache, as
a sampler's step reads them from memory; on CUDA each provider is also timed inside a CUDA graph, as the graph
backend runs it.

    python benchmarks/bench_blend.py [--quick | --smoke] [--out DIR] [--device cpu|cuda] [--doc PAGE|none]

--doc writes the table into its own marked section of PAGE (default docs/stochastic.md).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

import common
from pndm_fast.engine import blend_
from pndm_fast.ops import available_impls, bind

NAME = "blend"
IMAGE = (3, 32, 32)
BATCHES = {"full": {"cpu": [1, 16, 256, 1024], "cuda": [1, 64, 1024, 5461]},
           "quick": {"cpu": [1, 64, 1024], "cuda": [1, 64, 1024, 5461]}, "smoke": {"cpu": [1], "cuda": [1]}}
REPS = {"full": 15, "quick": 7, "smoke": 1}
STEP = (-2.1e-3, 0.047)  # x's weight - 1 and eps's weight: a DDIM step in the middle of a 50-step run
LEVEL = (0.62, 0.78)  # the blend's image and noise weights at that step's level
DOC = Path(__file__).resolve().parent.parent / "docs" / "stochastic.md"


def buffers(shape, device) -> tuple:
    """(x, eps, mask, (1 - mask) image, (1 - mask) noise): half the pixels kept."""
    mask = (torch.rand(shape, device=device) < 0.5).float()
    return (torch.randn(shape, device=device), torch.randn(shape, device=device), mask,
            (1 - mask) * torch.randn(shape, device=device), (1 - mask) * torch.randn(shape, device=device))


def providers(shape, device, impl: str) -> dict:
    """name -> one call of the step with its blend, on the next rotated buffer set."""
    sets = common.rotation(lambda: buffers(shape, device), 5 * 4 * torch.Size(shape).numel(), device)

    def separate(x, eps, mask, image, noise):
        step = bind(x, x, [eps], STEP, impl=impl)

        def run():
            step()
            blend_(x, mask, image, noise, *LEVEL)
        return run

    def fused(x, eps, mask, image, noise):
        return bind(x, x, [eps], STEP, blend=[mask, image, noise], blend_weights=LEVEL, impl=impl)

    return {name: itertools.cycle([make(*s) for s in sets]).__next__ for name, make in
            (("separate passes", separate), ("fused", fused))}


def run(args):
    device, mode = torch.device(args.device), common.mode(args)
    impl = available_impls(device)[0]
    rows = []
    for batch in BATCHES[mode][device.type]:
        shape = (batch, *IMAGE)
        found = providers(shape, device, impl)
        ways = {"eager": lambda call: common.measure(lambda: call()(), device, REPS[mode], warmup=3, batch=True)}
        if device.type == "cuda":
            ways["graphed"] = lambda call: common.graphed_timing(lambda: call()(), device, REPS[mode], calls=20)
        for way, timed in ways.items():
            timings = {name: timed(call) for name, call in found.items()}
            base = timings["separate passes"]
            for name, timing in timings.items():
                speedup = None if timing is base else common.speedup_text(*common.speedup(base, timing))
                rows.append({"bench": NAME, "batch": batch, "tensor_mb": torch.Size(shape).numel() * 4 / 2**20,
                             "impl": impl, "way": way, "provider": name, "us": timing.seconds * 1e6,
                             "us_spread": timing.spread * 1e6, "speedup": speedup})
    notes = [f"One DDIM step of {IMAGE} images with the mask blend, the fused op {impl!r}; us per step, two medians "
             "+- their distance; speedup against the separate passes of the same way."]
    if args.doc is not None and str(args.doc) != "none":
        table = common.markdown_table(rows, COLUMNS)
        flags = {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]}[mode] + ["--device", device.type]
        command = common.command_line("bench_blend.py", flags)
        common.write_marked_section(args.doc, "benchmarks/bench_blend.py",
                                    f"`{command}` ({common.device_name(device)}):\n\n{table}")
    return rows, [], notes


COLUMNS = [
    common.Column("batch", "batch"), common.Column("MB", "tensor_mb", "{:.3g}"), common.Column("way", "way"),
    common.Column("provider", "provider"), common.Column("us", "us", "{:.1f}"),
    common.Column("+-", "us_spread", "{:.1f}"), common.Column("speedup", "speedup"),
]


def add_arguments(parser) -> None:
    parser.add_argument("--doc", type=Path, default=DOC, help="the page its section goes to; 'none' for none")


def main(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    return common.main("bench_blend.py", __doc__, NAME, run, COLUMNS, argv, add_arguments)


if __name__ == "__main__":
    main()
