"""Resumable sampling: a rerun of the same command keeps the whole images, rewrites the missing and damaged
ones, clears what killed runs left behind, and refuses a folder made with other settings."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import torch_threads
from PIL import Image

import pndm_fast.runners.sample as sample_runner
from pndm_fast import load_config
from pndm_fast.atomic import remove_stale_temps, temp_name
from pndm_fast.cli import main
from pndm_fast.runners.sample import resolve_model_path

TOTAL, BATCH = 8, 4


@pytest.fixture(autouse=True, scope="module")
def one_thread_here():
    """One thread, as the killed subprocess below gets through OMP_NUM_THREADS=1: the thread count changes how
    the convolutions sum (a grey level on a few pixels), and these tests compare pixels exactly."""
    with torch_threads(1):
        yield


def args(folder, *extra, total=TOTAL) -> list:
    return ["--config", "digits", "--sample_step", "4", "--total_num", str(total), "--batch_size", str(BATCH),
            "--device", "cpu", "--no_progress", "--image_path", str(folder), *extra]


def pixels(folder) -> dict:
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


def stats(folder) -> dict:
    """(inode, mtime) per file: a file rewritten by atomic rename gets a new inode."""
    return {name: (st.st_ino, st.st_mtime_ns) for name in os.listdir(folder)
            for st in [os.stat(os.path.join(folder, name))]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, to copy from and compare with."""
    folder = tmp_path_factory.mktemp("reference")
    assert main(args(folder)) == 0
    return folder


@pytest.fixture
def copy(reference, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(reference, folder)
    return folder


@pytest.fixture
def model_calls(monkeypatch):
    """Counts sampled batches by wrapping the runner's sample()."""
    calls = []
    exact = sample_runner.sample

    def counting(model, noise, *rest, **kwargs):
        calls.append(noise.shape[0])
        return exact(model, noise, *rest, **kwargs)

    monkeypatch.setattr(sample_runner, "sample", counting)
    return calls


def test_complete_folder_runs_no_model_call(copy, model_calls, capsys):
    before = stats(copy)
    assert main(args(copy)) == 0
    out = capsys.readouterr().out
    assert model_calls == [] and stats(copy) == before
    assert f"found {TOTAL} of {TOTAL} images" in out and "skipping 2 of 2 batches" in out
    assert out.strip().splitlines()[-1].startswith("wrote 0 images")


def test_damaged_images_are_regenerated_and_the_rest_kept(copy, reference, model_calls, capsys):
    whole = (copy / "000001.png").read_bytes()
    (copy / "000001.png").write_bytes(whole[: len(whole) // 2])  # cut short
    (copy / "000002.png").write_bytes(b"\0" * 300)  # garbage
    (copy / "000005.png").write_bytes(b"")  # what a power loss can leave without fsync
    os.remove(copy / "000006.png")
    flipped = bytearray((copy / "000007.png").read_bytes())
    flipped[-20] ^= 0x10  # one bit of the compressed pixels (IDAT, just before IEND): its chunk CRC fails
    (copy / "000007.png").write_bytes(bytes(flipped))
    kept = {name: st for name, st in stats(copy).items() if name in ("000000.png", "000003.png", "000004.png")}
    assert main(args(copy)) == 0
    out = capsys.readouterr().out
    assert "found 3 of 8 images" in out and "4 cut short or damaged" in out and "skipping 0 of 2" in out
    assert model_calls == [BATCH, BATCH]  # both batches lack images, and each is generated whole
    assert {name: st for name, st in stats(copy).items() if name in kept} == kept  # survivors untouched
    assert pixels(copy).keys() == pixels(reference).keys()
    for name, image in pixels(reference).items():
        np.testing.assert_array_equal(pixels(copy)[name], image, err_msg=name)


def test_wrong_size_or_mode_is_regenerated(copy, reference, model_calls):
    Image.new("L", (8, 8)).save(copy / "000004.png")  # a whole PNG, but not a 16x16 digit
    Image.new("RGB", (16, 16)).save(copy / "000005.png")  # right size, wrong mode
    assert main(args(copy)) == 0
    assert model_calls == [BATCH]  # only batch 1 (images 4..7)
    np.testing.assert_array_equal(pixels(copy)["000004.png"], pixels(reference)["000004.png"])
    np.testing.assert_array_equal(pixels(copy)["000005.png"], pixels(reference)["000005.png"])


def test_leftover_temporary_files_are_removed(copy):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temp_name("000003.png", dead.pid)
    live = temp_name("000002.png", os.getpid())  # a writer that is still running keeps its file
    for name in (stale, live):
        (copy / name).write_bytes(b"partial")
    assert main(args(copy)) == 0
    assert not (copy / stale).exists() and (copy / live).exists()
    os.remove(copy / live)
    assert remove_stale_temps(copy) == [] and sorted(os.listdir(copy)) == [f"{i:06d}.png" for i in range(TOTAL)]


@pytest.mark.parametrize("change,message", [
    (["--seed", "1"], "seed 0, this run asks for 1"),
    (["--sample_step", "5"], "sample_step 4, this run asks for 5"),
    (["--method", "DDIM"], "method 'F-PNDM', this run asks for 'DDIM'"),
    (["--batch_size", "2"], "batch_size 4, this run asks for 2"),
    (["--total_num", "9"], "total_num 8, this run asks for 9"),
])
def test_other_settings_are_refused(copy, capsys, change, message):
    before = {name: (copy / name).read_bytes() for name in os.listdir(copy)}
    assert main(args(copy) + change) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "new --image_path" in err, err
    assert {name: (copy / name).read_bytes() for name in os.listdir(copy)} == before


def test_another_checkpoint_is_refused(copy, tmp_path, capsys):
    other = tmp_path / "same-weights-elsewhere.safetensors"
    shutil.copy(resolve_model_path(None, load_config("digits")), other)
    assert main(args(copy, "--model_path", str(other))) == 2
    assert "was made with checkpoint" in capsys.readouterr().err


def test_foreign_images_are_refused(tmp_path, capsys):
    Image.new("L", (16, 16)).save(tmp_path / "000000.png")  # whole and the right size, but of unknown origin
    assert main(args(tmp_path)) == 2
    assert "records no pndm-fast sampling settings" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["000000.png"]


def test_kill_9_then_rerun_writes_only_the_missing(reference, tmp_path):
    out = tmp_path / "out"
    total = 16  # 4 batches, about 0.2 s each on one thread: the kill lands after the first, mid-run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pndm_fast", *args(out, total=total)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and len([n for n in os.listdir(out) if n.endswith(".png")]
                                          if out.exists() else []) < BATCH:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    survivors = {name: st for name, st in stats(out).items() if name.endswith(".png")}
    assert BATCH <= len(survivors) < total, "the run ended before the kill; make it longer"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"found {len(survivors)} of {total} images" in done.stdout
    assert f"wrote {total - len(survivors)} images" in done.stdout
    after = stats(out)
    assert sorted(after) == [f"{i:06d}.png" for i in range(total)]  # no temporary file either
    assert {name: after[name] for name in survivors} == survivors
    reference_pixels, out_pixels = pixels(reference), pixels(out)
    for name, image in reference_pixels.items():  # the first TOTAL images: batches 0 and 1 are the same
        np.testing.assert_array_equal(out_pixels[name], image, err_msg=name)
