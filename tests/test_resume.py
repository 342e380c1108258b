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
from pndm_fast.lock import LOCK_NAME
from pndm_fast.models import save_state_dict
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
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in images(folder)}


def stats(folder) -> dict:
    """(inode, mtime) per image: a file rewritten by atomic rename gets a new inode."""
    return {name: (st.st_ino, st.st_mtime_ns) for name in os.listdir(folder) if not name.startswith(".")
            for st in [os.stat(os.path.join(folder, name))]}


def images(folder) -> list:
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


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


@pytest.mark.parametrize("make", [
    lambda path: Image.new("L", (32, 32)).save(path),  # a whole PNG of another config's size
    lambda path: Image.new("RGB", (16, 16)).save(path),  # right size, another mode
    lambda path: path.write_bytes(b"not a png, someone's notes"),
    lambda path: path.mkdir(),  # a folder named like an image
    lambda path: path.symlink_to(path.parent / "elsewhere.png"),  # a link, even to nothing
], ids=["other-size", "other-mode", "text", "folder", "link"])
def test_anything_not_ours_is_refused_and_kept(copy, model_calls, capsys, make):
    """Only images that carry this program's settings record are ever rewritten: a file of another size or mode
    (another config's run, another program's) is refused with one line and left as it was."""
    os.remove(copy / "000004.png")
    make(copy / "000004.png")
    def entries():
        return {name: (st.st_ino, st.st_mode, st.st_mtime_ns) for name in images(copy)
                for st in [os.lstat(copy / name)]}

    before = entries()
    assert main(args(copy)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "000004.png" in err and "Traceback" not in err, err
    assert model_calls == [] and entries() == before


def test_a_copied_over_image_is_rewritten(copy, reference, model_calls):
    """Each image records its own index: image 1 copied onto 000006.png is not kept as image 6."""
    shutil.copy(copy / "000001.png", copy / "000006.png")
    assert main(args(copy)) == 0
    assert model_calls == [BATCH]
    np.testing.assert_array_equal(pixels(copy)["000006.png"], pixels(reference)["000006.png"])


def test_leftover_temporary_files_are_removed(copy):
    """Under the folder's lock no other run writes there, so every temporary file is a leftover, whatever
    process (or PID namespace) made it."""
    left = [temp_name("000003.png"), temp_name("000002.png")]
    for name in left:
        (copy / name).write_bytes(b"partial")
    assert main(args(copy)) == 0
    assert images(copy) == [f"{i:06d}.png" for i in range(TOTAL)]
    assert remove_stale_temps(copy) == []


def test_a_running_sampler_locks_its_folder(copy, capsys):
    """A second run into a folder that a live run holds is refused with one line naming the holder; the lock
    goes with the holder (here a subprocess that takes it and waits)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pndm_fast.lock import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(60)",
                               str(copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = stats(copy)
        assert main(args(copy, "--seed", "1")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by process {holder.pid}" in err, err
        assert stats(copy) == before
    finally:
        holder.kill()
        holder.wait()
    assert (copy / LOCK_NAME).exists()  # a killed holder leaves its lock file, unlocked
    assert main(args(copy)) == 0  # the lock died with its holder
    assert not (copy / LOCK_NAME).exists()  # a run that ends removes it


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


def test_the_same_checkpoint_elsewhere_is_accepted(copy, tmp_path, model_calls):
    """The checkpoint is identified by its content: the same bytes under another path resume the folder."""
    other = tmp_path / "same-weights-elsewhere.safetensors"
    shutil.copy(resolve_model_path(None, load_config("digits")), other)
    assert main(args(copy, "--model_path", str(other))) == 0 and model_calls == []


def test_a_retrained_checkpoint_of_the_same_size_is_refused(tmp_path, capsys):
    """A retrained ema.ckpt has the same path and size as the one the images were made with: refused by its
    content hash, though a first run wrote images with the old one (and even with the mtime restored)."""
    from safetensors.torch import load_file

    weights = load_file(resolve_model_path(None, load_config("digits")))
    ckpt, out = tmp_path / "ema.safetensors", tmp_path / "out"
    save_state_dict(weights, ckpt)
    assert main(args(out, "--model_path", str(ckpt), total=BATCH)) == 0
    first = {name: (out / name).read_bytes() for name in images(out)}
    mtime = os.stat(ckpt).st_mtime_ns
    save_state_dict({k: v * 1.001 if v.is_floating_point() else v for k, v in weights.items()}, ckpt)
    os.utime(ckpt, ns=(mtime, mtime))
    assert main(args(out, "--model_path", str(ckpt))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint of other content" in err, err
    assert {name: (out / name).read_bytes() for name in images(out)} == first


def test_foreign_images_are_refused(tmp_path, capsys):
    Image.new("L", (16, 16)).save(tmp_path / "000000.png")  # whole and the right size, but of unknown origin
    assert main(args(tmp_path)) == 2
    assert "records no pndm-fast sampling settings" in capsys.readouterr().err
    assert images(tmp_path) == ["000000.png"]


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
    assert sorted(after) == [f"{i:06d}.png" for i in range(total)]
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]  # no temporary file either
    assert {name: after[name] for name in survivors} == survivors
    reference_pixels, out_pixels = pixels(reference), pixels(out)
    for name, image in reference_pixels.items():  # the first TOTAL images: batches 0 and 1 are the same
        np.testing.assert_array_equal(out_pixels[name], image, err_msg=name)


def test_a_full_disk_stops_with_one_line_and_the_rerun_completes(reference, tmp_path, monkeypatch, capsys):
    """ENOSPC (injected at the write call) once 5 images are written: one line naming the path and the free
    space, the 5 images whole, no temporary file; the same command then finishes pixel-identical."""
    import pndm_fast.atomic as atomic

    out, written = tmp_path / "out", []

    def write(fd, data):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".png." in name and name not in written:
            if len(written) == 5:
                raise OSError(28, "No space left on device")
            written.append(name)
        return os.write(fd, data)

    monkeypatch.setattr(atomic, "_write", write)
    assert main(args(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on the device writing" in err and " free in " in err, err
    assert images(out) == [f"{i:06d}.png" for i in range(5)]
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    monkeypatch.undo()
    assert main(args(out)) == 0
    assert pixels(out).keys() == pixels(reference).keys()
    for name, image in pixels(reference).items():
        np.testing.assert_array_equal(pixels(out)[name], image, err_msg=name)


def test_the_checkpoint_hash_is_cached_by_path_and_stat(tmp_path, monkeypatch):
    """A resume reads the checkpoint's hash from the cache while the file's stat is unchanged (the cache is
    trusted: a forged entry is believed), and hashes it again once the file was touched (its ctime moved)."""
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = tmp_path / "w.safetensors"
    shutil.copy(resolve_model_path(None, load_config("digits")), ckpt)
    assert main(args(tmp_path / "out", "--model_path", str(ckpt))) == 0
    cache_path = sample_runner.hash_cache_path()
    cache = json.loads(open(cache_path).read())
    assert list(cache) == [os.path.realpath(ckpt)]
    cache[os.path.realpath(ckpt)]["sha256"] = "0" * 64
    open(cache_path, "w").write(json.dumps(cache))
    assert main(args(tmp_path / "out", "--model_path", str(ckpt))) == 2  # the forged hash was used, unread
    os.utime(ckpt)
    assert main(args(tmp_path / "out", "--model_path", str(ckpt))) == 0  # re-hashed: the real one matches
