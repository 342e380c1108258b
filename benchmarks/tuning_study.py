"""The tuner side by side with diffusers and the static table, on the digits UNets.

Per model (the unconditional digits UNet, and the class-conditional one at guidance 2) and budget of model calls,
three samplers: the best diffusers configuration (every configuration of pndm_fast/tuning/peers.py, run by
pndm_fast's equal methods, the best on these very noises), the static table (`auto` without a profile,
pndm_fast/auto.py) and the bundled tuned profile (a budget it lacks runs its largest entry below). Each is scored
by its error against the teacher on the profile's validation noises (images 32-63 of seed 0, which its selection
never saw), and by the Frechet distance (FD) of `--num` digits from other noises (seed 1) to the real digits.

Time to the FD target: the target is an FD at most 1.1 times the converged digits' (the teacher's method at 50
steps from the same noises); each side's time is the wall time of `--num` digits at the fewest calls of the study
whose FD reaches it. pndm_fast samples with its fused backend; diffusers runs its own scheduler loop
(scale_model_input, the UNet, step) on the same UNet, noise and machine, in this one run.

    python benchmarks/tuning_study.py [--models digits digits-cond] [--budgets 4 5 6 8 10 15 20] [--num 1000]
        [--reuse: keep the saved rows, measure the time to the FD target again]

Needs diffusers. Writes benchmarks/results/tuning_study.json, docs/tuning_study.png and its section of
docs/tuning.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a script from anywhere, like the other benchmarks
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from benchmarks.digits_quality import Scorer  # noqa: E402
from pndm_fast import auto  # noqa: E402
from pndm_fast.config import load_config  # noqa: E402
from pndm_fast.images import to_uint8  # noqa: E402
from pndm_fast.methods import method_record  # noqa: E402
from pndm_fast.runners.conditioning import denoiser_for  # noqa: E402
from pndm_fast.runners.sample import noise_for, open_source  # noqa: E402
from pndm_fast.sampling import sample  # noqa: E402
from pndm_fast.tuning.peers import CONFIGS, peer_candidates  # noqa: E402
from pndm_fast.tuning.profile import bundled_profile_named  # noqa: E402
from pndm_fast.tuning.teacher import METHOD as CONVERGED, Teacher, relative_error, teacher_grid  # noqa: E402

MODELS = {"digits": None, "digits-cond": 2.0}  # config -> guidance (None: unconditional)
SIDES = ("diffusers", "static", "tuned")
TUNING_NOISES = (32, 32)  # the tune command's selection and validation noises (images 0-63 of seed 0)
CONVERGED_STEPS = 50  # the converged digits: the teacher's method on its grid of this many steps
TARGET = 1.1  # the FD target: at most this times the converged digits' FD


class Setup:
    """One model: its network, schedule, the Denoiser for a set of image indices, and the bundled profile."""

    def __init__(self, config: str, guidance: float | None):
        self.config, self.guidance = config, guidance
        self.source = open_source(load_config(config), None, "cpu", "fp32")
        self.schedule, self.shape = self.source.schedule, self.source.shape
        self.profile = bundled_profile_named(config, guidance or 1.0)

    def model(self, count: int, first: int = 0):
        """The Denoiser for images first .. first + count - 1 (classes as `--class all` gives them in the tune
        command: image i has class i mod classes)."""
        if self.guidance is None:
            return denoiser_for(self.source, None, 1.0)
        labels = torch.arange(first, first + count) % self.source.num_classes
        return denoiser_for(self.source, labels, self.guidance)

    def choices(self, budget: int) -> dict:
        """side -> (method, grid, label) at `budget` calls; the diffusers side lists every configuration."""
        method, grid = auto.choose(self.schedule, budget)
        tuned_method, tuned_grid = self.profile.choice(self.schedule, budget)
        entry = self.profile.budgets[max(b for b in self.profile.budgets if b <= budget)]
        return {"static": [(method.name, grid, f"{method.name} on {grid.name}")],
                "tuned": [(tuned_method, tuned_grid, entry["label"])],
                "diffusers": [(c.method, c.grid, c.label) for c in peer_candidates(self.schedule, budget)]}


def diffusers_loop(setup: Setup, label: str, budget: int, noise: torch.Tensor) -> torch.Tensor:
    """diffusers' own loop for configuration `label` (pndm_fast/tuning/peers.py) on the same UNet."""
    import diffusers

    cls_name, settings, _, _ = CONFIGS[label.removeprefix("diffusers ")]
    schedule = setup.schedule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = getattr(diffusers, cls_name)(num_train_timesteps=schedule.num_steps,
                                                 trained_betas=schedule.betas.double().numpy(), **settings)
        scheduler.set_timesteps(budget)
        model = setup.model(len(noise))
        x = noise * scheduler.init_noise_sigma
        with torch.inference_mode():
            for t in scheduler.timesteps:
                times = torch.full((len(x),), float(t))
                inputs = scheduler.scale_model_input(x, t)
                if setup.guidance is None:
                    eps = setup.source.net(inputs, times)
                else:
                    cond = setup.source.net(inputs, times, **model.cond)
                    uncond = setup.source.net(inputs, times, **model.uncond)
                    eps = uncond + setup.guidance * (cond - uncond)
                x = scheduler.step(eps, t, x).prev_sample
    return x


