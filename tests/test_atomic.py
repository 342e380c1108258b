"""Every output is written through a new temporary file that is created exclusively, never through a link that
someone planted in the output folder, and published by rename; its mode follows the umask; a full disk is one
line and leaves nothing partial."""

import os
import stat

import numpy as np
import pytest
import torch

import pndm_fast.atomic as atomic
from pndm_fast import UserError, load_config
from pndm_fast.cli import main
from pndm_fast.images import write_png_atomic
from pndm_fast.models import build_model, save_state_dict
from pndm_fast.runners.train import atomic_torch_save


def state() -> dict:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}


def convert_to(out):
    def write(path):
        src = os.path.join(os.path.dirname(path), "src.ckpt")
        save_state_dict(state(), src)
        assert main(["--runner", "convert", "--model_path", src, "--out_path", str(path)]) == 0
    return write


WRITERS = {
    "png": lambda path: write_png_atomic(np.zeros((4, 4, 1), np.uint8), str(path)),
    "ckpt": lambda path: save_state_dict(state(), path),
    "safetensors": lambda path: save_state_dict(state(), path),
    "train_state": lambda path: atomic_torch_save({"step": 1, "model": state()}, str(path)),
    "convert": None,  # below: --runner convert
}
NAMES = {"png": "out.png", "ckpt": "out.ckpt", "safetensors": "out.safetensors", "train_state": "train_state.pt",
         "convert": "out.safetensors"}


def writer(kind):
    return convert_to(kind) if kind == "convert" else WRITERS[kind]


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_planted_link_at_the_temporary_name_is_never_written_through(kind, tmp_path, monkeypatch):
    """The attacker knows the next temporary name (here: the random source is made predictable) and plants a
    link there to a file of the user's: the create fails on it (O_EXCL | O_NOFOLLOW), another name is drawn,
    the victim keeps its bytes, and the output is written whole."""
    out = tmp_path / NAMES[kind]
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the user's own file")
    tags = iter(["0123456789abcdef"] + [f"{i:016x}" for i in range(1, 100)])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(tags))
    planted = tmp_path / f".{out.name}.0123456789abcdef.tmp"
    planted.symlink_to(victim)
    writer(kind)(out)
    assert victim.read_bytes() == b"the user's own file"
    assert out.is_file() and not out.is_symlink() and out.stat().st_size > 0
    assert planted.is_symlink()  # left alone, not followed, not removed
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") and n != planted.name]


def test_a_temporary_file_swapped_for_a_link_mid_write_is_not_published(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the user's own file")
    with pytest.raises(UserError, match="was replaced by someone else"):
        with atomic.atomic_file(tmp_path / "out.bin") as f:
            f.write(b"first half")
            os.remove(f.path)
            os.symlink(victim, f.path)
            f.write(b"second half")  # goes to the open file, not through the link
    assert victim.read_bytes() == b"the user's own file" and not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(kind, umask, tmp_path):
    """Converted .safetensors were 0600 whatever the umask (safetensors creates its files so): every output is
    0666 less the umask now."""
    old = os.umask(umask)
    try:
        writer(kind)(tmp_path / NAMES[kind])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / NAMES[kind]).st_mode) == 0o666 & ~umask


def test_temporary_names_are_not_predictable(tmp_path):
    names = {atomic.temp_name("000001.png") for _ in range(100)}
    assert len(names) == 100 and all(atomic.TEMP_NAME.match(n)["name"] == "000001.png" for n in names)


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_full_disk_is_one_line_and_leaves_nothing(kind, tmp_path, monkeypatch, capsys):
    """ENOSPC injected at the write call, after 20 bytes: the write ends in a UserError naming the path, and
    neither the output nor a temporary file is left."""
    from test_checkpoints import full_disk_after

    out = tmp_path / NAMES[kind]
    if kind == "convert":
        save_state_dict(state(), tmp_path / "src.ckpt")
        full_disk_after(monkeypatch, 20)
        assert main(["--runner", "convert", "--model_path", str(tmp_path / "src.ckpt"), "--out_path", str(out)]) == 2
        assert "no space left on the device" in capsys.readouterr().err
    else:
        full_disk_after(monkeypatch, 20)
        with pytest.raises(UserError, match=f"no space left on the device writing {out}"):
            writer(kind)(out)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_the_full_disk_message_names_the_path_and_the_free_space(tmp_path, monkeypatch):
    from test_checkpoints import full_disk_after

    full_disk_after(monkeypatch, 0)
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 3 * 2**20 + 2**19)
    with pytest.raises(UserError) as err:
        save_state_dict(build_model(load_config("digits")).state_dict(), tmp_path / "ema.ckpt")
    message = str(err.value)
    assert "\n" not in message and f"writing {tmp_path / 'ema.ckpt'}" in message and "(3.5 MB free in" in message
