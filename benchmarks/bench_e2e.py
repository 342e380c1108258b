"""End to end: F-PNDM with the real DDIM UNets, images/s and latency per batch, against the model alone.

Two lower bounds per run, both its model calls times one forward of the same model variant at the same batch:
"bound" times that forward eagerly (on a launch-bound GPU host that is slower than a captured graph of the whole
loop), "graph bound" (CUDA) replays it from a CUDA graph, so no host time is left in it: the ratio to it is what
the sampler costs on top of the network at its fastest.

    python benchmarks/bench_e2e.py [--quick | --smoke] [--out DIR] [--device cpu|cuda] [--models NAME,...]
        [--variants NAME,...]

--models keeps some of the configured models (ddim-cifar10, digits), --variants some of the variants, so a short
GPU lease can run them one by one.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

import common
from pndm_fast import Schedule, build_model, build_plan, load_config, sample
from pndm_fast.runners.sample import DTYPES, image_shape, load_model, resolve_model_path
from pndm_fast.compilation import compiled

NAME = "e2e"
METHOD = "F-PNDM"
T_FORWARD = 500.0  # the time fed to the lone forward; the UNet's cost does not depend on it
# name -> (backend, torch.compile, model dtype, channels_last); graph is CUDA only.
VARIANTS = {
    "reference": ("reference", False, "fp32", False),
    "fused": ("fused", False, "fp32", False),
    "fused+compile": ("fused", True, "fp32", False),
    "graph+compile": ("graph", True, "fp32", False),
    "bf16": ("fused", False, "bf16", False),
    "graph+compile+cl": ("graph", True, "fp32", True),
    "graph+compile+bf16+cl": ("graph", True, "bf16", True),
}
GRAPH_VARIANTS = [name for name, (backend, *_) in VARIANTS.items() if backend == "graph"]
REPS = {"full": 5, "quick": 2, "smoke": 1}  # sampling runs per median


def configurations(device: torch.device, mode: str) -> tuple[list[tuple], list[str]]:
    """(model, batches, variants, sample_step) to run, and a note for each thing left out."""
    variants = [v for v in VARIANTS if device.type == "cuda" or v not in GRAPH_VARIANTS]
    notes = [] if device.type == "cuda" else [f"{', '.join(GRAPH_VARIANTS)}: skipped, CUDA graphs need a CUDA device"]
    if mode == "smoke":
        return [("digits", [1], ["reference", "fused"], 1)], notes
    batches = [1, 16, 256] if device.type == "cuda" else [1, 16]
    if mode == "full" and device.type == "cuda":
        return [("ddim-cifar10", batches, variants, 50), ("digits", batches, variants, 50)], notes
    if mode == "full":
        # A 2-core CPU: 50 steps of the 35.7M-parameter cifar10 UNet at batch 16 take ~90 s a run, and bf16
        # convolutions there run 5-40x slower than fp32, so every variant at 50 steps would take hours. Full mode
        # keeps every variant, with fewer steps, and bf16 on the small digits UNet only.
        notes.append("full on CPU: ddim-cifar10 at 5 steps without bf16, digits at 20 steps with every variant "
                     "(50 steps of every variant would take hours on 2 cores).")
        fp32 = [v for v in variants if VARIANTS[v][2] != "bf16"]
        return [("ddim-cifar10", batches, fp32, 5), ("digits", batches, variants, 20)], notes
    if device.type == "cuda":
        return [("ddim-cifar10", batches, variants, 5), ("digits", batches, variants, 5)], notes
    # A 2-core CPU: a cifar10 forward takes 0.2-2 s (batch 1, idle to busy machine), bf16 convolutions run
    # ~5-40x slower than fp32 there and inductor compiles a UNet in ~90 s: --quick keeps to the eager fp32 paths.
    notes.append("--quick on CPU: reference and fused only (inductor compiles a UNet in ~90 s on 2 cores, bf16 "
                 "convolutions are many times slower than fp32 here), ddim-cifar10 at batch 1; run without --quick "
                 "for every variant.")
    return [("ddim-cifar10", [1], ["reference", "fused"], 5), ("digits", batches, ["reference", "fused"], 5)], notes


def load(name: str, device: torch.device, dtype: str, channels_last: bool = False) -> tuple[torch.nn.Module, str]:
    """The model in eval mode and the kind of weights: the bundled ones (digits) or seeded random ones."""
    config = load_config(name)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if "model_path" in (config.get("Sample") or {}) and os.path.isfile(resolve_model_path(None, config)):
        return load_model(config, None, str(device), dtype).to(memory_format=fmt), "bundled"
    torch.manual_seed(0)  # the cost of a forward does not depend on the weights' values
    model = build_model(config).to(device=device, dtype=DTYPES[dtype], memory_format=fmt)
    return model.eval().requires_grad_(False), "random"


def forward_bounds(forward: Callable[[], torch.Tensor], device: torch.device, reps: int) -> dict:
    """One model call's time, eager and (CUDA) replayed from a CUDA graph: {"eager": Timing, "graph": Timing or
    None}. The bound of a run is its calls times either."""
    eager = common.measure(forward, device, reps, warmup=1)
    graph = common.measure(common.graphed(forward, device), device, reps, warmup=1) if device.type == "cuda" else None
    return {"eager": eager, "graph": graph}


def run(args) -> tuple[list[dict], list[common.Panel], list[str]]:
    device, mode = torch.device(args.device), common.mode(args)
    reps = min(REPS[mode], 3) if device.type == "cpu" else REPS[mode]  # CPU runs last seconds each, not ms
    configs, notes = configurations(device, mode)
    if args.models:
        names, known = args.models.split(","), [c[0] for c in configs]
        if set(names) - set(known):
            raise SystemExit(f"bench_e2e.py: --models {args.models}: this mode runs {', '.join(known)}")
        configs = [c for c in configs if c[0] in names]
    if args.variants:
        keep = args.variants.split(",")
        if set(keep) - set(VARIANTS):
            raise SystemExit(f"bench_e2e.py: --variants {args.variants}: known variants are {', '.join(VARIANTS)}")
        configs = [(m, b, [v for v in VARIANTS if v in keep], s) for m, b, _, s in configs]
    rows, panels = [], []
    for model_name, batches, variants, steps in configs:
        config = load_config(model_name)
        schedule = Schedule.from_config(config["Schedule"])
        calls = build_plan(schedule, METHOD, steps).model_calls
        models = {(dtype, cl): load(model_name, device, dtype, cl)
                  for dtype, cl in {(VARIANTS[v][2], VARIANTS[v][3]) for v in variants}}
        weights = next(iter(models.values()))[1]
        if weights == "random" and model_name == "digits":
            notes.append("digits: bundled weights absent, timed with random weights (same cost)")
        panel = common.Panel(f"{model_name} ({weights} weights), {METHOD} {steps} steps", "batch", "images/s")
        for batch in batches:
            noise = torch.randn((batch, *image_shape(config)), generator=torch.Generator().manual_seed(0)).to(device)
            base, forwards = None, {}
            for variant in variants:
                backend, compile_, dtype, cl = VARIANTS[variant]
                model = models[dtype, cl][0]
                with torch.inference_mode():
                    def loop():
                        return sample(model, noise, schedule, METHOD, steps, backend=backend, compile=compile_,
                                      channels_last=cl)

                    first_s, _ = common.timed_first_call(loop, device)  # compile, capture, cuDNN autotuning
                    timing = common.measure(loop, device, reps, warmup=0)
                    if (dtype, compile_, cl) not in forwards:  # variants calling the same network share its bound
                        net = compiled(model) if compile_ else model  # the very module the sampler called
                        x = noise.to(DTYPES[dtype], memory_format=torch.channels_last if cl else torch.preserve_format)
                        t = torch.full((batch,), T_FORWARD, device=device)
                        forwards[dtype, compile_, cl] = forward_bounds(lambda: net(x, t), device, reps)
                    bounds = forwards[dtype, compile_, cl]
                    forward, graph_forward = bounds["eager"], bounds["graph"]
                base = base or timing
                ratio, noise_flag = common.speedup(base, timing)
                bound = calls * forward.seconds
                graph_bound = None if graph_forward is None else calls * graph_forward.seconds
                rows.append({
                    "bench": NAME, "model": model_name, "weights": weights, "batch": batch, "variant": variant,
                    "steps": steps, "model_calls": calls, "first_s": first_s,
                    "latency_ms": timing.seconds * 1e3, "latency_ms_spread": timing.spread * 1e3,
                    "images_per_s": batch / timing.seconds, "forward_ms": forward.seconds * 1e3,
                    "forward_ms_spread": forward.spread * 1e3, "bound_ms": bound * 1e3,
                    "x_bound": timing.seconds / bound, "vs_reference": ratio, "noise": noise_flag,
                    "graph_forward_ms": None if graph_forward is None else graph_forward.seconds * 1e3,
                    "graph_bound_ms": None if graph_bound is None else graph_bound * 1e3,
                    "x_graph_bound": None if graph_bound is None else timing.seconds / graph_bound,
                    "channels_last": cl, "dtype": dtype,
                })
                panel.add(variant, batch, batch / timing.seconds)
        panels.append(panel)
    notes = [
        "latency: one sample() call at steady state, two medians of "
        f"{reps} run(s), +- their distance; first s: the first call (torch.compile, CUDA graph capture, "
        "allocations), not in the latency. bound = model calls x one forward of the same model variant and batch, "
        "timed the same way; x bound = latency / bound. graph bound (CUDA) = model calls x one forward replayed "
        "from a CUDA graph (no host time in it); x graph = latency / graph bound. A speedup within the spread is "
        "marked (noise).",
        "Variants: reference = the paper's formulas op by op, eager fp32; fused = plan + fused lincomb; +compile = "
        "torch.compile of the UNet; graph = the whole loop in one CUDA graph; bf16 = fused with the UNet in "
        "bfloat16 (the sampler state stays float32); +cl = channels_last weights, activations and sampler buffers. "
        "ddim-cifar10 uses seeded random weights (35.7M parameters).",
    ] + notes
    return rows, panels, notes


COLUMNS = [
    common.Column("model", "model"), common.Column("batch", "batch"), common.Column("variant", "variant"),
    common.Column("steps", "steps"), common.Column("calls", "model_calls"),
    common.Column("latency ms", "latency_ms", "{:.1f}"), common.Column("+-", "latency_ms_spread", "{:.1f}"),
    common.Column("images/s", "images_per_s", "{:.2f}"), common.Column("forward ms", "forward_ms", "{:.2f}"),
    common.Column("x bound", "x_bound", "{:.2f}"),
    common.Column("x graph", lambda r: "-" if r.get("x_graph_bound") is None else f"{r['x_graph_bound']:.2f}"),
    common.Column("vs reference", lambda r: common.speedup_text(r["vs_reference"], r["noise"])),
    common.Column("first s", "first_s", "{:.2f}"),
]


def main(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    return common.main("bench_e2e.py", __doc__, NAME, run, COLUMNS, argv, add_arguments)


def add_arguments(parser) -> None:
    parser.add_argument("--models", help="comma-separated models to keep of those the mode runs (default: all)")
    parser.add_argument("--variants", help="comma-separated variants to run instead of the mode's (graph ones need "
                        "CUDA; the first is the speedup's base)")


if __name__ == "__main__":
    main()
