"""Rectified-flow accuracy study: an analytic Gaussian mixture under the flow schedule (x_s = (1 - s) x0 + s eps, SD3's
shift 3), its exact velocity and exact ODE; pndm_fast's methods and grids against FlowMatchEuler and diffusers'
flow-sigma solvers (DPM-Solver++, UniPC) at 4 to 20 model calls.

Every run starts from the same float64 latents (the flow's own state, standard normal as a pipeline draws them) at
its own first time (pndm_fast's and DPM-Solver's s = shifted(1 - 1/N), UniPC's s ~ 1; FlowMatchEuler is given its
own spacing from shifted(1 - 1/N), as s = 1 holds no trace of the data) and ends on the data; its error is the mean
relative L2 distance to the ODE's solution from that start (pndm_fast's DPM-Solver++3M on 4000 log-SNR steps).
pndm_fast's best at a budget is chosen on the tuning mixture (ring-2d) and reported on the held-out one
(pairs-16d) too, against the best diffusers configuration measured in the same run.

    python benchmarks/flow_mixture.py [--batch 256] [--calls 4 5 6 8 10 12 16 20] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
from accuracy_mixture import relative_error
from accuracy_peers import KeepFloat64
from mixture import MIXTURES
from pndm_fast import Denoiser, tune
from pndm_fast.continuous import FlowSchedule
from pndm_fast.grids import make_grid
from pndm_fast.levels import Level
from pndm_fast.methods import fit_grid, method_record
from pndm_fast.sampling import sample

SHIFT = 3.0
SCHEDULE = FlowSchedule(SHIFT)
CALLS = (4, 5, 6, 8, 10, 12, 16, 20)
TUNED = "pndm_fast tuned"
TUNED_ON, HELD_OUT = "ring-2d", "pairs-16d"
OURS = tuple((m, g) for m in ("DDIM", "DPM-Solver++2M", "DPM-Solver++3M", "UniPC-bh1", "UniPC-bh2", "iPNDM",
                              "DEIS", "PNDM-exact", "Heun")
             for g in ("uniform", "logsnr", "karras", "quadratic"))
PEERS = {"FlowMatchEuler": ("FlowMatchEulerDiscreteScheduler", {}),
         **{f"DPM++{o}M flow": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=o))
            for o in (2, 3)},
         **{f"UniPC-{v} {o} flow": ("UniPCMultistepScheduler", dict(solver_type=v, solver_order=o))
            for v in ("bh1", "bh2") for o in (2, 3)}}


def velocity(mixture):
    """The mixture's exact flow network: at x_s (B, C, H, W) and time s, the velocity E[eps - x0 | x_s]."""
    def net(x, t):
        s = float(t[0])
        level = Level.of(SCHEDULE.alpha(s))
        vp = x * (level.alpha + level.sigma)  # the variance-preserving state
        a = torch.full((x.shape[0],), level.ac, dtype=torch.float64)
        eps = mixture.eps(vp.reshape(x.shape[0], -1), a, torch.full_like(a, level.one_minus_ac)).reshape(x.shape)
        return eps - (vp - level.sigma * eps) / level.alpha
    return net


