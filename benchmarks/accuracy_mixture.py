"""Accuracy against steps on a Gaussian mixture, whose eps and probability-flow ODE are known exactly.

Every method of pndm_fast.METHODS samples from the same float64 noise with the mixture's exact
eps-predictor (mixture.MixtureEps), at 5, 10, 20, 50 and 100 steps, on the fused backend with a
float64 state. Each run is compared with two float64 RK4 solutions of the ODE from the run's own start time
seq[-1]: (a) "true", the probability-flow ODE with eps at the state's own noise level, and (b) "sampler", the ODE
the samplers discretise (state at ac(t + 1), model at ac(t)), followed by the final one-index step. Error is the
relative L2 distance of each sample's x, averaged over the batch; the order is the log-log slope of error
against steps over 20 to 100 steps.

    python benchmarks/accuracy_mixture.py [--quick | --smoke] [--out DIR] [--batch N] [--mixtures A,B] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
from pndm_fast import Schedule, load_config
from pndm_fast.grids import PAPER, TimeGrid
from pndm_fast.methods import METHODS, build_plan
from mixture import MIXTURES, SAMPLER, TRUE, MixtureEps, exact_solutions
from pndm_fast.sampling import sample

NAME = "accuracy_mixture"
DOCS = Path(__file__).resolve().parent.parent / "docs"
STEPS = {"full": (5, 10, 20, 50, 100), "quick": (5, 10, 20, 50, 100), "smoke": (5, 10, 20)}
BATCH = {"full": {"ring-2d": 256, "images-3x8x8": 64, "pairs-16d": 128},
         "quick": {"ring-2d": 16, "images-3x8x8": 8, "pairs-16d": 16},
         "smoke": {"ring-2d": 4, "images-3x8x8": 2, "pairs-16d": 4}}
PAGE_MIXTURES = ("ring-2d", "images-3x8x8")  # the page's; pairs-16d is the side-by-side study's held-out one
FIT_FROM = 20  # orders are fitted over the refined range: this many steps and more
# DDIM at the finest step counts the sampler allows, for the paper's "F-PNDM at 50 steps beats DDIM at 1000":
# 500 steps (skip 2, start 998) through sample(); 1000 steps would put t = 999 in seq, whose transfer reads
# ac[1000] past the table, so the finest is DDIM's own plan on the time steps 0..998 (999 steps, skip 1).
DDIM_FINE = {"full": (500, 999), "quick": (500, 999), "smoke": ()}
H0 = 0.005  # RK4 steps of at most 0.005 in log sigma: refine 1 -> 2 changes x by ~1e-11 (table below)
MID = 200  # a time on every run's grid (seq holds the multiples of 200 for 5 to 100 steps), far from the data
CHECK = 32  # noises on which the exact solutions' convergence (refine 1 -> 2) is measured
# (row key, convention, time): the error of the state at `time` (-1: the final x) against that exact solution
ERROR_KEYS = tuple((f"err_{conv}_{name}", conv, t) for conv in (SAMPLER, TRUE)
                   for name, t in (("t200", MID), ("t0", 0), ("final", -1)))
LABELS = {SAMPLER: "(b)", TRUE: "(a)", "t200": f"t={MID}", "t0": "t=0", "final": "final"}


def relative_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over the batch of ||x_i - exact_i|| / ||exact_i||; x, exact (B, d) float64."""
    return (torch.linalg.vector_norm(x - exact, dim=1) / torch.linalg.vector_norm(exact, dim=1)).mean().item()


def fitted_order(steps: list[int], errors: list[float]) -> float | None:
    """-slope of log(error) against log(steps) by least squares over steps >= FIT_FROM (needs 2 points)."""
    pts = [(math.log(s), math.log(e)) for s, e in zip(steps, errors) if s >= FIT_FROM and e > 0]
    if len(pts) < 2:
        return None
    xs, ys = np.array(pts).T
    return -float(np.polyfit(xs, ys, 1)[0])


def convergence_rows(mixture_name: str, coarse: dict, fine: dict, schedule: Schedule) -> list[dict]:
    """One row per (start, convention): the relative change of the ODE solution from refine 1 to refine 2."""
    rows = []
    for (start, conv), xs in sorted(coarse.items(), reverse=True):
        rows.append({"mixture": mixture_name, "start": start, "convention": conv,
                     "rk4_steps": f"{rk4_steps(schedule, start, 1)} -> {rk4_steps(schedule, start, 2)}",
                     **{f"change_{name}": relative_error(xs[t], fine[start, conv][t])
                        for name, t in (("t200", MID), ("t0", 0), ("final", -1))}})
    return rows


