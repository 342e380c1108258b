"""Soak: many batches in a row over several shapes, methods and backends, so that the runner and plan caches fill
and evict; memory must stay flat.

Two small UNets with random weights (a DDIM at 16x16 and an iDDPM that takes any even size) sample round after
round of (shape, method, backend) combinations: more combinations per model than the runner cache keeps, so every
round evicts and rebuilds. Reported after a warm-up round and at the end: resident memory (RSS, from
/proc/self/statm), on CUDA torch.cuda.memory_allocated and memory_reserved, the runners the cache holds against
its limit, and the runner objects alive at all (counted by the garbage collector: an evicted runner that lingered
would show here).

    python benchmarks/soak.py [--quick] [--rounds N] [--cache N] [--threads N] [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import sys
import time

import torch

import common
from pndm_fast import Schedule, build_model, sample, set_cache_limit
from pndm_fast.engine import PlanRunner
from pndm_fast.sampling import cache_limit, cached_plan, cached_runner_count

DDIM = {"Model": {"struc": "DDIM", "ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [8], "dropout": 0.0, "in_channels": 3, "image_size": 16,
                  "resamp_with_conv": True}}
IDDPM = {"Model": {"struc": "iDDPM", "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
                   "attention_resolutions": [2], "dropout": 0.0, "channel_mult": [1, 2], "conv_resample": True,
                   "use_scale_shift_norm": True, "num_heads": 2, "num_heads_upsample": 2}}
SCHEDULE = {"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000}


def rss_mb() -> float:
    """Resident set size now, in MiB: /proc/self/statm's second field (pages); the peak where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_runners() -> int:
    return sum(type(o) is PlanRunner for o in gc.get_objects())  # type(), not isinstance: no lazy attribute lookups


def snapshot(device: torch.device, models: list) -> dict:
    gc.collect()
    row = {"rss_mb": round(rss_mb(), 1), "cached_runners": cached_runner_count(*models), "live_runners": live_runners(),
           "cached_plans": cached_plan.cache_info().currsize}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["cuda_allocated_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 2)
        row["cuda_reserved_mb"] = round(torch.cuda.memory_reserved(device) / 2**20, 2)
    return row


def workload(device: torch.device, quick: bool):
    """(model, noise shape, method, backend) per batch of one round: per model more runner keys than the cache
    keeps (8 by default), so a round both hits and evicts."""
    torch.manual_seed(0)
    ddim = build_model(DDIM).to(device).eval().requires_grad_(False)
    iddpm = build_model(IDDPM).to(device).eval().requires_grad_(False)
    methods = ["F-PNDM", "DDIM"] if quick else ["F-PNDM", "S-PNDM", "DDIM", "FON"]
    backends = ["fused", "torch"] + (["graph"] if device.type == "cuda" else [])
    ddim_shapes = [(b, 3, 16, 16) for b in ((1, 2, 3) if quick else (1, 2, 3, 4, 6))]
    iddpm_shapes = [(b, 3, s, s) for b, s in itertools.product((1, 2), (8, 12, 16) if quick else (8, 12, 16, 24))]
    return ([(ddim, shape, m, b) for shape, m, b in itertools.product(ddim_shapes, methods, backends)]
            + [(iddpm, shape, m, b) for shape, m, b in itertools.product(iddpm_shapes, methods, backends)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds (about a minute on 2 cores)")
    parser.add_argument("--rounds", type=int, help="rounds after the warm-up (default 10, --quick 4)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per batch")
    parser.add_argument("--cache", type=int, help="runners kept per model (default: pndm_fast's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the result row here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache is not None:
        set_cache_limit(args.cache)
    device = torch.device(args.device)
    schedule = Schedule.from_config(SCHEDULE)
    batches = workload(device, args.quick)
    # The soak's own networks: other live models in the process (a test run's fixtures, say) have runners of their
    # own in the cache, which the soak's bound does not cover.
    models = list({id(model): model for model, _, _, _ in batches}.values())

    most_cached = 0

    def one_round() -> None:
        nonlocal most_cached
        for model, shape, method, backend in batches:
            noise = torch.randn(shape, device=device)
            with torch.inference_mode():
                sample(model, noise, schedule, method, args.steps, backend, check_finite=False)
            most_cached = max(most_cached, cached_runner_count(*models))  # at every batch: the bound holds throughout

    start = time.perf_counter()
    one_round()
    warm = snapshot(device, models)
    for _ in range(rounds):
        one_round()
    end = snapshot(device, models)
    seconds = time.perf_counter() - start
    command = common.command_line("soak.py", sys.argv[1:] if argv is None else argv)
    row = {**common.env_info(device, command), "rounds": rounds, "batches": len(batches) * (rounds + 1),
           "distinct_keys": len(batches), "cache_limit": cache_limit(), "most_cached_runners": most_cached,
           "seconds": round(seconds, 1),
           **{f"warm_{k}": v for k, v in warm.items()}, **{f"end_{k}": v for k, v in end.items()},
           "rss_growth_mb": round(end["rss_mb"] - warm["rss_mb"], 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(f"soak on {row['device']}, torch {row['torch']}, {row['torch_threads']} threads: {row['batches']} batches "
          f"({len(batches)} distinct shape/method/backend per round, {rounds} rounds after warm-up) in {seconds:.1f} s")
    print("| | after warm-up | end |\n|---|---|---|")
    for key in warm:
        print(f"| {key} | {warm[key]} | {end[key]} |")
    print(f"RSS growth after warm-up: {row['rss_growth_mb']} MiB; runner cache limit {row['cache_limit']} per model "
          f"(2 models), at most {most_cached} cached at once")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return row


if __name__ == "__main__":
    main()