class Digits:
    """`num` digits of seed 1 from one model: sampled with pndm_fast, and their FD to the real digits."""

    def __init__(self, setup: Setup, num: int, scorer: Scorer):
        self.setup, self.noise, self.model = setup, noise_for(range(num), setup.shape, 1), setup.model(num)
        self.scorer = scorer

    def sample(self, method, grid) -> torch.Tensor:
        return run(self.setup, self.model, self.noise, method, grid)

    def fd(self, images: torch.Tensor) -> float:
        return float(self.scorer.score(to_uint8(images)[..., 0])["fd"])


def run(setup: Setup, model, noise, method, grid) -> torch.Tensor:
    with torch.inference_mode():
        return sample(model, noise, setup.schedule, method, backend="fused", timesteps=grid)


def study_model(setup: Setup, budgets: list[int], num: int, scorer: Scorer, log) -> dict:
    selection, validation = TUNING_NOISES
    total = selection + validation
    val_noise = noise_for(range(selection, total), setup.shape, 0)
    val_model = setup.model(validation, selection)
    begin = time.perf_counter()
    teacher = Teacher.solve(val_model, val_noise, setup.schedule, 100)
    log(f"{setup.config}: teacher error {teacher.error:.1e} ({time.perf_counter() - begin:.0f} s)")
    digits = Digits(setup, num, scorer)
    rows = []
    for budget in budgets:
        for side, options in setup.choices(budget).items():
            scored = [(relative_error(run(setup, val_model, val_noise, m, g), teacher.x), m, g, label)
                      for m, g, label in options]
            error, method, grid, label = min(scored, key=lambda s: s[0])
            calls = method_record(method).plan(grid).model_calls
            rows.append({"model": setup.config, "budget": budget, "side": side, "label": label, "calls": calls,
                         "error": error, "fd": digits.fd(digits.sample(method, grid))})
            log(f"{setup.config} {budget} calls {side}: {label}, error {error:.4g}, FD {rows[-1]['fd']:.3g}")
    converged = digits.fd(digits.sample(CONVERGED, teacher_grid(setup.schedule, CONVERGED_STEPS)))
    log(f"{setup.config}: converged FD {converged:.3g}")
    return {"rows": rows, "time_to_target": time_to_target(setup, rows, digits, converged),
            "tuning": tuning_cost(setup.profile), "teacher_error": teacher.error}


def time_to_target(setup: Setup, rows: list[dict], digits: Digits, converged: float) -> dict:
    """Per side, the fewest calls whose FD is at most TARGET times the converged FD (and the fewest from which every
    larger budget of the study stays there), and the wall time of the tuned profile's and diffusers' digits at the
    first, diffusers in its own loop (its FD measured again there), the fastest of three runs each."""
    out = {"converged": converged, "target": TARGET * converged}
    for side in SIDES:
        mine = sorted((r for r in rows if r["side"] == side), key=lambda r: r["budget"])
        reached = [r for r in mine if r["fd"] <= out["target"]]
        stays = [r for k, r in enumerate(mine) if all(later["fd"] <= out["target"] for later in mine[k:])]
        out[side] = None if not reached else {"budget": reached[0]["budget"], "label": reached[0]["label"],
                                              "fd": reached[0]["fd"], "calls": reached[0]["calls"],
                                              "stays_from": stays[0]["budget"] if stays else None}
    # Under guidance the converged digits are not the ones of lowest FD (docs/tuning.md): timed without it only
    if out["diffusers"] and out["tuned"] and setup.guidance is None:
        theirs, ours = out["diffusers"], out["tuned"]
        theirs["fd_own_loop"] = digits.fd(diffusers_loop(setup, theirs["label"], theirs["budget"], digits.noise))
        method, grid = setup.profile.choice(setup.schedule, ours["budget"])
        theirs["seconds"] = fastest(lambda: diffusers_loop(setup, theirs["label"], theirs["budget"], digits.noise))
        ours["seconds"] = fastest(lambda: digits.sample(method, grid))
        out["speedup"] = theirs["seconds"] / ours["seconds"]
    return out


