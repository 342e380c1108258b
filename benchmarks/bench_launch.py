"""Host time per eager launch of the fused op, against a bare torch.add launch on the same machine.

On a GPU the host's time to enqueue one small kernel decides the speed of an eager (not graphed) sampling loop:
this times the enqueue alone (time.perf_counter over back-to-back launches, synchronized only after the timed
loop), for every way the sampler can reach the kernel, and counts the memory copies each launch issues (torch
profiler, CUDA runtime events named cudaMemcpy*).

    python benchmarks/bench_launch.py [--quick | --smoke] [--out DIR] [--device cpu|cuda]

Providers: "torch.add" (torch.add(a, b, out=c), the bare launch to beat), "registered op" (the
torch.ops.pndm_fast op, what torch.compile records, checks included), "jit" (triton's own launcher, CUDA only),
"bound" (ops.bind: the kernel fetched once, launched directly; what the sampler runs). On a CPU the kernel runs
inside the call, so there the host time includes the work itself.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

import common
from pndm_fast import ops

NAME = "launch"
SHAPES = {"full": [(1, 3, 32, 32), (64, 3, 32, 32), (1024, 3, 32, 32)], "quick": [(1, 3, 32, 32), (1024, 3, 32, 32)],
          "smoke": [(1, 3, 8, 8)]}
WEIGHTS = [-1e-3, 1 / 24 * 55, -59 / 24, 37 / 24, -9 / 24]  # an F-PNDM update: x and 4 eps


def providers(shape, device) -> dict:
    """name -> no-argument launch of the same F-PNDM update (4 fp32 operands, in place over x)."""
    x = torch.randn(shape, device=device)
    eps = [torch.randn(shape, device=device) for _ in range(4)]
    impl = ops.available_impls(device)[0]
    args = (x, x, eps, WEIGHTS, True, None, None, False, [], [])  # no out2, no blend
    a, b, c = torch.randn(shape, device=device), torch.randn(shape, device=device), torch.empty(shape, device=device)
    found = {"torch.add": functools.partial(torch.add, a, b, out=c)}
    if impl == "torch":
        return found
    op = torch.ops.pndm_fast.lincomb_triton_ if impl == "triton" else torch.ops.pndm_fast.lincomb_cpp_
    found["registered op"] = functools.partial(op, *args)
    if impl == "triton":
        from pndm_fast.kernels import lincomb as kernels
        kernel, grid, launch_args, meta = kernels._launch(*args, None)
        found["jit"] = functools.partial(kernel[grid], *launch_args, **meta)
    found["bound"] = ops.bind(*args, impl=impl)
    return found


def host_seconds(fn, device, inner: int, reps: int) -> common.Timing:
    """Two medians of host seconds per launch, each over `reps` loops of `inner` launches."""
    def median():
        times = []
        for _ in range(reps):
            common.synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - start) / inner)
            common.synchronize(device)
        return statistics.median(times)

    for _ in range(3):
        fn()
    return common.Timing((median(), median()))


def memcpys_per_call(fn, device, calls: int = 20) -> float | None:
    """cudaMemcpy* runtime calls per launch under the torch profiler; None on a CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    common.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        common.synchronize(device)
    return sum(e.count for e in prof.key_averages() if "memcpy" in e.key.lower() and e.key.startswith("cuda")) / calls


def run(args):
    device, mode = torch.device(args.device), common.mode(args)
    inner, reps = {"full": (100, 15), "quick": (100, 7), "smoke": (5, 1)}[mode]
    rows = []
    for shape in SHAPES[mode]:
        found = providers(shape, device)
        timings = {name: host_seconds(fn, device, inner, reps) for name, fn in found.items()}
        base = timings["torch.add"]
        for name, timing in timings.items():
            rows.append({
                "bench": NAME, "shape": "x".join(map(str, shape)), "tensor_mb": torch.Size(shape).numel() * 4 / 2**20,
                "provider": name, "host_us": timing.seconds * 1e6, "host_us_spread": timing.spread * 1e6,
                "x_add": timing.seconds / base.seconds, "memcpy_per_call": memcpys_per_call(found[name], device),
            })
    notes = ["host us: time.perf_counter over back-to-back launches, synchronized only between loops; two medians "
             f"of {reps} loops of {inner} launches, +- their distance. x add = host us / torch.add's at the same size.",
             "The update is F-PNDM's (x in place plus 4 fp32 eps). memcpy/call: cudaMemcpy* runtime calls per launch "
             "under torch.profiler (CUDA only)."]
    if device.type != "cuda":
        notes.append("CPU: the kernel runs inside the call, so host us includes the work; jit is CUDA only.")
    return rows, [], notes


COLUMNS = [
    common.Column("shape", "shape"), common.Column("MB", "tensor_mb", "{:.3g}"), common.Column("provider", "provider"),
    common.Column("host us", "host_us", "{:.1f}"), common.Column("+-", "host_us_spread", "{:.1f}"),
    common.Column("x add", "x_add", "{:.2f}"),
    common.Column("memcpy/call", lambda r: "-" if r["memcpy_per_call"] is None else f"{r['memcpy_per_call']:.2f}"),
]


def main(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    return common.main("bench_launch.py", __doc__, NAME, run, COLUMNS, argv)


if __name__ == "__main__":
    main()
