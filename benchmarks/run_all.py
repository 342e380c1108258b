"""Run the benchmarks and regenerate RESULTS.md: headlines, the machine, the versions, every table and the
exact commands. Sections headed `## GPU` (results recorded by hand on a GPU machine) are kept as they are.

    python benchmarks/run_all.py [--quick | --smoke] [--out DIR] [--device cpu|cuda]

RESULTS.md goes to benchmarks/ with the default --out, otherwise into --out beside the JSON and PNG files.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

import bench_compile
import bench_e2e
import bench_kernels
import bench_launch
import bench_sampler
import common

BENCHES = [
    ("Kernels: one F-PNDM multistep update", bench_kernels),
    ("Launch: host time per eager call of the fused op", bench_launch),
    ("Sampler overhead: F-PNDM with a null model", bench_sampler),
    ("End to end: F-PNDM with the DDIM UNets", bench_e2e),
    ("torch.compile of the UNets: --compile against eager float32", bench_compile),
]
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
GPU_STUB = """## GPU

No GPU results recorded yet. On a CUDA machine, run `python benchmarks/run_all.py --quick --out /tmp/gpu` and paste
the tables of /tmp/gpu/RESULTS.md here with the date and the card; run_all.py keeps this section as it is.
"""


def gpu_sections(text: str) -> str:
    """Every section whose heading starts with `## GPU`, up to the next `## ` heading, verbatim."""
    return "".join(part for part in re.split(r"(?m)^(?=## )", text) if part.startswith("## GPU"))


def _find(rows: list[dict], **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _vs(new: dict, base: dict, key: str) -> str:
    """new's speedup over base from their timings and spreads, '(noise)' when within either spread."""
    timing = [common.Timing.of(row[key], row[key + "_spread"]) for row in (base, new)]
    return common.speedup_text(*common.speedup(*timing))


def headlines(kernels: list[dict], sampler: list[dict], e2e: list[dict]) -> list[str]:
    """One line per benchmark: the fused path against its baselines at the largest size that was run."""
    lines = []
    if kernels:
        big = kernels[-1]["shape"]
        ref = _find(kernels, shape=big, provider="torch-reference")
        for provider in ("triton", "cpp"):
            row = _find(kernels, shape=big, provider=provider)
            if row:
                compiled = _find(kernels, shape=big, provider="torch-compile")
                lines.append(f"Update step at {big} ({row['tensor_mb']:.3g} MB per tensor): {provider} "
                             f"{row['us']:.1f} us, {_vs(row, ref, 'us')} vs the paper's op chain and "
                             f"{_vs(row, compiled, 'us')} vs its torch.compile; {row['of_roofline']:.0%} of the copy "
                             f"roofline ({row['gbps']:.1f} of {row['copy_gbps']:.1f} GB/s copy).")
    if sampler:
        batch = sampler[-1]["batch"]
        best = _find(sampler, batch=batch, provider="pndm_fast graph") or _find(
            sampler, batch=batch, provider="pndm_fast fused")
        others = [_find(sampler, batch=batch, provider=p) for p in ("paper's loop", "diffusers", "pndm_fast reference")]
        versus = ", ".join(f"{_vs(best, o, 'ms_per_call')} vs {o['provider']}" for o in others if o)
        lines.append(f"Sampler overhead at batch {batch}: {best['provider']} {best['ms_per_call']:.3f} ms per model "
                     f"call ({best['x_floor']:.1f} x the memory floor): {versus}.")
    for model in dict.fromkeys(r["model"] for r in e2e):
        batch = max(r["batch"] for r in e2e if r["model"] == model)
        ref = _find(e2e, model=model, batch=batch, variant="reference")
        fast = [r for r in e2e if r["model"] == model and r["batch"] == batch and r is not ref]
        best = min(fast, key=lambda r: r["latency_ms"]) if fast else None
        if ref and best:
            lines.append(f"End to end, {model} at batch {batch} ({best['steps']} steps): {best['variant']} "
                         f"{best['images_per_s']:.2f} images/s, {_vs(best, ref, 'latency_ms')} vs reference, "
                         f"{best['x_bound']:.2f} x the model-only bound.")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = common.arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    start, env = time.perf_counter(), common.env_info(torch.device(args.device), "")
    sections, results = [], {}
    for title, bench in BENCHES:
        text, rows = bench.main(argv)
        results[bench.NAME] = rows
        sections.append(f"## {title}\n\n`{common.command_line(Path(bench.__file__).name, argv)}`\n\n{text}\n")
    seconds = time.perf_counter() - start

    path = RESULTS_MD if args.out.resolve() == common.RESULTS.resolve() else args.out / "RESULTS.md"
    kept = gpu_sections(path.read_text()) if path.exists() else ""
    summary = "\n".join(f"- {line}" for line in headlines(results["kernels"], results["sampler"], results["e2e"]))
    head = f"""# Benchmark results

Regenerated by `{common.command_line("run_all.py", argv)}` in {seconds:.0f} s, {env['timestamp']} (UTC).
Machine: {env['device']}; torch {env['torch']} ({env['torch_threads']} threads, torch's default), triton \
{env['triton']}; 1-minute load average {env['load1']} at the start (other jobs on the machine slow everything).
Every JSON row in {args.out.name}/ records the same. Timings: two medians after warm-up (CUDA events on a GPU,
time.perf_counter on a CPU), +- their distance; a speedup within it is marked (noise).

{summary}

"""
    path.write_text(head + "\n".join(sections) + "\n" + (kept or GPU_STUB))
    print(f"wrote {path} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
