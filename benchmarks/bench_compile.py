"""torch.compile of the UNets on the machine at hand: what `--compile` gives over eager float32, per forward.

Variants, each a fresh copy of the same model: eager (the base), "compiled" (pndm_fast.compilation.compiled: what
--compile and sample(compile=True) do on this device), and on a CPU the alternatives it was chosen among:
regional compile without freezing, and channels_last. Compile time (the first call) is reported apart from the
steady state; the steady state is timed in back-to-back pairs (eager, variant), so a busy shared machine slows
both sides of each ratio alike, and the ratio's median and range over the pairs are reported.

    python benchmarks/bench_compile.py [--quick | --smoke] [--out DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

import common
from bench_e2e import T_FORWARD, load
from pndm_fast import load_config
from pndm_fast.compilation import RECOMPILE_LIMIT, compiled
from pndm_fast.runners.sample import image_shape

NAME = "compile"
CASES = {"full": [("ddim-cifar10", 16), ("digits", 64)], "quick": [("digits", 64)], "smoke": [("digits", 1)]}
PAIRS = {"full": 9, "quick": 7, "smoke": 1}


def variants(device: torch.device, mode: str) -> list[str]:
    if mode == "smoke" or device.type == "cuda":
        return ["compiled"]
    return ["compiled", "regional, no freezing", "compiled, channels_last"]


def build(model: torch.nn.Module, variant: str) -> tuple[torch.nn.Module, bool]:
    """A compiled copy of model for `variant`, and whether it takes channels_last input."""
    model = copy.deepcopy(model)
    channels_last = "channels_last" in variant
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if variant == "regional, no freezing":
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        for block in model.modules():
            if isinstance(block, model.compile_regions):
                block.compile(dynamic=False)
        return model, channels_last
    return compiled(model), channels_last


def run(args):
    device, mode = torch.device(args.device), common.mode(args)
    rows = []
    for name, batch in CASES[mode]:
        base, weights = load(name, device, "fp32")
        x = torch.randn((batch, *image_shape(load_config(name))), generator=torch.Generator().manual_seed(0)).to(device)
        t = torch.full((batch,), T_FORWARD, device=device)
        with torch.inference_mode():
            want = base(x, t)
            for variant in variants(device, mode):
                model, channels_last = build(base, variant)
                xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
                first_s, out = common.timed_first_call(lambda: model(xi, t), device)
                ratios, eager_s, variant_s = [], [], []
                for _ in range(PAIRS[mode]):
                    e = common.timed_first_call(lambda: base(x, t), device)[0]
                    c = common.timed_first_call(lambda: model(xi, t), device)[0]
                    ratios.append(e / c)
                    eager_s.append(e)
                    variant_s.append(c)
                rows.append({
                    "bench": NAME, "model": name, "weights": weights, "batch": batch, "variant": variant,
                    "compile_s": first_s, "eager_ms": statistics.median(eager_s) * 1e3,
                    "variant_ms": statistics.median(variant_s) * 1e3, "speedup": statistics.median(ratios),
                    "speedup_min": min(ratios), "speedup_max": max(ratios), "pairs": len(ratios),
                    "max_abs_diff": (out.float() - want.float()).abs().max().item(),
                })
    notes = ["speedup: eager ms / variant ms per back-to-back pair of forwards; median and [min, max] over the "
             "pairs. compile s: the variant's first forward (inductor's on-disk caches as found). max |diff|: "
             "largest difference to the eager output on the same input.",
             "compiled = pndm_fast.compilation.compiled, what --compile does (on a CPU: each UNet block compiled "
             "with inductor's freezing, weights folded and prepacked for oneDNN)."]
    return rows, [], notes


COLUMNS = [
    common.Column("model", "model"), common.Column("batch", "batch"), common.Column("variant", "variant"),
    common.Column("eager ms", "eager_ms", "{:.1f}"), common.Column("variant ms", "variant_ms", "{:.1f}"),
    common.Column("speedup", lambda r: f"{r['speedup']:.2f}x [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}]"),
    common.Column("pairs", "pairs"), common.Column("compile s", "compile_s", "{:.1f}"),
    common.Column("max abs diff", "max_abs_diff", "{:.1e}"),
]


def main(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    return common.main("bench_compile.py", __doc__, NAME, run, COLUMNS, argv)


if __name__ == "__main__":
    main()
