"""Training under torchrun: 2 gloo processes on the CPU compute the update of one process with the same global
batch, keep identical weights on both ranks, restart exactly, and refuse a batch they cannot split evenly."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pndm_fast import load_config
from pndm_fast.runners.train import EMA_FILE, STATE_FILE, train

REPO = Path(__file__).resolve().parent.parent
STEPS, PROCESSES, IMAGES, BATCH = 4, 2, 11, 4

# Runs a list of command lines in one torchrun launch (one process group, one torch import per rank) and keeps,
# per rank and run, the exit code, what went to stderr, train's summary (by wrapping train, which the command
# line looks up when it runs), and the weights and EMA the rank held at the end (by wrapping ema_update, which
# the training loop calls with the unwrapped model after every step).
WORKER = r"""
import contextlib, io, json, sys
import torch
torch.set_num_threads(1)
from pndm_fast import distributed
from pndm_fast.cli import main
import pndm_fast.runners.train as train_module

out, runs = sys.argv[1], json.loads(sys.argv[2])
w = distributed.init("cpu")
held = {}
ema_update, train = train_module.ema_update, train_module.train

def spy(ema, model, rate):
    ema_update(ema, model, rate)
    held["model"], held["ema"] = model, ema

def train_spy(*args, **kwargs):
    held["summary"] = train(*args, **kwargs)
    return held["summary"]

train_module.ema_update, train_module.train = spy, train_spy
results = []
for i, argv in enumerate(runs):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    summary = held.pop("summary", {})
    results.append({"rc": rc, "stderr": err.getvalue(), "losses": summary.get("losses"),
                    "world_size": summary.get("world_size")})
    if "model" in held:
        torch.save({"model": held["model"].state_dict(), "ema": held["ema"]}, f"{out}/run{i}.rank{w.rank}.pt")
        held.clear()
with open(f"{out}/rank{w.rank}.json", "w") as f:
    json.dump(results, f)
