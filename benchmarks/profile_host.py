"""Where one sampling run's time goes, per variant: torch.profiler over a steady-state sample() call, the ops
that take the most host time, and the host-device syncs. For small batches on a GPU, where the host's launches
and not the GPU bound a run, this says which launches cost.

    python benchmarks/profile_host.py [--model digits] [--batch 1] [--steps 5] [--variants reference,fused]
                                      [--device cuda|cpu] [--rows 12]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_e2e import METHOD, VARIANTS, load
from pndm_fast import Schedule, load_config, sample
from pndm_fast.runners.sample import image_shape

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", help="a bundled config: digits, ddim-cifar10, ...")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", default="reference,fused", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=12, help="ops listed per variant")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arg_parser().parse_args(argv)
    device = torch.device(args.device)
    config = load_config(args.model)
    schedule = Schedule.from_config(config["Schedule"])
    noise = torch.randn((args.batch, *image_shape(config)), generator=torch.Generator().manual_seed(0)).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for variant in args.variants.split(","):
        backend, compile_, dtype, channels_last = VARIANTS[variant]
        model = load(args.model, device, dtype, channels_last)[0]

        def run():
            out = sample(model, noise, schedule, METHOD, args.steps, backend=backend, compile=compile_,
                         channels_last=channels_last)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        with torch.inference_mode():
            for _ in range(3):  # compile, capture, autotune, allocate
                run()
            start = time.perf_counter()
            run()
            wall_ms = (time.perf_counter() - start) * 1e3
            with profile(activities=activities) as prof:
                run()
        events = prof.key_averages()
        syncs = {e.key: e.count for e in events if e.key in SYNCS}
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch"))
        print(f"\n## {args.model} batch {args.batch}, {METHOD} {args.steps} steps, {variant}: {wall_ms:.1f} ms "
              f"unprofiled; kernel launches {launches}; syncs {syncs or 'none'}")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
