"""The stochastic samplers against the ODE solvers on the analytic mixtures: the sliced Wasserstein distance of
each method's samples to exact draws of the data, per budget of model calls (docs/stochastic.md).

    python benchmarks/stochastic_accuracy.py [--samples 4000] [--out benchmarks/results/stochastic.json]

An ODE solver's error is a deterministic bias per sample; an SDE sampler's is a distribution error that more
calls remove. The distance of two independent exact draws of the same size is the noise floor, printed first.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from mixture import MIXTURES, MixtureEps
from pndm_fast import Schedule, load_config, sample

METHODS = ("DPM-Solver++2M", "UniPC-bh2", "DDIM", "DDIM:eta=1", "Euler-a", "DPM-Solver++2M-SDE")
BUDGETS = (10, 20, 50)
PROJECTIONS = 128


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-Wasserstein distance of the projected samples (equal counts)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], PROJECTIONS, dtype=torch.float64, generator=gen)
    directions /= directions.norm(dim=0, keepdim=True)
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values
    return float((pa - pb).abs().mean())


def study(samples: int) -> list[dict]:
    schedule = Schedule.from_config(load_config("ddim-cifar10")["Schedule"])
    rows = []
    for name in ("ring-2d", "pairs-16d", "images-3x8x8"):
        mixture = MIXTURES[name]()
        model = MixtureEps(mixture, schedule)
        gen = torch.Generator().manual_seed(1)
        data = mixture.sample_data(samples, gen)
        floor = sliced_wasserstein(data, mixture.sample_data(samples, gen))
        rows.append({"mixture": name, "method": "exact draws (floor)", "calls": 0, "sw": floor})
        noise = torch.randn(samples, *mixture.shape, dtype=torch.float64, generator=gen)
        for method in METHODS:
            for calls in BUDGETS:
                x = sample(model, noise, schedule, method, model_calls=calls, timesteps="logsnr", backend="torch",
                           seed=2)
                rows.append({"mixture": name, "method": method, "calls": calls,
                             "sw": sliced_wasserstein(x.reshape(samples, -1), data)})
                print(f"{name:13s} {method:20s} {calls:3d} calls: SW {rows[-1]['sw']:.4g} (floor {floor:.2g})",
                      flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for name in dict.fromkeys(r["mixture"] for r in rows):
        floor = next(r["sw"] for r in rows if r["mixture"] == name and r["calls"] == 0)
        lines += [f"{name} (two exact draws: {floor:.3g})", "",
                  "| method | " + " | ".join(f"{c} calls" for c in BUDGETS) + " |",
                  "|---|" + "---|" * len(BUDGETS)]
        for method in METHODS:
            values = [next(r["sw"] for r in rows if (r["mixture"], r["method"], r["calls"]) == (name, method, c))
                      for c in BUDGETS]
            lines.append(f"| {method} | " + " | ".join(f"{v:.3g}" for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "stochastic.json"))
    args = parser.parse_args()
    rows = study(args.samples)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
