"""The tuner on the analytic mixtures: `pndm_fast.tune` run on each mixture's exact eps model (the paper's linear
table), against the best diffusers configuration it measures on the same validation noises (its schedulers' own
time steps through pndm_fast's equal methods: DDIM, DPM-Solver++ 2M/3M, UniPC, DEIS, with their spacing and Karras
variants). pairs-16d is the mixture no part of the tuner's design was tried on.

    python benchmarks/tuned_mixtures.py [--budgets 5 8 10] [--noises 64]

Writes benchmarks/results/tuned_mixtures.json and its table into docs/accuracy.md (its own marked section).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import common
from mixture import MIXTURES, MixtureEps
from pndm_fast import Schedule, tune

LINEAR = {"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000}
UNSEEN = "pairs-16d"


def tune_mixture(name: str, budgets: list[int], noises: int, **search) -> dict:
    """budget -> the profile's entry (method, validated error, diffusers' best and the ratio), and the seconds."""
    schedule = Schedule.from_config(LINEAR)
    mixture = MIXTURES[name]()
    gen = torch.Generator().manual_seed(11)
    noise, validation = (torch.randn(noises, *mixture.shape, dtype=torch.float64, generator=gen) for _ in range(2))
    begin = time.perf_counter()
    profile = tune(MixtureEps(mixture, schedule), schedule, budgets, noise, validation, backend="fused", **search)
    return {"seconds": round(time.perf_counter() - begin, 1), "budgets": profile.budgets}


def render(results: dict, command: str) -> str:
    lines = ["## The tuner on the analytic mixtures", "",
             f"`{command}`: `pndm_fast.tune` on each mixture's exact eps model (linear table), its choice's error "
             "validated on noises the selection never saw, against the best diffusers configuration it measured on "
             f"the same validation noises, and the static table's (`auto` without a profile) there. {UNSEEN} is "
             "the mixture no part of the tuner's design was tried on.", "",
             "| mixture | calls | tuned choice | its error | diffusers' best | its error | ratio | static table's "
             "error | tuning |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        for budget, entry in sorted(result["budgets"].items()):
            peer = entry.get("diffusers", {})
            lines.append(f"| {name} | {budget} | {entry['label']} | {entry['error']:.3g} | {peer.get('label', '-')} "
                         f"| {peer.get('error', float('nan')):.3g} | {peer.get('ratio', float('nan')):.2f} | "
                         f"{entry['static']['error']:.3g} | {result['seconds']:.0f} s for all budgets |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, log=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[5, 8, 10])
    p.add_argument("--noises", type=int, default=64, help="selection noises, and as many validation noises")
    p.add_argument("--mixtures", nargs="+", default=list(MIXTURES))
    p.add_argument("--optimise", type=int, default=2, help="candidates whose call times are optimised (tune's)")
    p.add_argument("--evaluations", type=int, default=24, help="evaluations per optimisation (tune's)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--doc", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "accuracy.md")
    args = p.parse_args(argv)
    results = {}
    for name in args.mixtures:
        results[name] = tune_mixture(name, args.budgets, args.noises, optimise=args.optimise,
                                     evaluations=args.evaluations)
        log(f"{name}: " + ", ".join(f"{b}: {e['error']:.3g} (x{e.get('diffusers', {}).get('ratio', float('nan')):.2f})"
                                     for b, e in sorted(results[name]["budgets"].items())))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuned_mixtures.json").write_text(json.dumps(results, indent=1, default=str))
    command = " ".join(["python benchmarks/tuned_mixtures.py", *(argv or [])])
    common.write_marked_section(args.doc, "benchmarks/tuned_mixtures.py", render(results, command))
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
