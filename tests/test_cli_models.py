"""The models people have, from the command line: the class-conditional digits model with --class and --guidance,
and diffusers model folders as --model_path; every bad input one line and exit code 2."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pndm_fast import Denoiser, Schedule, sample
from pndm_fast.cli import main
from pndm_fast.runners.sample import noise_for
from digits_classifier import load_classifier


def run(*argv):
    return main(["--device", "cpu", "--no_progress", *argv])


def images(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / name)) for name in sorted(os.listdir(folder))])


def test_class_7_with_guidance_makes_sevens(tmp_path):
    """The shipped classifier (99% right on held-out real digits) calls most of them 7; the same noise asked for
    a 3 gives other images."""
    assert run("--config", "digits-cond", "--class", "7", "--guidance", "2.0", "--sample_step", "10",
               "--total_num", "8", "--image_path", str(tmp_path / "sevens"), "--grid", str(tmp_path / "g.png")) == 0
    assert run("--config", "digits-cond", "--class", "3", "--guidance", "2.0", "--sample_step", "10",
               "--total_num", "8", "--image_path", str(tmp_path / "threes")) == 0
    sevens = images(tmp_path / "sevens")
    with torch.no_grad():
        predicted = load_classifier()(torch.from_numpy(sevens).float().unsqueeze(1) / 255).argmax(1)
    assert int((predicted == 7).sum()) >= 6, predicted.tolist()
    assert not np.array_equal(sevens, images(tmp_path / "threes"))
    assert (tmp_path / "g.png").exists()


def test_class_all_gives_each_class_its_share_of_the_images(tmp_path, capsys):
    out = tmp_path / "all"
    assert run("--config", "digits-cond", "--class", "all", "--sample_step", "4", "--total_num", "10",
               "--image_path", str(out)) == 0
    assert len(os.listdir(out)) == 10
    # a rerun with another guidance is another run: refused, not mixed into the folder
    assert run("--config", "digits-cond", "--class", "all", "--guidance", "3", "--sample_step", "4", "--total_num",
               "10", "--image_path", str(out)) == 2
    assert "guidance" in capsys.readouterr().err


BAD = [
    (["--config", "digits", "--class", "3"], "this model is unconditional"),
    (["--config", "digits-cond", "--class", "11"], "--class 11 is not a class of this model: expected 0 to 9"),
    (["--config", "digits-cond", "--class", "seven"], "--class seven is not a class"),
    (["--config", "digits-cond", "--class", "2", "--guidance", "-1"], "--guidance must be a number >= 0"),
    (["--config", "digits-cond", "--guidance", "2"], "--guidance needs --class"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_class_and_guidance_are_one_line(tmp_path, capsys, argv, message):
    assert run(*argv, "--sample_step", "2", "--total_num", "2", "--image_path", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_a_diffusers_model_folder_samples_with_its_own_scheduler_config(tmp_path, capsys):
    """The images are those of the Python API given the folder's reading, v prediction on the scaled_linear
    betas (written out here), and not those of eps or of linear betas. Fails if the folder's prediction type is
    ignored (planted: open_diffusers_folder reading every folder as eps) or its beta schedule is (planted:
    open_diffusers_folder taking the config's linear schedule)."""
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8).eval().requires_grad_(False)
    folder = tmp_path / "model"
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").save_config(folder)
    out = tmp_path / "out"
    assert run("--model_path", str(folder), "--method", "UniPC-bh2", "--timesteps", "logsnr", "--sample_step", "4",
               "--total_num", "2", "--batch_size", "2", "--image_path", str(out)) == 0
    made = images(out).reshape(2, 8, 8)

    # scaled_linear: linspace in sqrt(beta) from beta_start to beta_end (diffusers' defaults 1e-4 and 0.02), squared
    scaled_linear = Schedule(np.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=np.float64) ** 2)
    linear = Schedule(np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    noise = noise_for(range(2), (1, 8, 8), seed=0)

    def pixels(prediction, schedule):
        with torch.no_grad():
            x = sample(Denoiser.from_diffusers(unet, prediction), noise, schedule, "UniPC-bh2", 4,
                       timesteps="logsnr")
        return (((x + 1) / 2).clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8).reshape(2, 8, 8).numpy()

    np.testing.assert_array_equal(made, pixels("v_prediction", scaled_linear))
    for wrong in (pixels("epsilon", scaled_linear), pixels("v_prediction", linear)):
        assert np.abs(made.astype(int) - wrong.astype(int)).mean() > 2
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert run("--model_path", str(empty), "--total_num", "2", "--image_path", str(tmp_path / "o2")) == 2
    assert "Traceback" not in capsys.readouterr().err
