"""The command line's img2img, inpainting and stochastic methods, on the bundled digits UNet: the kept pixels are
the picture's, a rerun resumes, other editing inputs are refused in one line, and a stochastic image does not
depend on the batch it was made in."""

import os

import numpy as np
import pytest
from PIL import Image

from pndm_fast.cli import main


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "init.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255  # repaint the left half
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def run(out, *extra):
    return main(["--config", "digits", "--sample_step", "10", "--total_num", "6", "--image_path", str(out),
                 "--no_progress", *extra])


def test_inpainting_keeps_the_picture_and_resumes(pictures, tmp_path, capsys):
    edit = ["--method", "DPM-Solver++2M-SDE", "--init_image", str(pictures / "init.png"), "--strength", "0.7",
            "--mask", str(pictures / "mask.png")]
    assert run(tmp_path / "a", *edit, "--batch_size", "4") == 0
    init = pixels(pictures / "init.png")
    images = sorted(os.listdir(tmp_path / "a"))
    assert len(images) == 6
    for name in images:
        out = pixels(tmp_path / "a" / name)
        assert np.array_equal(out[:, 8:], init[:, 8:])
        assert np.abs(out[:, :8] - init[:, :8]).mean() > 20  # the left half is the model's
    before = {name: os.stat(tmp_path / "a" / name).st_mtime_ns for name in images}
    assert run(tmp_path / "a", *edit, "--batch_size", "4") == 0  # a rerun finds every image made
    assert before == {name: os.stat(tmp_path / "a" / name).st_mtime_ns for name in images}
    capsys.readouterr()
    other = [*edit[:-1], str(pictures / "init.png")]  # another mask
    assert run(tmp_path / "a", *other, "--batch_size", "4") == 2
    assert "edit" in capsys.readouterr().err


def test_a_stochastic_image_does_not_depend_on_its_batch(tmp_path):
    for batch in ("6", "4"):
        assert run(tmp_path / batch, "--method", "Euler-a", "--batch_size", batch, "--total_num", "6") == 0
    for name in sorted(os.listdir(tmp_path / "6")):
        # the CPU UNet rounds by batch composition: one grey level at most (the deterministic runs' bound)
        assert np.abs(pixels(tmp_path / "6" / name) - pixels(tmp_path / "4" / name)).max() <= 1


def test_bad_editing_flags_exit_2(pictures, tmp_path, capsys):
    cases = [(["--strength", "0.5"], "give --init_image"),
             (["--init_image", str(pictures / "init.png"), "--strength", "1.5"], "--strength must be in"),
             (["--init_image", str(tmp_path / "none.png")], "does not exist"),
             (["--init_image", str(pictures)], "is not a picture"),
             (["--init_image", str(pictures / "init.png"), "--strength", "0.01"], "runs no step")]
    for extra, message in cases:
        assert run(tmp_path / "bad", *extra) == 2
        assert message in capsys.readouterr().err
