"""Sampling split over torchrun's processes (gloo on the CPU) writes the same files as one process."""

import os
import subprocess
import sys

import numpy as np
from conftest import read_images
from PIL import Image

from pndm_fast import distributed

TOTAL, BATCH = 10, 2  # 5 batches over 2 ranks: rank 0 makes batches 0, 2, 4 and rank 1 makes 1, 3


def pndm_args(folder, *extra) -> list:
    return ["--config", "digits", "--method", "F-PNDM", "--sample_step", "4", "--total_num", str(TOTAL),
            "--batch_size", str(BATCH), "--device", "cpu", "--no_progress", "--image_path", str(folder), *extra]


def one_thread_env() -> dict:
    """torchrun sets OMP_NUM_THREADS=1 in its workers, and the thread count changes how convolutions sum (a
    grey level on a few pixels of 8x8 digits), so the single-process run gets one thread too: like with like."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_world_is_read_from_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == distributed.World(0, 1, 0) and distributed.world().is_main
    assert distributed.init("cpu") == distributed.World(0, 1, 0) and not distributed.is_initialized()
    distributed.barrier()  # no process group: returns at once instead of waiting for peers
    distributed.shutdown()
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = distributed.world()
    assert world == distributed.World(5, 8, 1) and not world.is_main
    assert distributed.device_for("cuda", world) == "cuda:1"  # "cuda" means this process's own GPU
    assert distributed.device_for("cuda:3", world) == "cuda:3" and distributed.device_for("cpu", world) == "cpu"
    assert distributed.backend_for("cuda") == "nccl" and distributed.backend_for("cpu") == "gloo"


def test_two_processes_write_the_files_of_one(tmp_path):
    single, split = tmp_path / "single", tmp_path / "split"
    done = subprocess.run([sys.executable, "-m", "pndm_fast", *pndm_args(single)], env=one_thread_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pndm_fast", *pndm_args(split, "--grid", str(tmp_path / "grid.png"))]
    done = subprocess.run(cmd, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # one summary, from rank 0, counting both ranks' images
    summaries = [line for line in done.stdout.splitlines() if line.startswith("wrote")]
    assert len(summaries) == 1 and summaries[0].startswith(f"wrote {TOTAL} images"), done.stdout
    a, b = read_images(single), read_images(split)
    assert list(a) == [f"{i:06d}.png" for i in range(TOTAL)] and list(b) == list(a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert sorted(os.listdir(split)) == list(a)  # no temporary file left by either rank
    grid = np.asarray(Image.open(tmp_path / "grid.png"))  # rank 0 read the other rank's tiles back from disk
    assert grid.shape == (2 + 3 * 18, 2 + 4 * 18)  # 10 tiles of 16x16 in 3 rows of 4, 2-pixel padding
    np.testing.assert_array_equal(grid[2:18, 2 + 18: 2 + 18 + 16], a["000001.png"])  # made by rank 1


def test_sampling_in_one_process_leaves_no_process_group(tmp_path, monkeypatch):
    from pndm_fast.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(pndm_args(tmp_path, "--total_num", "2")) == 0
    assert not distributed.is_initialized()
