"""Kill sampling and training with SIGKILL at random moments, rerun the same command until it finishes, and check
that nothing was lost or damaged and that the result equals an uninterrupted run's.

    python scripts/fault_injection.py --trials 50            # both parts; a trial is up to max_kills + 1 runs
    python scripts/fault_injection.py --what train --trials 10 --max_kills 5

Sampling: `pndm-fast --config digits --total_num 24 --batch_size 4 --sample_step 5` into a fresh folder per
trial. After every kill each file under a final name must be a whole image; at the end there must be exactly
total_num of them, pixel-identical to the uninterrupted run's.

Training: a copy of the digits config shrunk to 8x8 images with save_every 2, `--runner train --max_steps 12`.
After every kill train_state.pt must load and its step must not go back; the run then goes on with --restart
(or, when no train_state.pt was written yet, from scratch), and the final train_state.pt and ema.ckpt must equal
the uninterrupted run's bit for bit. Half of the kills wait for a save to begin (a temporary file of
train_state.pt or ema.ckpt appearing after a random delay) and strike then; a kill counts as "during a save" when
it leaves that temporary file behind. A run that ends before its kill is due simply counts as finished.

Every process runs with OMP_NUM_THREADS=1: the thread count changes how convolutions sum, and the comparisons
are exact. Prints one line per part and exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import yaml

from pndm_fast import load_config
from pndm_fast.atomic import TEMP_NAME
from pndm_fast.images import read_png
from pndm_fast.runners.sample import image_name, image_shape
from pndm_fast.runners.train import EMA_FILE, STATE_FILE

SAMPLE_TOTAL, SAMPLE_BATCH, SAMPLE_STEPS = 24, 4, 5
TRAIN_STEPS, SAVE_EVERY = 12, 2


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def sample_command(folder: str) -> list[str]:
    return [sys.executable, "-m", "pndm_fast", "--config", "digits", "--total_num", str(SAMPLE_TOTAL),
            "--batch_size", str(SAMPLE_BATCH), "--sample_step", str(SAMPLE_STEPS), "--device", "cpu",
            "--no_progress", "--image_path", folder]


def tiny_train_config() -> dict:
    """digits.yml shrunk to 8x8 images, batch 16, the smallest UNet GroupNorm(32) allows, a save every 2 steps."""
    config = copy.deepcopy(load_config("digits"))
    config["Dataset"].update(image_size=8, batch_size=16)
    config["Model"].update(image_size=8, ch=32, ch_mult=[1, 2], attn_resolutions=[4])
    config["Train"].update(save_every=SAVE_EVERY, ema_rate=0.9)
    config["Optim"]["lr"] = 1e-3
    config.pop("Sample", None)
    return config


def train_command(config_path: str, folder: str, restart: bool, max_steps: int = TRAIN_STEPS) -> list[str]:
    return [sys.executable, "-m", "pndm_fast", "--runner", "train", "--config", config_path, "--train_path", folder,
            "--max_steps", str(max_steps), "--device", "cpu", "--no_progress"] + (["--restart"] if restart else [])


def run_to_end(cmd: list[str]) -> float:
    """Run `cmd` uninterrupted; returns its wall time."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fault_injection: {' '.join(cmd)} failed: {done.stderr.strip()}")
    return time.perf_counter() - start


def temp_files(folder: str, names: tuple[str, ...] | None = None) -> set[str]:
    """atomic_path's temporary files in `folder` (for the final names `names` only, when given)."""
    if not os.path.isdir(folder):
        return set()
    return {entry for entry in os.listdir(folder)
            if (m := TEMP_NAME.match(entry)) and (names is None or m["name"] in names)}


def launch_and_kill(cmd: list[str], delay: float, watch: tuple[str, tuple[str, ...]] | None = None,
                    armed_by: str | None = None, limit: float = 120.0) -> bool:
    """Start `cmd` and SIGKILL it after `delay` seconds; with `watch` = (folder, names), wait `delay` seconds (and
    for the file `armed_by` to exist, when given) and then strike as soon as a new temporary file of `names`
    appears, i.e. while a save is being written. Returns whether it was killed (False: it finished first, and
    must have succeeded)."""
    before = temp_files(watch[0], watch[1]) if watch else set()
    proc = subprocess.Popen(cmd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.perf_counter()
    while proc.poll() is None:
        elapsed = time.perf_counter() - start
        if elapsed > limit:
            break
        if elapsed >= delay:
            if watch is None:
                break
            if (armed_by is None or os.path.exists(armed_by)) and temp_files(watch[0], watch[1]) - before:
                break
        # 0.5 ms between looks: a save of the tiny model spends several ms between creating its temporary
        # file and renaming it (the fsync alone is about 3 ms)
        time.sleep(0.0005 if watch else 0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        return True
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"fault_injection: {' '.join(cmd)} failed on its own: {err.strip()}")
    return False


def final_images(folder: str, shape: tuple[int, int, int]) -> tuple[dict[str, np.ndarray], int]:
    """The whole images under final names in `folder`, and how many files under final names are not whole."""
    whole, corrupt = {}, 0
    for index in range(SAMPLE_TOTAL):
        path = os.path.join(folder, image_name(index))
        if os.path.lexists(path):
            read = read_png(path, shape)
            if read is None:
                corrupt += 1
            else:
                whole[image_name(index)] = read[0]
    return whole, corrupt


def sampling_trials(trials: int, max_kills: int, work: str, rng: random.Random) -> bool:
    shape = image_shape(load_config("digits"))
    reference_dir = os.path.join(work, "sample-reference")
    span = run_to_end(sample_command(reference_dir))  # the kill delays are drawn over one whole run
    reference, _ = final_images(reference_dir, shape)
    kills = lost = corrupt = differ = leftovers = 0
    for trial in range(trials):
        folder = os.path.join(work, f"sample-{trial}")
        for attempt in range(max_kills + 1):
            if attempt == max_kills:
                run_to_end(sample_command(folder))
                break
            if not launch_and_kill(sample_command(folder), rng.uniform(0, span), limit=span * 20):
                break
            kills += 1
            corrupt += final_images(folder, shape)[1]  # a kill must never leave a partial file under its name
        images, bad = final_images(folder, shape)
        corrupt += bad
        lost += SAMPLE_TOTAL - len(images)
        differ += sum(not np.array_equal(image, reference[name]) for name, image in images.items())
        leftovers += len(temp_files(folder))
        shutil.rmtree(folder)
        print(f"sampling trial {trial + 1}/{trials}: {kills} kills, {lost} lost, {corrupt} corrupt so far",
              file=sys.stderr, flush=True)
    ok = lost == corrupt == differ == leftovers == 0
    print(f"sampling: {trials} trials, {kills} kills, {lost} images lost, {corrupt} corrupt, {differ} differing "
          f"from the uninterrupted run, {leftovers} temporary files left")
    return ok


def load_state(path: str) -> dict | None:
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to load is what this script counts as a broken checkpoint
        return None


def bitwise_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))
    return a == b


