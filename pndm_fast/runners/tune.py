"""`--runner tune`: a profile of the best sampler per budget of model calls for one model (pndm_fast.tuning), saved
after each budget, so that a Ctrl-C keeps every finished budget and the same command continues."""

from __future__ import annotations

import os
import sys

import torch
from tqdm import tqdm

from ..errors import UserError
from ..tuning import Profile, tune
from .conditioning import check_classes, denoiser_for, labels_for
from .sample import DTYPES, check_device, noise_for, open_source

DEFAULT_NOISES = (32, 32)


def parse_counts(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{what} must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{what} must be integers >= 1, got {text!r}")
    return values


def run_tune(config: dict, model_path: str | None, device_name: str, out: str | None, budgets: str,
             noises: str | None, classes: str | None, guidance: float, seed: int, dtype: str = "fp32",
             progress: bool = True, config_name: str = "") -> int:
    """Tune the config's model (or --model_path's) for each budget and write the profile to `out`."""
    if not out:
        raise UserError("--runner tune needs --out PROFILE.json (where the profile is written)")
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a folder: expected a JSON file name, e.g. profile.json")
    wanted = parse_counts(budgets, "--budgets")
    selection, validation = parse_counts(noises, "--noises") if noises else DEFAULT_NOISES
    device = check_device(device_name)
    source = open_source(config, model_path, device, dtype if dtype in DTYPES else "fp32")
    check_classes(source, classes, guidance)
    total = selection + validation
    # one draw: the selection noises are images 0 .. S - 1 of the seed, the validation ones the next V
    noise = noise_for(range(total), source.shape, seed).to(device)
    labels = labels_for(range(total), classes, source.num_classes, total)
    if labels is not None and classes == "all":  # every class in both sets
        labels = torch.arange(total) % source.num_classes
    model = denoiser_for(source, labels, guidance)
    profile = None
    if os.path.exists(out):
        profile = Profile.load(out)
        profile.check(model, source.schedule)
        done = sorted(set(wanted) & set(profile.budgets))
        if done:
            print(f"{out} holds budgets {', '.join(map(str, done))} for this model: continuing with the rest")
    else:
        profile = Profile.for_run(model, source.schedule)
    if model_path is None:  # the config's own weights: `--method auto` finds this profile by the config's name
        profile.info["config"] = config_name
    bar = tqdm(total=len(wanted), unit="budget", disable=not progress, file=sys.stderr)

    def saved(current: Profile) -> None:
        current.save(out)
        bar.update(1)

    with bar:
        profile = tune(model, source.schedule, wanted, noise[:selection], noise[selection:], profile=profile,
                       on_budget=saved, progress=lambda text: bar.set_postfix_str(text[-60:]) if progress else None)
    for budget in wanted:
        entry = profile.budgets[budget]
        peer = entry.get("diffusers")
        versus = (f"; best diffusers ({peer['label'].removeprefix('diffusers ')}) {peer['error']:.4g}, ratio "
                  f"{peer['ratio']:.2f}" if peer else "")
        print(f"{budget} calls: {entry['label']}, validated error {entry['error']:.4g}{versus}")
    print(f"wrote {out}")
    return 0
