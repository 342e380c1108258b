"""Kill sampling and training with SIGKILL at random moments, rerun the same command until it finishes, and check
that nothing was lost or damaged and that the result equals an uninterrupted run's; then the other faults: two
runs into one folder at once, a full disk, links planted in the output folder, a retrained checkpoint, threads
sampling from one model.

    python scripts/fault_injection.py --trials 50            # every part; a kill trial is up to max_kills + 1 runs
    python scripts/fault_injection.py --what train --trials 10 --max_kills 5
    python scripts/fault_injection.py --what faults --trials 5

Sampling: `pndm-fast --config digits --total_num 24 --batch_size 4 --sample_step 5` into a fresh folder per
trial. After every kill each file under a final name must be a whole image; at the end there must be exactly
total_num of them, pixel-identical to the uninterrupted run's.

Training: a copy of the digits config shrunk to 8x8 images with save_every 2, `--runner train --max_steps 12`.
After every kill train_state.pt must load and its step must not go back; the run then goes on with --restart
(or, when no train_state.pt was written yet, from scratch), and the final train_state.pt and ema.ckpt must equal
the uninterrupted run's bit for bit. Half of the kills wait for a save to begin (a temporary file of
train_state.pt or ema.ckpt appearing after a random delay) and strike then; a kill counts as "during a save" when
it leaves that temporary file behind. A run that ends before its kill is due simply counts as finished.

Faults (each trial runs every one of them once; 8 images, the same tiny training):
- concurrent sampling: two samplers with seeds 0 and 1 started together into one folder. One finishes, the other
  is refused with one line (the folder is locked, or holds the other seed's images); every image must equal the
  winner's uninterrupted run. Concurrent training: the same with two trainings, compared bit for bit.
- full disk: ENOSPC injected at the write call (pndm_fast.atomic._write) from the (n+1)-th file on, n drawn at
  random: the run must end in one line naming the disk, with nothing partial left; the plain rerun completes and
  equals the uninterrupted run. For sampling and for training (there at a random save).
- planted links: links to a victim file under an image's name and under temporary names (old and new style) in
  the image folder, and under temporary names in a training folder. The run must refuse the link under an
  image's name with one line; once it is removed, the rerun completes; the victim must keep its bytes.
- retrained checkpoint: half the images made from a checkpoint, which is then replaced by one of the same size
  and mtime but other weights; the rerun must be refused with one line and the folder hold only the first
  checkpoint's images.
- threads on one model: six threads call pndm_fast.sample on the bundled digits model at once, with one shape;
  every result must equal the same call made alone (a result that differs counts as mixed).
A fault is survived when the run ended as described and nothing was lost, mixed or corrupt.

Every process runs with OMP_NUM_THREADS=1: the thread count changes how convolutions sum, and the comparisons
are exact. Prints one line per part, then a total, and exits 1 when any check failed.
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


def sample_command(folder: str, total: int = SAMPLE_TOTAL, seed: int = 0, extra: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "pndm_fast", "--config", "digits", "--total_num", str(total),
            "--batch_size", str(SAMPLE_BATCH), "--sample_step", str(SAMPLE_STEPS), "--device", "cpu",
            "--no_progress", "--image_path", folder, "--seed", str(seed), *extra]


def tiny_train_config() -> dict:
    """digits.yml shrunk to 8x8 images, batch 16, the smallest UNet GroupNorm(32) allows, a save every 2 steps."""
    config = copy.deepcopy(load_config("digits"))
    config["Dataset"].update(image_size=8, batch_size=16)
    config["Model"].update(image_size=8, ch=32, ch_mult=[1, 2], attn_resolutions=[4])
    config["Train"].update(save_every=SAVE_EVERY, ema_rate=0.9)
    config["Optim"]["lr"] = 1e-3
    config.pop("Sample", None)
    return config


def train_command(config_path: str, folder: str, restart: bool, max_steps: int = TRAIN_STEPS,
                  seed: int = 0) -> list[str]:
    return [sys.executable, "-m", "pndm_fast", "--runner", "train", "--config", config_path, "--train_path", folder,
            "--max_steps", str(max_steps), "--device", "cpu", "--no_progress", "--seed", str(seed)] + (
                ["--restart"] if restart else [])


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


def final_images(folder: str, shape: tuple[int, int, int],
                 total: int = SAMPLE_TOTAL) -> tuple[dict[str, np.ndarray], int]:
    """The whole images under final names in `folder`, and how many files under final names are not whole."""
    whole, corrupt = {}, 0
    for index in range(total):
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
    TOTALS.add(attempts=kills, survived=kills if ok else 0, lost=lost, mixed=differ, corrupt=corrupt)
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
    TOTALS.add(attempts=kills, survived=kills if ok else 0, lost=unequal, corrupt=broken)
    print(f"training: {trials} trials, {kills} kills ({during_save} during a save), {broken} broken checkpoints, "
          f"{fresh_restarts} fresh starts after a kill before the first checkpoint, final weights bitwise equal "
          f"to the uninterrupted run in {trials - unequal} of {trials}")
    return ok


class Totals:
    """What the report's last line counts over every part: fault attempts (kills and injected faults), those
    survived, and images or checkpoints lost, mixed (from two runs or two checkpoints) or corrupt."""

    def __init__(self):
        self.counts = dict.fromkeys(("attempts", "survived", "lost", "mixed", "corrupt"), 0)

    def add(self, **counts):
        for key, value in counts.items():
            self.counts[key] += int(value)

    def line(self) -> str:
        c = self.counts
        return (f"total: {c['attempts']} fault attempts, {c['survived']} survived; images or checkpoints: "
                f"{c['lost']} lost, {c['mixed']} mixed, {c['corrupt']} corrupt")


TOTALS = Totals()
FAULT_TOTAL = 8  # images per fault run: two batches of SAMPLE_BATCH

# Runs the command line with a disk that is full from the (n+1)-th file on: ENOSPC at the write call through which
# every output's bytes go, as write(2) raises it on a full disk. argv: n, then the command line's arguments.
FULL_DISK = """
import os, sys
import pndm_fast.atomic as atomic
from pndm_fast.cli import main
allowed, files = int(sys.argv[1]), set()
def write(fd, data):
    name = os.readlink(f"/proc/self/fd/{fd}")
    if name not in files:
        if len(files) >= allowed:
            raise OSError(28, "No space left on device")
        files.add(name)
    return os.write(fd, data)