def start_latents(mixture, batch: int, seed: int = 0) -> torch.Tensor:
    """The starting latents, standard normal as a pipeline draws them: the flow's own state at the first time."""
    return torch.randn(batch, *mixture.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def as_noise(latents: torch.Tensor, s: float) -> torch.Tensor:
    """The variance-preserving state of the flow state `latents` at time s: sample()'s noise."""
    level = Level.of(SCHEDULE.alpha(s))
    return latents * (level.alpha + level.sigma)


def ours(net, latents, method: str, grid: str, calls: int) -> tuple[float, torch.Tensor]:
    """(start time, final state) of pndm_fast's `method` on `grid` fitted to `calls` model calls."""
    fitted = fit_grid(method_record(method), calls, lambda steps: make_grid(SCHEDULE, grid, steps))
    start = fitted.times[0]
    return start, sample(Denoiser(net, "flow"), as_noise(latents, start), SCHEDULE, method, timesteps=fitted,
                         backend="fused")


def peer(net, latents, cls_name: str, settings: dict, calls: int) -> tuple[float, torch.Tensor]:
    """(start time, final state) of a diffusers scheduler's loop in float64 (its float32 casts and sigmas kept in
    float64, docs/peers.md) from the latents: FlowMatchEuler on its own spacing from shifted(1 - 1/N), the
    flow-sigma solvers on theirs."""
    import diffusers

    if cls_name == "FlowMatchEulerDiscreteScheduler":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)
        unshifted = np.linspace(1 - 1 / SCHEDULE.num_steps, 1 / SCHEDULE.num_steps, calls)
        scheduler.set_timesteps(sigmas=list(unshifted))
    else:
        scheduler = getattr(diffusers, cls_name)(use_flow_sigmas=True, flow_shift=SHIFT,
                                                 prediction_type="flow_prediction", **settings)
        scheduler.set_timesteps(calls)
    scheduler.sigmas = scheduler.sigmas.double()
    x = latents.as_subclass(KeepFloat64)
    for i, t in enumerate(scheduler.timesteps):
        s = float(scheduler.sigmas[i])
        x = scheduler.step(net(x.as_subclass(torch.Tensor), torch.tensor([s])), t, x).prev_sample
    return float(scheduler.sigmas[0]), x.as_subclass(torch.Tensor)


def tuned(net, mixture, calls: tuple[int, ...], log) -> dict:
    """pndm_fast.tune on the mixture's own model (64 noises select, 64 others decide; none of them the study's):
    budget -> (method, grid)."""
    gen = torch.Generator().manual_seed(7)
    noise, validation = (torch.randn(64, *mixture.shape, dtype=torch.float64, generator=gen) for _ in range(2))
    begin = time.perf_counter()
    profile = tune(Denoiser(net, "flow"), SCHEDULE, calls, noise, validation, backend="fused")
    log(f"  tuned {len(calls)} budgets in {time.perf_counter() - begin:.0f} s")
    return {n: profile.choice(SCHEDULE, n) for n in calls}


def truth(net, latents, start: float) -> torch.Tensor:
    """The ODE's solution from the latents at time `start`: DPM-Solver++3M on 4000 log-SNR steps."""
    grid = make_grid(SCHEDULE, "logsnr", 4000, t_max=start)
    return sample(Denoiser(net, "flow"), as_noise(latents, start), SCHEDULE, "DPM-Solver++3M", timesteps=grid,
                  backend="fused")


def study(name: str, batch: int, calls: tuple[int, ...], log) -> dict:
    mixture = MIXTURES[name]()
    net, latents = velocity(mixture), start_latents(mixture, batch)
    truths = {}

    def error(run):
        start, x = run
        if start not in truths:
            truths[start] = truth(net, latents, start).reshape(batch, -1)
        return relative_error(x.reshape(batch, -1), truths[start])

    table, choices = {}, tuned(net, mixture, calls, log)
    for n in calls:
        method, grid = choices[n]
        # the tuner may start later than t_max: its error is against the run from t_max, as its teacher's is
        x = sample(Denoiser(net, "flow"), as_noise(latents, SCHEDULE.t_max), SCHEDULE, method, timesteps=grid,
                   backend="fused")
        row = {TUNED: error((SCHEDULE.t_max, x))}
        for method, grid in OURS:
            try:
                row[f"{method} {grid}"] = error(ours(net, latents, method, grid, n))
            except Exception as problem:  # a method that cannot run in n calls has no entry
                log(f"  {name} {n}: {method} {grid}: {str(problem).splitlines()[0]}")
        for label, (cls_name, settings) in PEERS.items():
            row[label] = error(peer(net, latents, cls_name, settings, n))
        table[n] = row
        log(f"{name} {n} calls: tuned {row[TUNED]:.3g}, ours best {min(v for k, v in fixed(row).items()):.3g}, "
            f"diffusers best {min(row[k] for k in PEERS):.3g}")
    return table


