"""The command line's grid flags (--timesteps with --t_max, --t_min, --rho, --steps_offset, --model_calls) make
the images the Python API makes with the same TimeGrid; a parameter a grid does not take is one line."""

import json
import os

import numpy as np
import pytest
import torch

from pndm_fast import make_grid, pretrained, sample
from pndm_fast.cli import main
from pndm_fast.images import read_png, to_uint8
from pndm_fast.runners.sample import SETTINGS_KEY, noise_for

COMMON = ["--config", "digits", "--total_num", "2", "--batch_size", "2", "--no_progress", "--device", "cpu"]


def images_and_settings(folder):
    found = [read_png(os.path.join(folder, f"{i:06d}.png"), (1, 16, 16)) for i in range(2)]
    return np.stack([f[0] for f in found]), json.loads(found[0][1][SETTINGS_KEY])


def api_images(method, grid):
    model, schedule = pretrained("digits")
    with torch.inference_mode():
        return to_uint8(sample(model, noise_for(range(2), (1, 16, 16), 0), schedule, method, timesteps=grid))


@pytest.mark.parametrize("flags,grid_args", [
    (["--timesteps", "karras", "--sample_step", "4", "--rho", "3", "--t_max", "600"],
     ("karras", 4, None, {"rho": 3.0, "t_max": 600.0})),
    (["--timesteps", "leading", "--sample_step", "5", "--steps_offset", "1", "--timesteps_end", "min"],
     ("leading", 5, "min", {"offset": 1})),
    (["--timesteps", "999,749,500,250"], ([250, 500, 749, 999], None, None, {})),
])
def test_grid_flags_sample_what_the_api_samples(tmp_path, capsys, flags, grid_args):
    """Planted: dropping the grid's parameters (or reading a decreasing list as something else) fails."""
    assert main([*COMMON, "--method", "DEIS", "--image_path", str(tmp_path / "out"), *flags]) == 0
    ours, settings = images_and_settings(tmp_path / "out")
    _, schedule = pretrained("digits")
    timesteps, steps, end, parameters = grid_args
    grid = make_grid(schedule, timesteps, steps, end, **parameters)
    assert np.array_equal(ours, api_images("DEIS", grid))
    assert not np.array_equal(ours, api_images("DEIS", make_grid(schedule, "logsnr", grid.steps)))
    assert settings["method"] == "DEIS"


def test_model_calls_fits_a_method_to_a_budget_on_the_command_line(tmp_path, capsys):
    assert main([*COMMON, "--method", "F-PNDM", "--model_calls", "14", "--timesteps", "logsnr",
                 "--image_path", str(tmp_path / "out")]) == 0
    assert "14 model calls: F-PNDM on the logsnr grid, 5 steps" in capsys.readouterr().err  # 4 x 3 + 2
    ours, settings = images_and_settings(tmp_path / "out")
    _, schedule = pretrained("digits")
    assert np.array_equal(ours, api_images("F-PNDM", make_grid(schedule, "logsnr", 5)))


@pytest.mark.parametrize("flags,message", [
    (["--timesteps", "logsnr", "--rho", "3"], "the logsnr grid has no parameter 'rho': it takes t_max, t_min"),
    (["--timesteps", "uniform", "--t_max", "500"], "the uniform grid is the paper's"),
    (["--timesteps", "karras", "--rho", "-1"], "rho must be a number > 0"),
    (["--timesteps", "5,3,4"], "strictly increasing or strictly decreasing"),
    (["--method", "auto", "--model_calls", "5", "--rho", "2"], "auto chooses its own time grid"),
    (["--model_calls", "3", "--sample_step", "3"], "not both"),
])
def test_a_grid_flag_that_cannot_apply_is_one_line(tmp_path, capsys, flags, message):
    assert main([*COMMON, "--image_path", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_auto_samples_on_the_command_line_as_in_python_and_a_rerun_finds_its_images(tmp_path, capsys):
    """The command line's auto makes the images Python's auto makes (the bundled model's profile, when it ships
    one), and the grid it resolved is recorded in each image, so the same command finds them the next time."""
    argv = [*COMMON, "--method", "auto", "--model_calls", "6", "--image_path", str(tmp_path / "out")]
    assert main(argv) == 0
    ours, _ = images_and_settings(tmp_path / "out")
    model, schedule = pretrained("digits")
    with torch.inference_mode():
        theirs = sample(model, noise_for(range(2), (1, 16, 16), 0), schedule, "auto", model_calls=6)
    assert np.array_equal(ours, to_uint8(theirs))
    capsys.readouterr()
    assert main(argv) == 0
    assert "found 2 of 2 images" in capsys.readouterr().out