atomic._write = write
sys.exit(main(sys.argv[2:]))
"""


def with_full_disk(cmd: list[str], allowed_files: int) -> list[str]:
    """`cmd` (a python -m pndm_fast command) run with a disk that fills up after `allowed_files` files."""
    assert cmd[1:3] == ["-m", "pndm_fast"]
    return [cmd[0], "-c", FULL_DISK, str(allowed_files), *cmd[3:]]


def run(cmd: list[str]) -> tuple[int, str]:
    done = subprocess.run(cmd, env=environment(), capture_output=True, text=True)
    return done.returncode, done.stderr


def one_line_refusal(code: int, err: str, words: str = "") -> bool:
    lines = err.strip().splitlines()
    return (code == 2 and len(lines) == 1 and lines[0].startswith("pndm-fast: error: ") and words in lines[0]
            and "Traceback" not in err)


def compare_images(folder: str, shape, reference: dict[str, np.ndarray], total: int = FAULT_TOTAL) -> dict:
    """{"lost", "mixed" (whole images unequal to `reference`), "corrupt", "temps"} of a finished folder."""
    images, corrupt = final_images(folder, shape, total)
    return {"lost": total - len(images), "corrupt": corrupt, "temps": len(temp_files(folder)),
            "mixed": sum(not np.array_equal(image, reference[name]) for name, image in images.items())}


def record(kind: str, tally: dict, survived: bool, counts: dict) -> None:
    ok = survived and counts.get("lost", 0) == counts.get("mixed", 0) == counts.get("corrupt", 0) == 0 \
        and counts.get("temps", 0) == 0
    row = tally.setdefault(kind, [0, 0])
    row[0], row[1] = row[0] + 1, row[1] + ok
    TOTALS.add(attempts=1, survived=ok, **{k: v for k, v in counts.items() if k in ("lost", "mixed", "corrupt")})
    if not ok:
        print(f"fault {kind} not survived: {counts}", file=sys.stderr, flush=True)


def concurrent_sampling(work: str, shape, refs: dict, tally: dict, trial: int) -> None:
    folder = os.path.join(work, f"concurrent-sample-{trial}")
    procs = [subprocess.Popen(sample_command(folder, FAULT_TOTAL, seed), env=environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    winners = [seed for seed, (code, _) in enumerate(results) if code == 0]
    losers_ok = all(one_line_refusal(code, err) for code, err in results if code != 0)
    survived = len(winners) == 1 and losers_ok
    counts = compare_images(folder, shape, refs[winners[0] if winners else 0])
    record("concurrent sampling", tally, survived, counts)
    shutil.rmtree(folder)


def concurrent_training(work: str, config_path: str, refs: dict, tally: dict, trial: int) -> None:
    folder = os.path.join(work, f"concurrent-train-{trial}")
    procs = [subprocess.Popen(train_command(config_path, folder, restart=False, seed=seed), env=environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    winners = [seed for seed, (code, _) in enumerate(results) if code == 0]
    survived = len(winners) == 1 and all(one_line_refusal(code, err) for code, err in results if code != 0)
    same = bool(winners) and same_training(folder, refs[winners[0]])
    record("concurrent training", tally, survived, {"mixed": not same})
    shutil.rmtree(folder)


def full_disk_sampling(work: str, shape, refs: dict, tally: dict, trial: int, rng: random.Random) -> None:
    folder = os.path.join(work, f"full-disk-sample-{trial}")
    # file 1 is the checkpoint-hash cache, then one file per image
    code, err = run(with_full_disk(sample_command(folder, FAULT_TOTAL), rng.randint(0, FAULT_TOTAL)))
    survived = one_line_refusal(code, err, "no space left on the device") and not temp_files(folder)
    corrupt = final_images(folder, shape, FAULT_TOTAL)[1]
    rerun, _ = run(sample_command(folder, FAULT_TOTAL))
    counts = compare_images(folder, shape, refs[0])
    counts["corrupt"] += corrupt
    record("full disk (sampling)", tally, survived and rerun == 0, counts)
    shutil.rmtree(folder)


def full_disk_training(work: str, config_path: str, refs: dict, tally: dict, trial: int,
                       rng: random.Random) -> None:
    folder = os.path.join(work, f"full-disk-train-{trial}")
    # two files per save (train_state.pt, ema.ckpt), a save every SAVE_EVERY steps: the disk fills at a random one
    allowed = rng.randint(0, 2 * TRAIN_STEPS // SAVE_EVERY - 1)
    code, err = run(with_full_disk(train_command(config_path, folder, restart=False), allowed))
    survived = one_line_refusal(code, err, "no space left on the device") and not temp_files(folder)
    intact, _ = check_after_kill(folder, 0)
    rerun, _ = run(relaunch_command(config_path, folder))
    record("full disk (training)", tally, survived and rerun == 0,
           {"corrupt": not intact, "lost": not same_training(folder, refs[0])})
    shutil.rmtree(folder)


def planted_links(work: str, shape, config_path: str, refs: dict, tally: dict, trial: int) -> None:
    folder, train_folder = os.path.join(work, f"links-sample-{trial}"), os.path.join(work, f"links-train-{trial}")
    victim = os.path.join(work, f"victim-{trial}.txt")
    with open(victim, "wb") as f:
        f.write(b"the user's own file")
    os.makedirs(folder)
    os.makedirs(train_folder)
    under_image = os.path.join(folder, image_name(3))
    for link in (under_image, os.path.join(folder, f".{image_name(5)}.0123456789abcdef.tmp"),
                 os.path.join(folder, f".{image_name(6)}.{os.getpid()}.tmp"),
                 os.path.join(train_folder, f".{STATE_FILE}.0123456789abcdef.tmp"),
                 os.path.join(train_folder, f".{EMA_FILE}.{os.getpid()}.tmp")):
        os.symlink(victim, link)
    code, err = run(sample_command(folder, FAULT_TOTAL))
    refused = one_line_refusal(code, err, "is a link")
    os.remove(under_image)
    rerun, _ = run(sample_command(folder, FAULT_TOTAL))
    trained, _ = run(train_command(config_path, train_folder, restart=False))
    with open(victim, "rb") as f:
        untouched = f.read() == b"the user's own file"
    counts = compare_images(folder, shape, refs[0])
    counts["temps"] = 0  # the planted links themselves may stay; what matters is that none was written through
    counts["corrupt"] += not untouched
    record("planted links", tally, refused and rerun == 0 and trained == 0 and untouched
           and same_training(train_folder, refs["train"]), counts)
    shutil.rmtree(folder)
    shutil.rmtree(train_folder)


def retrained_checkpoint(work: str, shape, refs: dict, tally: dict, trial: int) -> None:
    from safetensors.torch import load_file

    from pndm_fast.models import save_state_dict
    from pndm_fast.runners.sample import resolve_model_path

    folder, ckpt = os.path.join(work, f"retrained-{trial}"), os.path.join(work, f"ema-{trial}.safetensors")
    weights = load_file(resolve_model_path(None, load_config("digits")))
    save_state_dict(weights, ckpt)
    extra = ("--model_path", ckpt)
    first, _ = run(sample_command(folder, FAULT_TOTAL, extra=extra))
    for index in range(SAMPLE_BATCH, FAULT_TOTAL):  # the second batch lost, as a kill would leave it
        os.remove(os.path.join(folder, image_name(index)))
    stat = os.stat(ckpt)
    save_state_dict({k: v * 1.001 if v.is_floating_point() else v for k, v in weights.items()}, ckpt)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, size and mtime: only the bytes differ
    code, err = run(sample_command(folder, FAULT_TOTAL, extra=extra))
    counts = compare_images(folder, shape, refs[0])
    counts["lost"] -= FAULT_TOTAL - SAMPLE_BATCH  # removed on purpose above
    record("retrained checkpoint", tally, first == 0 and one_line_refusal(code, err, "other content"), counts)
    shutil.rmtree(folder)
    os.remove(ckpt)


def threaded_sampling(tally: dict, trial: int) -> None:
    """Six threads sample from one model at once (the bundled digits model, one shape, so they would share one
    cached runner if the cache let them): every result must equal the same call made alone."""
    import threading

    from pndm_fast import pretrained, sample

    model, schedule = pretrained("digits")
    noises = [torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(100 * trial + i)) for i in range(6)]
    alone = [sample(model, noise, schedule, "F-PNDM", 5) for noise in noises]
    results, errors = {}, []
    barrier = threading.Barrier(len(noises))

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = sample(model, noises[i], schedule, "F-PNDM", 5)
        except Exception as e:  # counted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(noises))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    mixed = sum(i not in results or not torch.equal(results[i], alone[i]) for i in range(len(noises)))
    record("threads on one model", tally, not errors, {"lost": 0, "mixed": mixed, "corrupt": 0})


def fault_trials(trials: int, work: str, rng: random.Random) -> bool:
    shape = image_shape(load_config("digits"))
    config_path = os.path.join(work, "tiny-digits.yml")
    with open(config_path, "w") as f:
        yaml.safe_dump(tiny_train_config(), f)
    # the kill trials' uninterrupted runs serve as seed 0's references when they ran: the first 8 of their 24
    # images fall in the same batches of 4, so they are the same pixels
    refs = {}
    for seed in (0, 1):
        folder = os.path.join(work, "sample-reference" if seed == 0 else "fault-reference-1")
        if not os.path.isdir(folder):
            run_to_end(sample_command(folder, FAULT_TOTAL, seed))
        refs[seed] = final_images(folder, shape, FAULT_TOTAL)[0]
    train_refs = {}
    for seed in (0, 1):
        folder = os.path.join(work, "train-reference" if seed == 0 else "fault-train-reference-1")
        if not os.path.isdir(folder):
            run_to_end(train_command(config_path, folder, restart=False, seed=seed))
        train_refs[seed] = folder
    tally: dict[str, list[int]] = {}
    for trial in range(trials):
        concurrent_sampling(work, shape, refs, tally, trial)
        concurrent_training(work, config_path, train_refs, tally, trial)
        full_disk_sampling(work, shape, refs, tally, trial, rng)
        full_disk_training(work, config_path, train_refs, tally, trial, rng)
        planted_links(work, shape, config_path, {**refs, "train": train_refs[0]}, tally, trial)
        retrained_checkpoint(work, shape, refs, tally, trial)
        threaded_sampling(tally, trial)
        print(f"fault trial {trial + 1}/{trials}: " + ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in tally.items()),
              file=sys.stderr, flush=True)
    print("faults: " + ", ".join(f"{kind} {ok} of {n} survived" for kind, (n, ok) in tally.items()))
    return all(ok == n for n, ok in tally.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50, help="trials per part")
    p.add_argument("--max_kills", type=int, default=3, help="kills per trial before the run may finish")
    p.add_argument("--what", choices=("sample", "train", "faults", "both", "all"), default="all",
                   help="both: the kill trials of sampling and training; all: those and the other faults")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    p.add_argument("--work", help="folder for the runs (default: a temporary folder, removed at the end)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work or tempfile.mkdtemp(prefix="fault-injection-")
    try:
        ok = True
        if args.what in ("sample", "both", "all"):
            ok &= sampling_trials(args.trials, args.max_kills, work, rng)
        if args.what in ("train", "both", "all"):
            ok &= training_trials(args.trials, args.max_kills, work, rng)
        if args.what in ("faults", "all"):
            ok &= fault_trials(args.trials, work, rng)
        c = TOTALS.counts
        ok &= c["lost"] == c["mixed"] == c["corrupt"] == 0
        print(TOTALS.line())
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
