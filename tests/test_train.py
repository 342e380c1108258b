"""The training runner and its datasets: loss goes down, restarts are bitwise exact, saves are atomic, and
every missing input is a one-line UserError."""

import copy
import os
import pickle
import signal

import numpy as np
import pytest
import torch
from conftest import torch_threads
from PIL import Image

from pndm_fast import UserError, load_config
from pndm_fast.data import load_dataset
from pndm_fast.models import build_model, load_checkpoint
from pndm_fast.atomic import temp_name
from pndm_fast.lock import LOCK_NAME
from pndm_fast.runners.train import EMA_FILE, STATE_FILE, random_flip, train


@pytest.fixture(autouse=True, scope="module")
def one_thread_here():
    """Tiny models train faster on one thread: at 8x8, thread hand-offs cost more than they save, and on a
    busy 2-core machine two spinning threads ran 10x slower. Module scope: run_a must see the same thread
    count as the tests that compare with it bit for bit (convolutions sum in a thread-dependent order)."""
    with torch_threads(1):
        yield


def tiny_config(**train) -> dict:
    """digits.yml shrunk to 8x8 images, batch 16 and the smallest UNet GroupNorm(32) allows."""
    config = copy.deepcopy(load_config("digits"))
    config["Dataset"].update(image_size=8, batch_size=16)
    config["Model"].update(image_size=8, ch=32, ch_mult=[1, 2], attn_resolutions=[4])
    config["Train"].update({"save_every": 1000, "ema_rate": 0.9, **train})
    config["Optim"]["lr"] = 1e-3
    return config


def files(folder) -> list:
    """The files of a training folder but its lock file (kept there between runs)."""
    return sorted(name for name in os.listdir(folder) if name != LOCK_NAME)


def read_state(folder) -> dict:
    return torch.load(os.path.join(folder, STATE_FILE), weights_only=True)


