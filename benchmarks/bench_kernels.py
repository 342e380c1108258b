"""One F-PNDM multistep update alone (the paper's eq. 12, then its transfer eq. 9): x and 4 eps in, new x out.

Every provider has to read 5 tensors and write 1, so 6 tensors of memory traffic is the least it can move; the
roofline is y.copy_(x) of the same size, measured in the same run, and the floor is 6 tensors at copy bandwidth.

    python benchmarks/bench_kernels.py [--quick | --smoke] [--out DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

import common
import paper
from pndm_fast import Schedule, load_config
from pndm_fast.ops import available_impls, bind
from pndm_fast.solvers import AB4

NAME = "kernels"
IMAGE = (3, 32, 32)
# Batches of 3x32x32 float32 from 12 KiB up to 5461 x 12 KiB, the largest under 64 MiB per tensor.
BATCHES = {"full": [1, 4, 16, 64, 256, 1024, 4096, 5461], "smoke": [1]}
QUICK = {"cuda": [1, 64, 1024, 5461], "cpu": [1, 16, 256]}  # CPU: up to 3 MiB per tensor, under a minute
REPS = {"full": 15, "quick": 5, "smoke": 1}
T, T_NEXT = 500, 480  # a multistep update in the middle of a 50-step run (time skip 20)


def paper_update(x, e1, e2, e3, e4, t, t_next, ac):
    """The paper's op chain for one update, e1 the newest eps: 13 full-size elementwise ops, 18 tensor reads and
    13 writes where 5 and 1 would do, plus ~15 tiny ops on the gathered (n,) alphas."""
    return paper.transfer(x, t, t_next, paper.multistep_eps([e4, e3, e2, e1]), ac)


def fused_impls(device: torch.device) -> tuple[list[str], list[str]]:
    """The lincomb implementations to time on this device, and a note for each one left out."""
    impls, notes = [], []
    for impl, kind in (("cpp", "cpu"), ("triton", "cuda")):
        if device.type != kind:
            notes.append(f"{impl}: not timed, lincomb impl={impl!r} is for {kind} tensors")
        elif impl not in available_impls(device):
            notes.append(f"{impl}: not timed, unavailable here (see pndm_fast.ops.available_impls)")
        else:
            impls.append(impl)
    return impls, notes


def cycling(update: Callable) -> Callable:
    """prepare(sets) for an update(x, e1, e2, e3, e4): each call runs it on the next buffer set."""
    def prepare(sets: list[tuple]) -> Callable[[], torch.Tensor]:
        next_set = itertools.cycle(sets).__next__
        return lambda: update(*next_set()[:5])
    return prepare


def providers(device: torch.device, batch: int, schedule: Schedule, impls: list[str]) -> dict[str, Callable]:
    """name -> prepare(sets), sets a list of buffer tuples (x, e1, e2, e3, e4, out) with e1 the newest eps;
    prepare returns a no-argument step that runs one update on the next set and returns the new x."""
    ac = schedule.alphas_cumprod.to(device)
    t = torch.full((batch,), float(T), device=device)
    t_next = torch.full((batch,), float(T_NEXT), device=device)
    # Float64 weights computed once on the host, as the plans do: w0 = A - 1, then B times eq. 12's coefficients.
    a_minus_1, b = schedule.transfer_coefficients(T, T_NEXT)
    weights = [a_minus_1] + [b * c for c in AB4]

    # A fresh compile for every size, so each size's compile time is its own and no shape turns dynamic.
    torch._dynamo.reset()
    compiled = torch.compile(paper_update, dynamic=False)

    def fused(impl):
        def prepare(sets):
            # Checked and bound once per buffer set, as the plan runner binds its combinations: lincomb's Python
            # checks would otherwise cost more than the kernel at small sizes.
            calls = itertools.cycle([(bind(out, x, [e1, e2, e3, e4], weights, impl=impl), out)
                                     for x, e1, e2, e3, e4, out in sets]).__next__

            def step():
                call, out = calls()
                call()
                return out
            return step
        return prepare

    found = {
        "torch-reference": cycling(lambda x, e1, e2, e3, e4: paper_update(x, e1, e2, e3, e4, t, t_next, ac)),
        "torch-compile": cycling(lambda x, e1, e2, e3, e4: compiled(x, e1, e2, e3, e4, t, t_next, ac)),
    }
    return found | {impl: fused(impl) for impl in impls}


def run(args) -> tuple[list[dict], list[common.Panel], list[str]]:
    device, mode = torch.device(args.device), common.mode(args)
    batches = QUICK.get(device.type, QUICK["cpu"]) if mode == "quick" else BATCHES[mode]
    reps = REPS[mode]
    schedule = Schedule.from_config(load_config("ddim-cifar10")["Schedule"])
    impls, skipped = fused_impls(device)
    rows = []
    bandwidth = common.Panel("F-PNDM update (5 reads + 1 write)", "MB per tensor", "GB/s", dashed=("copy",))
    latency = common.Panel("F-PNDM update", "MB per tensor", "us per update", dashed=("6-tensor floor",))
    for batch in batches:
        shape = (batch, *IMAGE)
        nbytes = 4 * math.prod(shape)
        mb = nbytes / 2**20
        sets = common.rotation(
            lambda: tuple(torch.randn(shape, device=device) for _ in range(5)) + (torch.zeros(shape, device=device),),
            6 * nbytes, device)
        copy = common.copy_timing(shape, device, reps)
        floor = 3 * copy.seconds  # 6 tensors at the bandwidth of a copy, which moves 2
        # Inside a CUDA graph, as the sampler runs them: the GPU's time alone, against a graphed copy's floor.
        graphed = device.type == "cuda"
        calls = max(len(sets), 8)
        graph_floor = 3 * common.graphed_timing(common.copy_step(shape, device), device, reps, calls).seconds \
            if graphed else None
        bandwidth.add("copy", mb, 2 * nbytes / copy.seconds / 1e9)
        latency.add("6-tensor floor", mb, floor * 1e6)
        expected, base = None, None
        for name, prepare in providers(device, batch, schedule, impls).items():
            step = prepare(sets)
            first_s, result = common.timed_first_call(step, device)  # every provider starts on sets[0]
            # A wrong kernel times nothing worth reporting: every provider must agree with the paper's chain.
            if expected is None:
                expected = result.clone()
            else:
                torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
            timing = common.measure(step, device, reps, warmup=3, batch=True)
            base = base or timing
            ratio, noise = common.speedup(base, timing)
            graph = common.graphed_timing(step, device, reps, calls) if graphed else None
            rows.append({
                "bench": NAME, "shape": "x".join(map(str, shape)), "tensor_mb": mb, "provider": name,
                "us": timing.seconds * 1e6, "us_spread": timing.spread * 1e6,
                "gbps": 6 * nbytes / timing.seconds / 1e9,
                "copy_gbps": 2 * nbytes / copy.seconds / 1e9, "copy_us_spread": copy.spread * 1e6,
                "floor_us": floor * 1e6, "of_roofline": floor / timing.seconds,
                "vs_reference": ratio, "noise": noise,
                "compile_s": first_s if name == "torch-compile" else None,
                "graph_us": graph and graph.seconds * 1e6, "graph_us_spread": graph and graph.spread * 1e6,
                "graph_floor_us": graph_floor and graph_floor * 1e6,
                "graph_of_roofline": graph and graph_floor / graph.seconds,
            })
            bandwidth.add(name, mb, rows[-1]["gbps"])
            latency.add(name, mb, rows[-1]["us"])
    notes = [
        "GB/s counts 6 tensors (5 reads + 1 write). copy GB/s = 2 x bytes / time of y.copy_(x) on one tensor of "
        "the same size in the same run; floor = 6 tensors at copy bandwidth; of roofline = floor / time.",
        f"Two medians of {reps} timed batches each (batches last >= {common.MIN_BATCH_S.get(device.type, 2e-3) * 1e3:g}"
        f" ms); +- is their distance, and a speedup within it is marked (noise). Inputs rotate through 2 x "
        f"{common.cache_bytes(device) >> 20} MiB (the last-level cache), so small sizes are not served from cache.",
        "torch-reference is the paper's op chain (runner/method.py: eq. 12, then eq. 9 with alphas gathered per "
        "sample); torch-compile is torch.compile(dynamic=False) of it, compiled afresh per size; compile s is its "
        "first call, with inductor's on-disk caches as found (a rerun may compile faster). cpp and triton are "
        "pndm_fast.ops.lincomb bound once per buffer set (ops.bind), as the sampler runs them.",
    ] + (["graph us (CUDA): the same calls captured in one CUDA graph and replayed, per call: the kernel's own "
          "time, as the sampler's graph runs it, without the host's launch path; graph of roofline = 6 tensors at "
          "a graphed copy's bandwidth / graph us."] if device.type == "cuda" else []) + skipped
    return rows, [bandwidth, latency], notes


COLUMNS = [
    common.Column("shape", "shape"), common.Column("MB", "tensor_mb", "{:.3g}"),
    common.Column("provider", "provider"), common.Column("us", "us", "{:.1f}"),
    common.Column("+-", "us_spread", "{:.1f}"), common.Column("GB/s", "gbps", "{:.1f}"),
    common.Column("copy GB/s", "copy_gbps", "{:.1f}"), common.Column("floor us", "floor_us", "{:.1f}"),
    common.Column("of roofline", "of_roofline", "{:.0%}"),
    common.Column("vs torch-reference", lambda r: common.speedup_text(r["vs_reference"], r["noise"])),
    common.Column("compile s", "compile_s", "{:.1f}"),
    common.Column("graph us", "graph_us", "{:.1f}"), common.Column("graph of roofline", "graph_of_roofline", "{:.0%}"),
]


def main(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    return common.main("bench_kernels.py", __doc__, NAME, run, COLUMNS, argv)


if __name__ == "__main__":
    main()
