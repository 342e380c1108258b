"""Which Lagrange basis makes PNDM-exact most accurate per step at 8-20 steps (docs/multistep.md).

Gaussian data x0 ~ N(0.5, 0.3^2): the probability-flow ODE's exact map is affine (tests/test_multistep.py), so the
global error of each sampler is exact. Grids uniform in lambda from ac = 4e-5 (the noisiest level of the linear
1000-step schedule) to sigma = 0.3 and to ac = 0.9999 (near the data); the error is the max over 13 starting
points in [-3, 3]. Prints one markdown table per target. Usage: python benchmarks/multistep_accuracy.py
"""

import math

import numpy as np
import torch

from pndm_fast import multistep as ms
from multistep_run import run_steps

MU, STD = 0.5, 0.3
STEPS = (8, 10, 12, 15, 20)
TARGETS = {"sigma = 0.3": 0.91, "ac = 0.9999": 0.9999}
START = 4e-5


def eps(x, ac):
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    return sigma * (x - alpha * MU) / (alpha**2 * STD**2 + sigma**2)


def flow(x, a0, a1):
    z = (x - math.sqrt(a0) * MU) / math.sqrt(a0 * STD**2 + 1 - a0)
    return math.sqrt(a1) * MU + math.sqrt(a1 * STD**2 + 1 - a1) * z


def lam(ac):
    return 0.5 * math.log(ac / (1 - ac))


def error(coefficients, grid, prediction):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    out, _ = run_steps(coefficients, x, grid, eps, prediction)
    return float((out[-1] - flow(x, grid[0], grid[-1])).abs().max())


def main():
    methods = {f"PNDM-exact {b}, order {p}": (lambda g, b=b, p=p: ms.pndm_exact(g, p, b), "eps")
               for p in (3, 4) for b in ms.BASES}
    methods["DPM-Solver++(3M)"] = (lambda g: ms.dpm_solver_pp(g, 3, lower_order_final=False), "x0")
    methods["UniPC bh2, order 3"] = (lambda g: ms.unipc(g, 3, "bh2", lower_order_final=False), "x0")
    for target, ac_end in TARGETS.items():
        print(f"\nGlobal error at {target}, grids uniform in lambda from ac = {START}\n")
        print("| method | " + " | ".join(f"{n} steps" for n in STEPS) + " |")
        print("|---|" + "---|" * len(STEPS))
        for name, (make, prediction) in methods.items():
            row = []
            for n in STEPS:
                grid = list(1 / (1 + np.exp(-2 * np.linspace(lam(START), lam(ac_end), n + 1))))
                row.append(f"{error(make(grid), grid, prediction):.2e}")
            print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