def same_training(folder: str, reference: str) -> bool:
    """The final train_state.pt (model, optimizer, EMA, step) and ema.ckpt equal the reference's bit for bit."""
    a, b = load_state(os.path.join(folder, STATE_FILE)), load_state(os.path.join(reference, STATE_FILE))
    if a is None or b is None:
        return False
    keys = ("model", "optimizer", "ema", "step", "epoch", "batch")
    return all(bitwise_equal(a[k], b[k]) for k in keys) and bitwise_equal(
        load_state(os.path.join(folder, EMA_FILE)), load_state(os.path.join(reference, EMA_FILE)))


def relaunch_command(config_path: str, folder: str, max_steps: int = TRAIN_STEPS) -> list[str]:
    """--restart when a train_state.pt exists, else a fresh start (the run was killed before its first save)."""
    restart = os.path.exists(os.path.join(folder, STATE_FILE))
    return train_command(config_path, folder, restart=restart, max_steps=max_steps)


def check_after_kill(folder: str, last_step: int) -> tuple[bool, int]:
    """(intact, step): train_state.pt, when there, loads and has not gone back from `last_step`."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.exists(path):
        return last_step == 0, 0
    state = load_state(path)
    if state is None or state["step"] < last_step:
        return False, last_step
    return True, state["step"]


def training_trials(trials: int, max_kills: int, work: str, rng: random.Random) -> bool:
    config_path = os.path.join(work, "tiny-digits.yml")
    with open(config_path, "w") as f:
        yaml.safe_dump(tiny_train_config(), f)
    reference = os.path.join(work, "train-reference")
    span = run_to_end(train_command(config_path, reference, restart=False))
    kills = during_save = broken = unequal = fresh_restarts = 0
    saves = (STATE_FILE, EMA_FILE)
    for trial in range(trials):
        folder = os.path.join(work, f"train-{trial}")
        last_step = 0
        for attempt in range(max_kills + 1):
            cmd = relaunch_command(config_path, folder)
            fresh_restarts += attempt > 0 and "--restart" not in cmd
            if attempt == max_kills:
                run_to_end(cmd)
                break
            before = temp_files(folder, saves)
            # half strike at a random moment, half at the first save that begins after a random moment
            at_save = rng.random() < 0.5
            killed = launch_and_kill(cmd, rng.uniform(0, span), watch=(folder, saves) if at_save else None,
                                     limit=span * 20)
            if not killed:
                break
            kills += 1
            during_save += bool(temp_files(folder, saves) - before)
            intact, last_step = check_after_kill(folder, last_step)
            broken += not intact
        unequal += not same_training(folder, reference)
        shutil.rmtree(folder)
        print(f"training trial {trial + 1}/{trials}: {kills} kills ({during_save} during a save), {broken} broken, "
              f"{unequal} unequal so far", file=sys.stderr, flush=True)
    ok = broken == unequal == 0
    print(f"training: {trials} trials, {kills} kills ({during_save} during a save), {broken} broken checkpoints, "
          f"{fresh_restarts} fresh starts after a kill before the first checkpoint, final weights bitwise equal "
          f"to the uninterrupted run in {trials - unequal} of {trials}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50, help="trials per part")
    p.add_argument("--max_kills", type=int, default=3, help="kills per trial before the run may finish")
    p.add_argument("--what", choices=("sample", "train", "both"), default="both")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    p.add_argument("--work", help="folder for the runs (default: a temporary folder, removed at the end)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work or tempfile.mkdtemp(prefix="fault-injection-")
    try:
        ok = True
        if args.what in ("sample", "both"):
            ok &= sampling_trials(args.trials, args.max_kills, work, rng)
        if args.what in ("train", "both"):
            ok &= training_trials(args.trials, args.max_kills, work, rng)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