def assert_bitwise_equal(a, b, where="state"):
    """Nested dicts/lists of tensors and numbers equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """An uninterrupted 6-step run that also saves at step 3."""
    folder = tmp_path_factory.mktemp("run_a")
    summary = train(tiny_config(save_every=3), str(folder), max_steps=6, progress=False)
    return folder, summary


def test_loss_goes_down_on_digits(tmp_path):
    summary = train(tiny_config(), str(tmp_path), max_steps=40, progress=False)
    losses = summary["losses"]
    assert summary["step"] == 40 and len(losses) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_restart_is_bitwise_exact(run_a, tmp_path):
    folder_a, summary_a = run_a
    train(tiny_config(save_every=3), str(tmp_path), max_steps=3, progress=False)  # "interrupted" after a save
    assert read_state(tmp_path)["step"] == 3
    summary_b = train(tiny_config(save_every=3), str(tmp_path), restart=True, max_steps=6, progress=False)
    assert summary_b["losses"] == summary_a["losses"][3:]
    state_a, state_b = read_state(folder_a), read_state(tmp_path)
    for key in ("model", "optimizer", "ema", "step", "epoch", "batch"):
        assert_bitwise_equal(state_a[key], state_b[key], key)
    ema_a = torch.load(folder_a / EMA_FILE, weights_only=True)
    assert_bitwise_equal(ema_a, torch.load(tmp_path / EMA_FILE, weights_only=True), "ema.ckpt")
    assert_bitwise_equal(ema_a, state_a["ema"], "ema.ckpt vs train_state")


def test_a_crash_between_the_two_checkpoint_files_leaves_a_resumable_folder(run_a, tmp_path, monkeypatch):
    """The first save dies after train_state.pt and before ema.ckpt (as a kill -9 there would): --restart must
    resume from that state and end bitwise where the uninterrupted run ends, with a stale temp file cleaned up."""
    import pndm_fast.runners.train as train_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between the two files")

    monkeypatch.setattr(train_module, "save_state_dict", crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(save_every=3), str(tmp_path), max_steps=6, progress=False)
    monkeypatch.undo()
    assert files(tmp_path) == [STATE_FILE]
    (tmp_path / temp_name(STATE_FILE)).write_bytes(b"half a checkpoint")  # a writer killed mid-save
    train(tiny_config(save_every=3), str(tmp_path), restart=True, max_steps=6, progress=False)
    assert files(tmp_path) == sorted([EMA_FILE, STATE_FILE])
    assert_bitwise_equal(read_state(run_a[0])["model"], read_state(tmp_path)["model"], "model")
    ema_a = torch.load(run_a[0] / EMA_FILE, weights_only=True)
    assert_bitwise_equal(ema_a, torch.load(tmp_path / EMA_FILE, weights_only=True), "ema.ckpt")


def test_saves_are_atomic_and_loadable(run_a):
    folder, _ = run_a
    assert files(folder) == sorted([EMA_FILE, STATE_FILE])  # no temporary files left behind
    config = tiny_config()
    load_checkpoint(build_model(config), folder / EMA_FILE)  # strict keys and shapes
    state = read_state(folder)
    assert state["step"] == 6 and state["config"] == tiny_config(save_every=3)


def test_ema_follows_the_weights(run_a):
    state = read_state(run_a[0])
    assert not torch.equal(state["ema"]["conv_in.weight"], state["model"]["conv_in.weight"])


def test_existing_checkpoint_is_never_overwritten(run_a):
    folder, _ = run_a
    before = (folder / STATE_FILE).read_bytes()
    with pytest.raises(UserError, match="pass --restart to resume or choose an empty folder"):
        train(tiny_config(), str(folder), max_steps=1, progress=False)
    assert (folder / STATE_FILE).read_bytes() == before


def test_restart_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="--restart needs"):
        train(tiny_config(), str(tmp_path), restart=True, max_steps=1, progress=False)


def test_training_leaves_the_global_rng_alone(tmp_path):
    before = torch.get_rng_state()
    train(tiny_config(), str(tmp_path), max_steps=1, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_random_flip_mirrors_about_half():
    x = torch.arange(4.0).expand(200, 1, 2, 4)
    flipped = random_flip(x, torch.Generator().manual_seed(0))[:, 0, 0, 0] == 3
    assert 60 < int(flipped.sum()) < 140


def dataset_config(name: str, size: int, channels: int) -> dict:
    return {"Dataset": {"dataset": name, "image_size": size, "channels": channels}}


def test_digits_are_in_unit_range():
    data = load_dataset(dataset_config("Digits", 16, 3))
    assert len(data) == 1797 and data[0].shape == (3, 16, 16)
    assert data[0].min() >= 0 and data[0].max() <= 1 and data[0].max() > 0.5


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    with pytest.raises(UserError, match="pip install scikit-learn"):
        load_dataset(dataset_config("digits", 16, 1))


def test_cifar10_missing(tmp_path):
    with pytest.raises(UserError, match=r"CIFAR-10 not found in .*data_batch_1\.\.5.*--data_path"):
        load_dataset(dataset_config("CIFAR10", 32, 3), str(tmp_path))


def test_cifar10_from_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(5)]
    for i, data in enumerate(batches, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [0, 1]}, f)
    data = load_dataset(dataset_config("cifar10", 32, 3), str(tmp_path))
    assert len(data) == 10
    expected = torch.from_numpy(batches[1][1].reshape(3, 32, 32)).float() / 255
    assert torch.equal(data[3], expected)  # rows are channel-major: 1024 red, 1024 green, 1024 blue


def test_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 40), (0, 0, 255)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    rgb = load_dataset(dataset_config("folder", 8, 3), str(tmp_path))
    assert len(rgb) == 2 and rgb[0].shape == (3, 8, 8)
    assert torch.allclose(rgb[0][0], torch.ones(8, 8)) and rgb[0][1:].max() == 0
    gray = load_dataset(dataset_config("images", 8, 1), str(tmp_path))
    assert gray[1].shape == (1, 8, 8)


def test_image_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images"):
        load_dataset(dataset_config("folder", 8, 3), str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(dataset_config("folder", 8, 3), str(tmp_path / "absent"))


def test_dataset_needs_a_path():
    with pytest.raises(UserError, match="--data_path"):
        load_dataset(dataset_config("CIFAR10", 32, 3))


def test_divergence_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr 1e30: Adam's first step moves every weight by about 1e30 (still finite, saved at step 1); the next loss
    overflows. The run stops with a UserError before that step is saved: the checkpoint on disk stays finite and
    is the step-1 one, not NaN weights at the end."""
    config = tiny_config(save_every=1)
    config["Optim"]["lr"] = 1e30
    with pytest.raises(UserError, match="training diverged") as err:
        train(config, str(tmp_path), max_steps=6, progress=False)
    assert len(str(err.value).splitlines()) == 1
    state = read_state(tmp_path)
    assert 1 <= state["step"] < 6 and f"last checkpoint (step {state['step']})" in str(err.value)
    for name in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in state[name].values()), name
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / EMA_FILE, weights_only=True).values())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_current_step_and_restart_is_bitwise_exact(run_a, tmp_path, monkeypatch, signum):
    """SIGINT or SIGTERM during step 2 (no save is due until step 3): the step is finished and saved, the run
    stops, and --restart ends bitwise where the uninterrupted 6-step run ends."""
    import pndm_fast.runners.train as train_module

    exact, calls = train_module.train_step, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)  # arrives mid-step, as a Ctrl-C would
        return exact(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", signalled)
    with pytest.raises(train_module.TrainingInterrupted, match=f"{signum.name} after step 2, which is saved in"):
        train(tiny_config(save_every=3), str(tmp_path), max_steps=6, progress=False)
    monkeypatch.undo()
    assert read_state(tmp_path)["step"] == 2 and files(tmp_path) == sorted([EMA_FILE, STATE_FILE])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    train(tiny_config(save_every=3), str(tmp_path), restart=True, max_steps=6, progress=False)
    for key in ("model", "optimizer", "ema", "step"):
        assert_bitwise_equal(read_state(run_a[0])[key], read_state(tmp_path)[key], key)


def test_the_command_line_says_where_an_interrupted_training_was_saved(tmp_path, monkeypatch, capsys):
    import yaml

    import pndm_fast.runners.train as train_module
    from pndm_fast.cli import main

    exact = train_module.train_step

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return exact(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted)
    (tmp_path / "tiny.yml").write_text(yaml.safe_dump(tiny_config()))
    folder = tmp_path / "run"
    assert main(["--runner", "train", "--config", str(tmp_path / "tiny.yml"), "--train_path", str(folder),
                 "--max_steps", "4", "--no_progress"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "after step 1, which is saved in" in err and "--restart" in err, err
    assert "image" not in err and read_state(folder)["step"] == 1


def test_a_second_training_into_a_held_folder_is_refused(tmp_path):
    """Two trainings with different seeds into one folder: the second is refused while the first holds it."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pndm_fast.lock import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            train(tiny_config(), str(tmp_path), max_steps=1, seed=1, progress=False)
        assert files(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()


def test_a_cosine_schedule_sets_each_steps_rate_and_restarts_bitwise_exact(tmp_path, monkeypatch):
    """Optim.lr_schedule: cosine: step k of n runs at lr (1 + cos(pi k / n)) / 2 (recorded from the optimizer as
    each step starts), and a run interrupted by a signal after step 2 restarts onto the uninterrupted run's
    weights bit for bit."""
    import math

    import pndm_fast.runners.train as train_module

    def cosine(**train_fields):
        config = tiny_config(**train_fields)
        config["Optim"]["lr_schedule"] = "cosine"
        return config

    exact, rates = train_module.train_step, []

    def recording(net, optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return exact(net, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", recording)
    train(cosine(), str(tmp_path / "a"), max_steps=6, progress=False)
    assert rates == pytest.approx([1e-3 * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)], rel=1e-12)
    assert rates[0] == 1e-3 and rates[-1] < 1e-4

    def signalled(*args, **kwargs):
        rates.append(None)
        if len(rates) == 8:  # the second step of the second run
            os.kill(os.getpid(), signal.SIGINT)
        return exact(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", signalled)
    with pytest.raises(train_module.TrainingInterrupted):
        train(cosine(), str(tmp_path / "b"), max_steps=6, progress=False)
    monkeypatch.undo()
    train(cosine(), str(tmp_path / "b"), restart=True, max_steps=6, progress=False)
    for key in ("model", "optimizer", "ema", "step"):
        assert_bitwise_equal(read_state(tmp_path / "a")[key], read_state(tmp_path / "b")[key], key)


def test_an_unknown_lr_schedule_is_one_line():
    from pndm_fast.config import validate_training

    config = tiny_config()
    config["Optim"]["lr_schedule"] = "linear"
    with pytest.raises(UserError, match="lr_schedule") as info:
        validate_training(config)
    assert "\n" not in str(info.value) and "cosine" in str(info.value)