def fixed(errors: dict) -> dict:
    """pndm_fast's fixed configurations (method, grid) of a row."""
    return {k: v for k, v in errors.items() if k not in PEERS and k != TUNED}


def summary(tables: dict) -> list[dict]:
    """Per budget: the best diffusers configuration, pndm_fast's best on each mixture, and on the held-out mixture
    the configuration chosen on the tuning one."""
    rows = []
    for n in tables[TUNED_ON]:
        chosen = min(fixed(tables[TUNED_ON][n]), key=tables[TUNED_ON][n].get)
        row = {"calls": n, "chosen_on_tuning": chosen}
        for name, table in tables.items():
            errors = table[n]
            best_peer = min(PEERS, key=errors.get)
            best_ours = min(fixed(errors), key=errors.get)
            row[name] = {"best_peer": best_peer, "peer_error": errors[best_peer], "best_ours": best_ours,
                         "ours_error": errors[best_ours], "chosen_error": errors[chosen],
                         "ratio_best": errors[best_ours] / errors[best_peer],
                         "ratio_chosen": errors[chosen] / errors[best_peer], "tuned_error": errors[TUNED],
                         "ratio_tuned": errors[TUNED] / errors[best_peer]}
        rows.append(row)
    return rows


def render(rows: list[dict], command: str) -> str:
    lines = ["## Rectified flow: an analytic mixture, pndm_fast against diffusers' flow schedulers", "",
             f"`{command}`: the mixtures' exact velocity under the flow schedule with SD3's shift {SHIFT:g}, every run "
             "from the same latents at its own first time, errors against the ODE's solution from there (mean "
             "relative L2). "
             f"pndm_fast's configuration is chosen on {TUNED_ON} and also reported on {HELD_OUT}, which the choice "
             "never saw; diffusers' best is the best of FlowMatchEuler and its flow-sigma DPM-Solver++ and UniPC "
             "(orders 2 and 3) measured in the same run. **tuned**: `pndm_fast.tune` run on each mixture's own model "
             "(its method and call times measured on 128 other noises, as a user tunes a model), its error against "
             "the run from s = shifted(1 - 1/N) even where it starts later.", "",
             f"| calls | chosen on {TUNED_ON} | {TUNED_ON}: diffusers best | chosen | ratio | tuned | ratio | "
             f"{HELD_OUT}: diffusers best | chosen | ratio | best fixed | ratio | tuned | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, h = r[TUNED_ON], r[HELD_OUT]
        lines.append(f"| {r['calls']} | {r['chosen_on_tuning']} | {t['best_peer']}: {t['peer_error']:.3g} | "
                     f"{t['chosen_error']:.3g} | {t['ratio_chosen']:.2f} | {t['tuned_error']:.3g} | "
                     f"{t['ratio_tuned']:.2f} | {h['best_peer']}: {h['peer_error']:.3g} | {h['chosen_error']:.3g} | "
                     f"{h['ratio_chosen']:.2f} | {h['best_ours']}: {h['ours_error']:.3g} | {h['ratio_best']:.2f} | "
                     f"{h['tuned_error']:.3g} | {h['ratio_tuned']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, log=print) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--calls", type=int, nargs="+", default=list(CALLS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--doc", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "families.md")
    args = p.parse_args(argv)
    begin = time.perf_counter()
    tables = {name: study(name, args.batch, tuple(args.calls), log) for name in (TUNED_ON, HELD_OUT)}
    rows = summary(tables)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flow_mixture.json").write_text(json.dumps({"tables": tables, "summary": rows}, indent=1))
    command = " ".join(["python benchmarks/flow_mixture.py", *(argv or [])])
    common.write_marked_section(args.doc, "benchmarks/flow_mixture.py", render(rows, command))
    log(render(rows, command))
    log(f"{time.perf_counter() - begin:.0f} s")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