def rk4_steps(schedule: Schedule, start: int, refine: int) -> int:
    """The RK4 steps exact_solutions takes from `start` down to t = -1 (the true convention's count)."""
    logac = np.log(schedule.alphas_cumprod.double().numpy())
    lam = 0.5 * np.log(np.expm1(-logac[: start + 2]))
    return int(sum(refine * max(1, math.ceil(abs(d) / H0)) for d in np.diff(lam)))


def run_fine_ddim(model, noise4d, schedule, steps: int):
    """DDIM at `steps` (500 or 999): ({t: x (B, d)} at the recorded times, model calls, start)."""
    if steps <= schedule.num_steps // 2:
        plan = build_plan(schedule, "DDIM", steps)
        traj = sample(model, noise4d, schedule, "DDIM", steps, backend="fused", return_trajectory=True)
    else:  # skip 1 from t = 998: the last time step whose transfer stays inside the paper's table
        grid = TimeGrid(schedule, tuple(float(t) for t in range(schedule.num_steps - 2, -2, -1)), PAPER, "uniform")
        plan = METHODS["DDIM"].plan(grid)
        traj = sample(model, noise4d, schedule, "DDIM", backend="fused", return_trajectory=True, timesteps=grid)
    return states(traj, plan.seq), plan.model_calls, plan.seq[-1]


def states(trajectory: torch.Tensor, seq: tuple[int, ...]) -> dict:
    """{t: x (B, d)} for the recorded times: trajectory entry i is the state at seq[-1 - i], the last x at -1."""
    return {t: trajectory[len(seq) - 1 - seq.index(t) if t >= 0 else -1].flatten(1) for t in (MID, 0, -1)}


def study(mixture_name: str, mode: str, batch: int, schedule: Schedule, log) -> tuple[list[dict], list[dict], dict]:
    """(error rows, ODE convergence rows, panels by name) for one mixture."""
    mixture = MIXTURES[mixture_name]()
    model = MixtureEps(mixture, schedule).eval()
    gen = torch.Generator().manual_seed(1234)
    noise4d = torch.randn((batch, *mixture.shape), generator=gen, dtype=torch.float64)
    noise = noise4d.flatten(1)

    runs = []  # (method label, steps, nfe, start, {t: x})
    for method in METHODS:
        for steps in STEPS[mode]:
            plan = build_plan(schedule, method, steps)
            traj = sample(model, noise4d, schedule, method, steps, backend="fused", return_trajectory=True)
            runs.append((method, steps, plan.model_calls, plan.seq[-1], states(traj, plan.seq)))
    for steps in DDIM_FINE[mode]:
        xs, nfe, start = run_fine_ddim(model, noise4d, schedule, steps)
        runs.append(("DDIM (fine)", steps, nfe, start, xs))
    starts = sorted({r[3] for r in runs})
    log(f"{mixture_name}: {len(runs)} sampler runs done; float64 ODE from starts {starts}, batch {batch}")

    t_start = time.perf_counter()
    exact = exact_solutions(mixture, schedule, noise, starts, refine=1, h0=H0, at=(MID, 0))
    # The convergence check on the first CHECK noises: refine 1 (the reference used) against refine 2.
    check = noise[:CHECK]
    fine = exact_solutions(mixture, schedule, check, starts, refine=2, h0=H0, at=(MID, 0))
    coarse = {key: {t: x[:CHECK] for t, x in xs.items()} for key, xs in exact.items()}
    log(f"{mixture_name}: ODE solves took {time.perf_counter() - t_start:.0f} s")
    conv_rows = convergence_rows(mixture_name, coarse, fine, schedule)

    rows = []
    for method, steps, nfe, start, xs in runs:
        row = {"mixture": mixture_name, "method": method, "steps": steps, "nfe": nfe, "start": start,
               "batch": batch}
        for key, conv, t in ERROR_KEYS:
            row[key] = relative_error(xs[t], exact[start, conv][t])
        rows.append(row)

    panels = {}
    titles = {"err_sampler_t200": f"vs (b) sampler-convention ODE, x at t = {MID}",
              "err_sampler_final": "vs (b) sampler-convention ODE, final x",
              "err_true_final": "vs (a) true probability-flow ODE, final x"}
    for key, title in titles.items():
        panel = common.Panel(f"{mixture_name}: {title}", "model calls (NFE)", "relative L2 error",
                             dashed=("DDIM (fine)",))
        for row in rows:
            panel.add(row["method"], row["nfe"], row[key])
        panels[key] = panel
    return rows, conv_rows, panels


