"""The GPU stack per sampling step: which combination kernel, what the graph costs over the network, and the peer.

On the digits and ddim-cifar10 UNets at batch 1, 16 and 256, F-PNDM 5 steps (14 model calls):
- the graph backend with each combination kernel: the fused Triton op, the plain-torch combination, and
  torch.compile of the plain-torch combination (fp32; bf16 channels_last with the fused op); and with fresh noise
  as a plan operand (DDIM eta 1 against DDIM, the same calls);
- each against its bound, calls x one forward of the same network replayed from a CUDA graph (the network at its
  fastest, no host time), and the guided run (digits-cond, guidance 2: one forward of twice the batch and the mix)
  against calls x that guided call graphed;
- diffusers' loop (DDIMScheduler around the same UNet compiled with mode="reduce-overhead") against the graph
  backend's DDIM on diffusers' own times, with the UNet eager and compiled: the same images, the same calls.

    python benchmarks/bench_stack.py [--quick | --smoke] [--out DIR] [--device cpu|cuda] [--models NAME,...]

Without CUDA (a dry run of the script) the eager fused backend stands in for the graph, and bounds are eager.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

import common
from bench_e2e import load
from pndm_fast import Denoiser, Schedule, build_plan, load_config, ops, sample, sampling
from pndm_fast.runners.sample import image_shape

NAME = "stack"
METHOD, STEPS = "F-PNDM", 5
PEER_METHOD, PEER_STEPS = "DDIM", 10
MODELS = ("digits", "ddim-cifar10")
GUIDED, GUIDANCE = "digits-cond", 2.0
BATCHES = {"full": [1, 16, 256], "quick": [1, 16, 256], "smoke": [1]}
PEER_BATCHES = {"full": [1, 16, 256], "quick": [1, 16], "smoke": [1]}
PEER_MODELS = {"full": MODELS, "quick": ("ddim-cifar10",), "smoke": MODELS}  # each batch compiles the UNet anew
REPS = {"full": 5, "quick": 3, "smoke": 1}
COMBINATIONS = ("fused", "torch", "torch.compile")
NOISE_PAIR, NOISE_STEPS = ("DDIM", "DDIM:eta=1"), 10  # deterministic, then the same steps drawing fresh noise
WATCHED_MAX_BATCH = 16  # a callback's cost is the host's, per step: it shows at small batches


@contextlib.contextmanager
def combination(kind: str):
    """The graph backend (and the eager stand-in) combining with `kind`: the fused op as shipped, the plain-torch
    twin, or torch.compile of that twin. Cached runners are dropped on the way in and out, since they keep the
    kernel they were built with."""
    saved = dict(sampling.FUSED_OP), ops.lincomb_torch
    if kind != "fused":
        sampling.FUSED_OP.update(graph="torch", fused="torch")
    if kind == "torch.compile":
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        ops.lincomb_torch = torch.compile(saved[1], dynamic=False)
    sampling.set_cache_limit(0)
    sampling.set_cache_limit(None)
    try:
        yield
    finally:
        sampling.FUSED_OP.update(saved[0])
        ops.lincomb_torch = saved[1]
        sampling.set_cache_limit(0)
        sampling.set_cache_limit(None)


def bound(call, device: torch.device, reps: int) -> common.Timing:
    """One model call at its fastest: replayed from a CUDA graph (eager without CUDA)."""
    return common.measure(common.graphed(call, device) if device.type == "cuda" else call, device, reps, warmup=1)


def timed_run(run, device: torch.device, reps: int) -> tuple[float, common.Timing]:
    first_s, _ = common.timed_first_call(run, device)  # capture, compile, cuDNN's choices
    return first_s, common.measure(run, device, reps, warmup=1)


def row(model: str, batch: int, variant: str, calls: int, first_s: float, timing: common.Timing,
        forward: common.Timing | None, **extra) -> dict:
    bound_s = None if forward is None else calls * forward.seconds
    return {"bench": NAME, "model": model, "batch": batch, "variant": variant, "model_calls": calls,
            "first_s": first_s, "latency_ms": timing.seconds * 1e3, "latency_ms_spread": timing.spread * 1e3,
            "per_call_ms": timing.seconds / calls * 1e3, "images_per_s": batch / timing.seconds,
            "bound_ms": None if bound_s is None else bound_s * 1e3,
            "x_bound": None if bound_s is None else timing.seconds / bound_s} | extra


def batch_noise(config: dict, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn((batch, *image_shape(config)), generator=torch.Generator().manual_seed(0)).to(device)


def stack_rows(name: str, batches: list[int], device: torch.device, reps: int, backend: str) -> list[dict]:
    """Every combination kernel in fp32, the fused op in bf16 channels_last, each against its graphed bound."""
    config = load_config(name)
    schedule = Schedule.from_config(config["Schedule"])
    rows = []
    for dtype, cl, kinds in (("fp32", False, COMBINATIONS), ("bf16", True, ("fused",))):
        model, _ = load(name, device, dtype, cl)
        fmt = torch.channels_last if cl else torch.contiguous_format
        for batch in batches:
            noise = batch_noise(config, batch, device)
            x = noise.to(next(model.parameters()).dtype, memory_format=fmt)
            t = torch.full((batch,), 500.0, device=device)
            forward = bound(lambda: model(x, t), device, reps)
            for kind in kinds:
                with combination(kind), torch.inference_mode():
                    first_s, timing = timed_run(
                        lambda: sample(model, noise, schedule, METHOD, STEPS, backend=backend, channels_last=cl,
                                       check_finite=False), device, reps)
                calls = build_plan(schedule, METHOD, STEPS).model_calls
                rows.append(row(name, batch, f"{backend} {dtype}{' cl' if cl else ''}, {kind}", calls, first_s,
                                timing, forward))
            if dtype == "fp32":
                rows += noise_rows(model, noise, schedule, batch, forward, device, reps, backend, name)
                if batch <= WATCHED_MAX_BATCH:
                    rows += watched_rows(model, noise, schedule, batch, forward, device, reps, backend, name)
    return rows


def noise_rows(model, noise, schedule, batch, forward, device, reps, backend, name) -> list[dict]:
    """Fresh noise as a plan operand: DDIM with eta 1 against DDIM, the same calls and kernel."""
    rows, deterministic = [], None
    for spec in NOISE_PAIR:
        with torch.inference_mode():
            first_s, timing = timed_run(lambda: sample(model, noise, schedule, spec, NOISE_STEPS, backend=backend,
                                                       check_finite=False), device, reps)
        extra = {} if deterministic is None else {"x_deterministic": timing.seconds / deterministic.seconds}
        deterministic = deterministic or timing
        rows.append(row(name, batch, f"{backend} fp32, fused, {spec}", NOISE_STEPS, first_s, timing, forward,
                        **extra))
    return rows


def watched_rows(model, noise, schedule, batch, forward, device, reps, backend, name) -> list[dict]:
    """A callback after every step (one that does nothing): the graph backend replaying one graph per step, and
    the eager fused backend, against the whole-loop graph of the same DDIM run; what `auto` should run watched."""
    rows, unwatched = [], None
    for way, watch in ((backend, False), (backend, True), ("fused", True)):
        with torch.inference_mode():
            first_s, timing = timed_run(lambda: sample(model, noise, schedule, NOISE_PAIR[0], NOISE_STEPS,
                                                       backend=way, check_finite=False,
                                                       callback=(lambda i, t, x, x0: None) if watch else None),
                                        device, reps)
        extra = {} if unwatched is None else {"x_unwatched": timing.seconds / unwatched.seconds}
        unwatched = unwatched or timing
        rows.append(row(name, batch, f"{way} fp32, {NOISE_PAIR[0]}{', callback' if watch else ''}", NOISE_STEPS,
                        first_s, timing, forward, **extra))
    return rows


def guided_rows(batches: list[int], device: torch.device, reps: int, backend: str) -> list[dict]:
    """Classifier-free guidance inside the graph: one forward of twice the batch and the mix per call."""
    config = load_config(GUIDED)
    schedule = Schedule.from_config(config["Schedule"])
    net, _ = load(GUIDED, device, "fp32")
    rows = []
    for batch in batches:
        noise = batch_noise(config, batch, device)
        labels = torch.arange(batch, device=device) % 10
        null = torch.full_like(labels, 10)
        guided = Denoiser(net, cond={"y": labels}, uncond={"y": null}, guidance=GUIDANCE)
        x2, y2 = torch.cat([noise, noise]), torch.cat([labels, null])
        t2 = torch.full((2 * batch,), 500.0, device=device)

        def call():
            cond, uncond = net(x2, t2, y=y2).chunk(2)
            return uncond + GUIDANCE * (cond - uncond)

        forward = bound(call, device, reps)
        with torch.inference_mode():
            first_s, timing = timed_run(lambda: sample(guided, noise, schedule, METHOD, STEPS, backend=backend,
                                                       check_finite=False), device, reps)
        calls = build_plan(schedule, METHOD, STEPS).model_calls
        rows.append(row(GUIDED, batch, f"{backend} fp32, fused, guidance {GUIDANCE:g}", calls, first_s, timing,
                        forward))
    return rows


def peer_rows(name: str, batches: list[int], device: torch.device, reps: int, backend: str) -> list[dict]:
    """diffusers' DDIM loop around the UNet compiled with mode="reduce-overhead" (plain torch.compile without CUDA),
    against the graph backend's DDIM on the same times, with the eager UNet and with the same UNet compiled
    (sample(compile=True)): latency, and how far each of our images is from theirs (relative L2)."""
    import diffusers

    config = load_config(name)
    schedule = Schedule.from_config(config["Schedule"])
    model, _ = load(name, device, "fp32")
    ours_compiled, _ = load(name, device, "fp32")  # compiled in place by sample(compile=True)
    scheduler = diffusers.DDIMScheduler(trained_betas=schedule.betas.float().numpy(), clip_sample=False)
    scheduler.set_timesteps(PEER_STEPS, device=device)
    times = sorted(int(t) for t in scheduler.timesteps)
    unet = torch.compile(model, mode=unet_mode(device), dynamic=False)
    rows = []
    for batch in batches:
        noise = batch_noise(config, batch, device)

        def theirs():
            x = noise
            for t in scheduler.timesteps:
                torch.compiler.cudagraph_mark_step_begin()
                eps = unet(x, t.expand(batch))
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            return x

        with torch.inference_mode():
            peer_first, peer = timed_run(theirs, device, reps)
            want = theirs()
            rows.append(row(name, batch, f"diffusers DDIM, UNet compiled ({unet_mode(device)})", len(times),
                            peer_first, peer, None))
            for net, compile_, label in ((model, False, "eager UNet"), (ours_compiled, True, "UNet compiled")):
                def ours():
                    return sample(net, noise, schedule, PEER_METHOD, timesteps=times, backend=backend,
                                  check_finite=False, compile=compile_)

                first_s, timing = timed_run(ours, device, reps)
                difference = ((ours() - want).norm() / want.norm()).item()
                rows.append(row(name, batch, f"{backend} fp32, fused, DDIM, {label}", len(times), first_s, timing,
                                None, vs_peer=peer.seconds / timing.seconds, relative_difference=difference))
    return rows


def unet_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


def run(args) -> tuple[list[dict], list[common.Panel], list[str]]:
    device, mode = torch.device(args.device), common.mode(args)
    backend = "graph" if device.type == "cuda" else "fused"
    reps, batches = REPS[mode], BATCHES[mode]
    models = args.models.split(",") if args.models else list(MODELS)
    if set(models) - set(MODELS):
        raise SystemExit(f"bench_stack.py: --models {args.models}: known models are {', '.join(MODELS)}")
    if device.type == "cpu" and mode != "smoke":
        batches = [1, 16]
    rows, notes = [], []
    for name in models:
        rows += stack_rows(name, batches, device, reps, backend)
    rows += guided_rows(batches, device, reps, backend)
    if importlib.util.find_spec("diffusers") is None:
        notes.append("diffusers' loop: skipped (diffusers is not installed)")
    else:
        for name in [m for m in models if m in PEER_MODELS[mode]]:
            rows += peer_rows(name, PEER_BATCHES[mode], device, reps, backend)
    panel = common.Panel(f"{METHOD} {STEPS} steps: time per model call", "batch", "ms per call")
    for r in rows:
        panel.add(f"{r['model']} {r['variant']}", r["batch"], r["per_call_ms"])
    notes = [
        "latency: one sample() call at steady state (input checks, copies in and out, the replay), two medians "
        f"of {reps} runs, +- their distance; first s: the first call (capture, compile). bound = model calls x one "
        "forward of the same network, dtype, layout and batch replayed from a CUDA graph; x bound = latency / "
        "bound. Guided: the bound's call is one forward of twice the batch and the guidance mix.",
        "Combinations: fused = the shipped fused op (Triton on CUDA); torch = the plain-torch twin "
        "(pndm_fast.ops.lincomb_torch); torch.compile = torch.compile(dynamic=False) of that twin. ddim-cifar10 "
        "runs on seeded random weights (35.7M parameters), digits on its bundled ones.",
        f"Fresh noise: {NOISE_PAIR[1]} against {NOISE_PAIR[0]}, {NOISE_STEPS} steps each; x deterministic = its "
        "latency / the deterministic run's (the draws are made per run before the replay and copied in).",
        f"Callback: {NOISE_PAIR[0]} with a callback after every step that does nothing (the graph backend replays one "
        f"graph per step, the fused backend runs eagerly), at batches up to {WATCHED_MAX_BATCH}; x unwatched = its "
        "latency / the unwatched graph's.",
        f"diffusers: DDIMScheduler(trained_betas, clip_sample=False), {PEER_STEPS} steps, eta 0, its loop around "
        "the same UNet under torch.compile(mode=\"reduce-overhead\"); ours: sample(method=\"DDIM\", "
        "timesteps=its times), with the eager UNet and with the UNet compiled by sample(compile=True). vs peer = "
        "their latency / ours; rel. diff = |ours - theirs| / |theirs| over the images (on a GPU, cuDNN's default TF32 "
        "convolutions and other kernels per layer keep the two runs apart by more than float32 rounding).",
    ] + notes + ([] if device.type == "cuda" else ["No CUDA: the eager fused backend stands in for the graph "
                                                  "and the bounds are eager forwards (a dry run)."])
    return rows, [panel], notes


COLUMNS = [
    common.Column("model", "model"), common.Column("batch", "batch"), common.Column("variant", "variant"),
    common.Column("calls", "model_calls"), common.Column("latency ms", "latency_ms", "{:.2f}"),
    common.Column("+-", "latency_ms_spread", "{:.2f}"), common.Column("ms/call", "per_call_ms", "{:.3f}"),
    common.Column("images/s", "images_per_s", "{:.1f}"), common.Column("bound ms", "bound_ms", "{:.2f}"),
    common.Column("x bound", "x_bound", "{:.3f}"), common.Column("x deterministic", "x_deterministic", "{:.3f}"),
    common.Column("x unwatched", "x_unwatched", "{:.3f}"), common.Column("vs peer", "vs_peer", "{:.2f}x"),
    common.Column("rel. diff", "relative_difference", "{:.1e}"), common.Column("first s", "first_s", "{:.1f}"),
]


def main(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    return common.main("bench_stack.py", __doc__, NAME, run, COLUMNS, argv, add_arguments)


def add_arguments(parser) -> None:
    parser.add_argument("--models", help=f"comma-separated models of {', '.join(MODELS)} (default: both)")


if __name__ == "__main__":
    main()