def fastest(work, repeats: int = 3) -> float:
    """The least wall time of `repeats` runs of work()."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return min(times)


def tuning_cost(profile) -> dict:
    budgets = profile.budgets
    return {"seconds": sum(e.get("seconds", 0.0) for e in budgets.values()),
            "forwards": sum(e.get("tuning_forwards", 0) for e in budgets.values()),
            "budgets": sorted(budgets), "info": profile.info}


def render(results: dict, command: str, num: int) -> str:
    lines = ["## Side by side: diffusers' best, the static table and the tuned profile", "",
             f"`{command}`: validated error against the teacher (32 noises the tuner's selection never saw) and "
             f"the digits FD ({num} digits of seed 1 against the 1797 real ones); the diffusers column is the best "
             "of its configurations on these very noises (by error; its FD is that configuration's).", ""]
    for name, result in results.items():
        by = {(r["budget"], r["side"]): r for r in result["rows"]}
        budgets = sorted({r["budget"] for r in result["rows"]})
        lines += [f"### {name}" + (f" (guidance {MODELS[name]:g})" if MODELS[name] else ""), "",
                  "| calls | diffusers' best | error | FD | static table error | FD | tuned | error | FD | "
                  "tuned / diffusers error |", "|---|---|---|---|---|---|---|---|---|---|"]
        for b in budgets:
            d, s, t = by[(b, "diffusers")], by[(b, "static")], by[(b, "tuned")]
            lines.append(f"| {b} | {d['label'].removeprefix('diffusers ')} | {d['error']:.4f} | {d['fd']:.2f} | "
                         f"{s['error']:.4f} | {s['fd']:.2f} | {t['label']} | {t['error']:.4f} | {t['fd']:.2f} | "
                         f"{t['error'] / d['error']:.2f} |")
        reach = result["time_to_target"]
        first = ", ".join(f"{side} at {reach[side]['budget']} calls (every budget from {reach[side]['stays_from']})"
                          if reach[side] else f"{side} never" for side in SIDES)
        lines += ["", f"- FD target: at most {reach['target']:.2f}, {TARGET:g} times the converged digits' "
                  f"{reach['converged']:.2f} (the teacher's method at {CONVERGED_STEPS} steps, same noises). First "
                  f"reached: {first}."]
        if reach.get("speedup"):
            d, t = reach["diffusers"], reach["tuned"]
            lines.append(f"- Time to it, {num} digits: diffusers' {d['label'].removeprefix('diffusers ')} in its own "
                         f"loop {d['seconds']:.2f} s (FD there {d['fd_own_loop']:.2f}), the tuned profile "
                         f"{t['seconds']:.2f} s: {reach['speedup']:.2f}x faster.")
        cost = result["tuning"]
        lines.append(f"- Tuning (the bundled profile, budgets {', '.join(map(str, cost['budgets']))}): "
                     f"{cost['forwards']:,} image-forwards, {cost['seconds'] / 60:.1f} minutes as recorded.")
        lines.append("")
    lines.append("![side by side](tuning_study.png)")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> str | None:
    panels = []
    for name, result in results.items():
        errors = common.Panel(f"{name}: error against the teacher", "model calls", "relative error")
        fds = common.Panel(f"{name}: digits FD", "model calls", "FD", logy=False)
        for row in result["rows"]:
            errors.add(row["side"], row["budget"], row["error"])
            fds.add(row["side"], row["budget"], row["fd"])
        panels += [errors, fds]
    return common.save_plot(path, panels)


def main(argv: list[str] | None = None, log=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 5, 6, 8, 10, 15, 20])
    p.add_argument("--num", type=int, default=1000, help="digits per FD cell")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "tuning.md")
    p.add_argument("--reuse", action="store_true", help="keep the saved rows; measure the time to the target again")
    args = p.parse_args(argv)
    if importlib.util.find_spec("diffusers") is None:
        p.error("the study compares with diffusers' schedulers: pip install diffusers")
    saved, scorer = args.out / "tuning_study.json", Scorer()
    if args.reuse:
        results = json.loads(saved.read_text())
        for name, result in results.items():
            setup = Setup(name, MODELS[name])
            result["time_to_target"] = time_to_target(setup, result["rows"], Digits(setup, args.num, scorer),
                                                      result["time_to_target"]["converged"])
    else:
        results = {name: study_model(Setup(name, MODELS[name]), sorted(args.budgets), args.num, scorer, log)
                   for name in args.models}
    args.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=1, default=str))
    note = plot(results, args.doc.parent / "tuning_study.png")
    if note:
        log(note)
    command = " ".join(["python benchmarks/tuning_study.py", *(a for a in argv or [] if a != "--reuse")])
    common.write_marked_section(args.doc, "benchmarks/tuning_study.py", render(results, command, args.num))
    return results


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1:])