distributed.shutdown()
"""


def tiny_config(batch_size: int = BATCH) -> dict:
    """8x8 gray images from a folder, the smallest UNet GroupNorm(32) allows, random flips on (their coins must
    be split between the ranks like the images), gradient clipping on (its norm must be the global one).

    SGD, not digits.yml's Adam: with one channel per GroupNorm group, the biases in front of a norm (and the
    time-embedding projections) have a gradient that is exactly zero but for float rounding, and Adam's first
    steps, m / sqrt(v), turn that rounding noise into full +-lr steps of random sign in either run, so the two
    runs' weights would differ by ~lr there while computing the same function. SGD moves each weight in
    proportion to its gradient, so the weights differ exactly as much as the gradients do."""
    config = copy.deepcopy(load_config("digits"))
    config["Dataset"].update(dataset="folder", image_size=8, batch_size=batch_size, random_flip=True)
    config["Model"].update(image_size=8, ch=32, ch_mult=[1, 2], attn_resolutions=[4])
    config["Train"].update(save_every=2, ema_rate=0.9, max_steps=STEPS)
    config["Optim"].update(optimizer="sgd", lr=0.05, grad_clip=1.0)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun launch of 2 processes: an uninterrupted run, the same run stopped at step 2 and restarted,
    and a batch of 5 that 2 processes cannot split; plus the single-process run to compare with."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):  # 11 images in batches of 4: every epoch ends with a batch of 3, split 2 + 1
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(data / f"{i:02d}.png")
    for name, batch_size in [("tiny.yml", BATCH), ("odd.yml", 5)]:
        (root / name).write_text(yaml.safe_dump(tiny_config(batch_size)))

    def argv(folder, config="tiny.yml", *extra):
        return ["--runner", "train", "--config", str(root / config), "--train_path", str(root / folder),
                "--data_path", str(data), "--device", "cpu", *extra]

    plan = [argv("ddp"), argv("restarted", "tiny.yml", "--max_steps", "2", "--no_progress"),
            argv("restarted", "tiny.yml", "--restart", "--no_progress"), argv("odd", "odd.yml", "--no_progress")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    (root / "worker.py").write_text(WORKER)
    # the single-process runs go on while the workers start up (most of the launch is importing torch)
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES),
         str(root / "worker.py"), str(root), json.dumps(plan)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so the comparison measures only the split of the batch
    try:
        single = train(tiny_config(), str(root / "single"), data_path=str(data), progress=False)
        train(tiny_config(), str(root / "initial"), data_path=str(data), max_steps=0, progress=False)  # step 0
    finally:
        torch.set_num_threads(threads)
        _, stderr = launch.communicate(timeout=300)
    assert launch.returncode == 0, stderr[-3000:]
    results = [json.loads((root / f"rank{r}.json").read_text()) for r in range(PROCESSES)]
    return root, results, single


def held(root, run: int, rank: int) -> dict:
    return torch.load(root / f"run{run}.rank{rank}.pt", weights_only=True)


def state(folder) -> dict:
    return torch.load(folder / STATE_FILE, weights_only=True)


def test_ranks_hold_identical_weights_and_rank_0_saves_them(runs):
    root, _, _ = runs
    rank0, rank1 = held(root, 0, 0), held(root, 0, 1)
    for part in ("model", "ema"):
        for key, value in rank0[part].items():
            # the all-reduce hands every rank the same gradient, so the same Adam step and the same EMA
            assert torch.equal(value, rank1[part][key]), f"{part}.{key}"
    saved = state(root / "ddp")
    assert saved["step"] == STEPS
    for key, value in rank0["model"].items():
        assert torch.equal(saved["model"][key], value), key
    ema = torch.load(root / "ddp" / EMA_FILE, weights_only=True)
    for key, value in rank0["ema"].items():
        assert torch.equal(ema[key], value), key
    assert sorted(os.listdir(root / "ddp")) == sorted([EMA_FILE, STATE_FILE])  # no temporary files left


def test_two_processes_match_one_process(runs):
    root, results, single = runs
    ddp, one, initial = state(root / "ddp"), state(root / "single"), state(root / "initial")["model"]
    assert initial.keys() == one["model"].keys() and state(root / "initial")["step"] == 0
    # The 2-process gradient is the 1-process gradient summed in another order: each rank sums its rows, gloo
    # adds the two halves, DDP divides by 2. In float32 that changes the gradient by ~1e-7 relative, and SGD
    # carries that into the weights: the distance each run travelled from the common initial weights agrees to
    # a few 1e-6 (measured 2.6e-6 over 4 steps, the largest weight difference 1.2e-7). A wrong split moves it
    # far more: weighting the short 2 + 1 batch's halves equally (each rank's mean, not the global one) gave 0.08.
    moved_one = torch.cat([(one["model"][k] - initial[k]).flatten() for k in initial])
    moved_ddp = torch.cat([(ddp["model"][k] - initial[k]).flatten() for k in initial])
    relative = ((moved_ddp - moved_one).norm() / moved_one.norm()).item()
    assert moved_one.norm() > 0.01 and relative < 3e-5, relative
    # each rank reports the loss of the whole batch (its rows' sum all-reduced), so both match the single run
    for rank in range(PROCESSES):
        assert results[rank][0]["world_size"] == PROCESSES
        np.testing.assert_allclose(results[rank][0]["losses"], single["losses"], rtol=1e-5)
    assert single["world_size"] == 1 and single["step"] == ddp["step"] == one["step"] == STEPS


def test_restart_under_torchrun_is_exact(runs):
    root, results, _ = runs
    assert [r["rc"] for r in results[0][1:3]] == [0, 0]
    a, b = state(root / "ddp"), state(root / "restarted")
    assert b["step"] == STEPS
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index}.{name}"


def test_only_rank_0_shows_progress(runs):
    _, results, _ = runs
    assert f"{STEPS}/{STEPS}" in results[0][0]["stderr"]
    assert results[1][0]["stderr"] == ""


def test_batch_not_divisible_by_processes_is_refused(runs):
    root, results, _ = runs
    for rank in range(PROCESSES):
        run = results[rank][3]
        assert run["rc"] == 2
        lines = run["stderr"].strip().splitlines()
        assert len(lines) == 1 and "Dataset.batch_size 5" in lines[0] and "not divisible by the 2 processes" in lines[0]
    assert not (root / "odd" / STATE_FILE).exists()