def order_rows(rows: list[dict]) -> list[dict]:
    """Per mixture and method: the fitted order against each reference and position."""
    out = []
    for mixture in dict.fromkeys(r["mixture"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["mixture"] == mixture):
            if method == "DDIM (fine)":
                continue
            sel = [r for r in rows if r["mixture"] == mixture and r["method"] == method]
            steps = [r["steps"] for r in sel]
            out.append({"mixture": mixture, "method": method,
                        **{f"order_{key[4:]}": fitted_order(steps, [r[key] for r in sel])
                           for key, _, _ in ERROR_KEYS}})
    return out


def _label(key: str) -> str:
    _, conv, name = key.split("_")
    return f"{LABELS[conv]} {LABELS[name]}"


ERROR_COLUMNS = [common.Column("method", "method"), common.Column("steps", "steps"), common.Column("NFE", "nfe"),
                 common.Column("start", "start")] + [common.Column(_label(k), k, "{:.2e}") for k, _, _ in ERROR_KEYS]
ORDER_COLUMNS = [common.Column("method", "method")] + [
    common.Column(_label(k), "order_" + k[4:], "{:.2f}") for k, _, _ in ERROR_KEYS]
CONVERGENCE_COLUMNS = [common.Column("start", "start"), common.Column("convention", "convention"),
                       common.Column("RK4 steps (refine 1 -> 2)", "rk4_steps")] + [
    common.Column(f"change {LABELS[name]}", f"change_{name}", "{:.1e}") for name in ("t200", "t0", "final")]


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches (minutes on a shared 2-core CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny batches, 3 step counts: checks the script runs")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the plots and accuracy_mixture.json")
    parser.add_argument("--batch", type=int, default=None, help="noises per mixture (default: 256 for ring-2d, "
                        "64 for images-3x8x8 in full mode)")
    parser.add_argument("--mixtures", default=",".join(PAGE_MIXTURES), help="comma-separated names from "
                        + ", ".join(MIXTURES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small float64 batches on a shared "
                        "CPU gain nothing from more)")
    return parser


def main(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    """Run the study; returns (markdown, rows). Rows carry the env fields; plots and JSON go to --out."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = arg_parser().parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    torch.set_num_threads(args.threads)
    env = common.env_info(torch.device("cpu"), common.command_line("accuracy_mixture.py", argv))
    schedule = Schedule.from_config(load_config("ddim-cifar10")["Schedule"])
    args.out.mkdir(parents=True, exist_ok=True)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    all_rows = []
    for name in args.mixtures.split(","):
        if name not in MIXTURES:
            raise SystemExit(f"unknown mixture {name!r}: expected one of {', '.join(MIXTURES)}")
        batch = args.batch or BATCH[mode][name]
        rows, conv_rows, panels = study(name, mode, batch, schedule, log)
        note = common.save_plot(args.out / f"accuracy_{name}.png", list(panels.values()))
        if note:
            log(note)
        all_rows += [{**env, "kind": "error", **r} for r in rows]
        all_rows += [{**env, "kind": "order", **r} for r in order_rows(rows)]
        all_rows += [{**env, "kind": "ode", **r} for r in conv_rows]
    common.write_json(args.out / f"{NAME}.json", all_rows)
    text = render(all_rows, args.out)
    print(f"\n{env['command']}\n{env['device']}, torch {env['torch']}\n\n{text}\n", flush=True)
    return text, all_rows


def render(rows: list[dict], out: Path) -> str:
    """The markdown of a study from its rows (as main returns them, or read back from its JSON): per mixture,
    the plot, the fitted orders, the errors and the exact solutions' convergence."""
    sections = []
    for name in dict.fromkeys(r["mixture"] for r in rows):
        mine = [r for r in rows if r["mixture"] == name]
        errors, orders, conv = ([r for r in mine if r["kind"] == kind] for kind in ("error", "order", "ode"))
        mixture = MIXTURES[name]()
        png = out / f"accuracy_{name}.png"
        top = max(r["steps"] for r in errors if r["method"] != "DDIM (fine)")
        sections.append("\n\n".join([
            (f"### {name}: d = {mixture.dim} as {mixture.shape}, {len(mixture.weights)} "
             f"{'isotropic' if mixture.isotropic else 'diagonal'} components, batch {errors[0]['batch']}"),
            f"![error against model calls, {name}]({png.name})" if png.exists() else "(no plot: matplotlib absent)",
            f"Fitted order (-slope of log error against log steps, {FIT_FROM} to {top} steps):",
            common.markdown_table(orders, ORDER_COLUMNS),
            "Errors (relative L2 per sample, mean over the batch):", common.markdown_table(errors, ERROR_COLUMNS),
            (f"Convergence of the float64 exact solutions on the first {CHECK} noises: the relative change when "
             "every RK4 step is halved (refine 1 -> 2). The refine-1 solution is the reference the errors above "
             "are measured against; RK4 being 4th order, its own error is about 16/15 of this change:"),
            common.markdown_table(conv, CONVERGENCE_COLUMNS)]))
    return "\n\n".join(sections)


if __name__ == "__main__":
    main()
