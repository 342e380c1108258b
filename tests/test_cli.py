"""The command line end to end on the small golden DDIM model: images, determinism, and every bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import golden_json, golden_model, golden_path, read_images
from PIL import Image

from pndm_fast import Schedule, sample
from pndm_fast.cli import main
from pndm_fast.models import save_state_dict
from pndm_fast.runners.sample import noise_for

TOTAL = 5


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A config file and checkpoint for the golden 16x16 DDIM model, plus a few broken checkpoints."""
    folder = tmp_path_factory.mktemp("small")
    meta = golden_json("ddim_small_linear_seed1.json")
    config = {"Schedule": meta["Schedule"], "Model": meta["Model"], "Dataset": {"image_size": 16, "channels": 3},
              "Sample": {"batch_size": 2, "total_num": TOTAL}}
    (folder / "small.yml").write_text(yaml.safe_dump(config))
    state = torch.load(golden_path(meta["checkpoint"]), weights_only=True)
    renamed = dict(state)
    renamed["conv_in.weight_renamed"] = renamed.pop("conv_in.weight")
    reshaped = dict(state)
    reshaped["conv_out.bias"] = torch.zeros(7)
    poisoned = {k: v.clone() for k, v in state.items()}
    poisoned["conv_out.bias"].fill_(float("nan"))
    for name, sd in [("renamed", renamed), ("reshaped", reshaped), ("nan", poisoned)]:
        save_state_dict(sd, str(folder / f"{name}.ckpt"))
    return {"config": str(folder / "small.yml"), "ckpt": str(golden_path(meta["checkpoint"])), "folder": folder}


def run_cli(small, *extra, out=None):
    argv = ["--config", small["config"], "--model_path", small["ckpt"], "--sample_step", "5", "--device", "cpu",
            "--no_progress"] + (["--image_path", str(out)] if out else []) + list(extra)
    return main(argv)


def test_noise_of_an_image_depends_only_on_seed_and_index():
    one_batch = noise_for(range(0, 5), (3, 4, 4), seed=3)
    split = torch.cat([noise_for(range(0, 2), (3, 4, 4), seed=3), noise_for(range(2, 5), (3, 4, 4), seed=3)])
    torch.testing.assert_close(one_batch, split, rtol=0, atol=0)
    assert not torch.equal(noise_for(range(0, 1), (3, 4, 4), seed=4)[0], one_batch[0])


def test_images_are_written_and_do_not_depend_on_batch_size(small, tmp_path, capsys):
    assert run_cli(small, "--batch_size", "2", "--grid", str(tmp_path / "grid.png"), out=tmp_path / "a") == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {TOTAL} images") and "images/s" in summary
    assert run_cli(small, "--batch_size", "3", out=tmp_path / "b") == 0
    a, b = read_images(tmp_path / "a"), read_images(tmp_path / "b")
    assert list(a) == [f"{i:06d}.png" for i in range(TOTAL)] and a[list(a)[0]].shape == (16, 16, 3)
    # The noise is bitwise the same (above); the UNet itself rounds differently by batch size on the CPU
    # (BLAS picks a GEMV kernel at batch 1 and blocks GEMMs by row count, ~1e-7 relative), which can move a
    # value that sits on a rounding boundary by one grey level, and nothing more.
    diff = np.abs(np.stack(list(a.values())).astype(int) - np.stack(list(b.values())).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert len({img.tobytes() for img in a.values()}) == TOTAL  # different noise per index
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)  # 5 tiles in 2 rows of 3, 2-pixel padding
    np.testing.assert_array_equal(grid[2:18, 2:18], a["000000.png"])


def test_another_seed_gives_other_images(small, tmp_path):
    assert run_cli(small, "--total_num", "1", out=tmp_path / "a") == 0
    assert run_cli(small, "--total_num", "1", "--seed", "7", out=tmp_path / "b") == 0
    assert not np.array_equal(read_images(tmp_path / "a")["000000.png"], read_images(tmp_path / "b")["000000.png"])


BAD_INPUTS = [
    (["--method", "RK45"], "unknown method 'RK45'"),
    (["--method", "DEIS:order=9"], "DEIS option order=9 is not one of 3, 2, 4"),
    (["--method", "UniPC-bh2:lower_order=false"], "UniPC-bh2 has no option 'lower_order'"),
    (["--model", "VAE"], "invalid choice: 'VAE'"),
    (["--config", "no-such-config"], "unknown config 'no-such-config'"),
    (["--config", "missing.yml"], "config file missing.yml not found"),
    (["--config", "{folder}"], "is a folder: expected a YAML file"),
    (["--model_path", "{folder}"], "is a folder but not a diffusers model folder"),
    (["--model_path", "{folder}/small.yml"], "is a text file, not a checkpoint"),
    (["--image_path", "/proc/pndm-fast-images"], "cannot be created in /proc"),
    (["--model", "iDDPM"], "disagrees with the config's Model.struc DDIM"),
    (["--model_path", "/nonexistent/model.ckpt"], "github.com/luping-liu/PNDM"),
    (["--model_path", "{folder}/renamed.ckpt"], "conv_in.weight"),
    (["--model_path", "{folder}/reshaped.ckpt"], "conv_out.bias"),
    (["--sample_step", "0"], "sample_step must be an integer from 1 to 1000"),
    (["--sample_step", "1001"], "sample_step must be an integer from 1 to 1000"),
    (["--timesteps", "spiral"], "unknown time grid 'spiral'"),
    (["--timesteps", "5,3,4"], "strictly increasing or strictly decreasing"),
    (["--timesteps", "0,x"], "neither a grid"),
    (["--timesteps", "uniform", "--timesteps_end", "zero"], "the uniform grid is the paper's"),
    (["--backend", "graph"], "needs a CUDA device"),
    (["--model_path", "{folder}/nan.ckpt"], "NaN or Inf"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(small, tmp_path, capsys, extra, message):
    extra = [arg.format(folder=small["folder"]) for arg in extra]
    try:
        code = run_cli(small, *extra, out=tmp_path / "out")
    except SystemExit as exit_:  # argparse's own refusals exit instead of returning
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_a_failing_run_leaves_images_already_written_intact(small, tmp_path):
    """A resumed run whose model now gives NaN (the checkpoint file replaced by one of the same size, so the
    folder's recorded settings still match) fails on the missing batch and leaves the images there untouched."""
    ckpt, out = tmp_path / "model.ckpt", tmp_path / "out"
    good = torch.load(small["ckpt"], weights_only=True)
    save_state_dict(good, str(ckpt))
    assert run_cli(small, "--model_path", str(ckpt), "--total_num", "4", out=out) == 0
    (out / "000003.png").unlink()  # as a run killed before its last batch leaves the folder
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    size = ckpt.stat().st_size
    save_state_dict({k: v.clone().fill_(float("nan")) if k == "conv_out.bias" else v for k, v in good.items()},
                    str(ckpt))
    assert ckpt.stat().st_size == size
    assert run_cli(small, "--model_path", str(ckpt), "--total_num", "4", out=out) == 2
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_python_dash_m_is_the_same_program(small, tmp_path):
    cmd = [sys.executable, "-m", "pndm_fast", "--config", small["config"], "--model_path", small["ckpt"],
           "--sample_step", "4", "--total_num", "2", "--image_path", str(tmp_path), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 images" in done.stdout and sorted(os.listdir(tmp_path)) == ["000000.png", "000001.png"]
    assert done.stdout.startswith("fused op: "), done.stdout
    bad = subprocess.run(cmd[:-2] + ["--sample_step", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


GRID_RUNS = [
    (["--sample_step", "333"], {"sample_step": 333}),
    (["--timesteps", "karras"], {"timesteps": "karras"}),
    (["--timesteps", "logsnr", "--timesteps_end", "min", "--method", "DPM-Solver++2M"],
     {"timesteps": "logsnr", "end": "min", "method": "DPM-Solver++2M"}),
    (["--timesteps", "0,250.5,999", "--method", "S-PNDM"], {"timesteps": [0, 250.5, 999], "method": "S-PNDM"}),
]


@pytest.mark.parametrize("extra,api", GRID_RUNS, ids=[" ".join(extra) for extra, _ in GRID_RUNS])
def test_every_step_count_and_grid_samples_from_the_command_line(small, tmp_path, extra, api):
    """The images are those of the Python API run with the same step count, grid and times (the noise of
    images 0 and 1, seed 0, in one batch as the config's batch_size 2 makes them), and not the default grid's
    (5 uniform steps of F-PNDM). Fails if --timesteps is ignored (planted: the sample runner passing
    timesteps="uniform" to sample()) or its times are changed (planted: parse_timesteps truncating 250.5 to
    250)."""
    out = tmp_path / "out"
    assert run_cli(small, "--total_num", "2", *extra, out=out) == 0
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png"]
    made = np.stack([np.asarray(Image.open(out / name)) for name in ("000000.png", "000001.png")])
    model, meta = golden_model("ddim_small_linear")
    schedule = Schedule.from_config(meta["Schedule"])
    noise = noise_for(range(2), (3, 16, 16), seed=0)

    def pixels(method="F-PNDM", sample_step=5, **grid):
        with torch.no_grad():
            x = sample(model, noise, schedule, method, sample_step, "fused", **grid)
        return (((x + 1) / 2).clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    np.testing.assert_array_equal(made, pixels(**api))
    assert np.abs(made.astype(int) - pixels().astype(int)).mean() > 1, "the same images as the default grid's"


def test_a_folder_made_on_another_grid_is_refused(small, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(small, "--total_num", "2", out=out) == 0
    assert run_cli(small, "--total_num", "2", "--timesteps", "karras", out=out) == 2
    assert "timesteps 'uniform'" in capsys.readouterr().err


def test_check_runner_passes_every_backend_here(small, capsys):
    code = main(["--runner", "check", "--config", small["config"], "--model_path", small["ckpt"],
                 "--sample_step", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS  torch:" in out and "FAIL" not in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 5  # one row per step


def test_check_runner_fails_a_backend_that_drifts(small, capsys, monkeypatch):
    import pndm_fast.engine as engine

    exact = engine.bind

    def drifting(out, *args, **kwargs):  # every combination's output 1e-4 too large
        combine = exact(out, *args, **kwargs)
        return lambda: (combine(), out.mul_(1 + 1e-4))

    monkeypatch.setattr(engine, "bind", drifting)
    code = main(["--runner", "check", "--config", small["config"], "--model_path", small["ckpt"],
                 "--sample_step", "5", "--device", "cpu"])
    assert code == 1 and "FAIL  torch:" in capsys.readouterr().out


def test_train_then_sample_from_its_ema_checkpoint(tmp_path, capsys):
    config = tmp_path / "tiny.yml"
    config.write_text(TINY_DIGITS)
    assert main(["--runner", "train", "--config", str(config), "--train_path", str(tmp_path / "run"),
                 "--max_steps", "2", "--device", "cpu", "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 2 (loss " in out and f"checkpoints in {tmp_path / 'run'} (ema.ckpt" in out
    # a finished run restarted says so, and where its checkpoints are
    assert main(["--runner", "train", "--config", str(config), "--train_path", str(tmp_path / "run"),
                 "--max_steps", "2", "--restart", "--device", "cpu", "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "already complete at step 2" in out and str(tmp_path / "run") in out
    assert main(["--config", str(config), "--model_path", str(tmp_path / "run" / "ema.ckpt"), "--sample_step", "4",
                 "--total_num", "2", "--image_path", str(tmp_path / "img"), "--device", "cpu", "--no_progress"]) == 0
    assert sorted(os.listdir(tmp_path / "img")) == ["000000.png", "000001.png"]
    # a resumed run whose images are all there reports no sampling; one missing image re-samples its whole batch
    (tmp_path / "img" / "000001.png").unlink()
    assert main(["--config", str(config), "--model_path", str(tmp_path / "run" / "ema.ckpt"), "--sample_step", "4",
                 "--total_num", "2", "--image_path", str(tmp_path / "img"), "--device", "cpu", "--no_progress"]) == 0
    assert "wrote 1 images" in capsys.readouterr().out
    assert main(["--runner", "train", "--config", str(config), "--device", "cpu"]) == 2
    assert "--train_path" in capsys.readouterr().err


TINY_DIGITS = """
Schedule: {type: linear, beta_start: 0.0001, beta_end: 0.02, diffusion_step: 1000}
Dataset: {dataset: digits, image_size: 8, channels: 1, batch_size: 8, random_flip: false}
Model: {struc: DDIM, type: simple, image_size: 8, in_channels: 1, out_ch: 1, ch: 32, ch_mult: [1, 2],
        num_res_blocks: 1, attn_resolutions: [], dropout: 0.0, resamp_with_conv: true}
Train: {epoch: 1, loss_type: linear, ema_rate: 0.9, ema: true}
Optim: {weight_decay: 0.0, optimizer: adam, lr: 0.001, beta1: 0.9, amsgrad: false, eps: 1.0e-8, grad_clip: 1.0}
"""


def test_the_notice_names_the_fused_op_that_runs_and_how_to_get_the_kernel(monkeypatch):
    from pndm_fast import ops
    from pndm_fast.kernels_info import fused_op_notice

    assert fused_op_notice("cpu", "reference") == "sampler: backend reference (plain torch, no fused op)"
    if ops.cpp_available():
        assert "C++/OpenMP kernel (pndm_fast._C)" in fused_op_notice("cpu")
    monkeypatch.setattr(ops, "_C", None)  # as an install without a compiler leaves it
    notice = fused_op_notice("cpu")
    assert "plain torch" in notice and "pip install -e ." in notice and "\n" not in notice
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert "pip install -e \".[triton]\"" in fused_op_notice("cuda")


def test_check_runner_and_sampling_say_which_fused_op_runs(small, tmp_path, capsys, monkeypatch):
    from pndm_fast import ops

    monkeypatch.setattr(ops, "_C", None)
    assert run_cli(small, "--total_num", "1", "--sample_step", "2", out=tmp_path) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("fused op: plain torch on the CPU")
    assert main(["--runner", "check", "--config", small["config"], "--model_path", small["ckpt"],
                 "--sample_step", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fused op: plain torch on the CPU" in out and "PASS  fused" not in out  # no C++ kernel to check


def test_fp16_on_the_cpu_warns_and_compile_says_it_compiles(small, tmp_path, capsys):
    from argparse import Namespace

    from pndm_fast.cli import announce_sampling

    assert run_cli(small, "--total_num", "1", "--sample_step", "2", "--dtype", "fp16", out=tmp_path) == 0
    err = capsys.readouterr().err
    assert err.startswith("pndm-fast: warning: --dtype fp16 on the CPU") and err.count("\n") == 1, err
    announce_sampling(Namespace(backend="auto", dtype="bf16", compile=True), "cpu")
    captured = capsys.readouterr()
    assert "compiling the UNet with torch.compile" in captured.out and captured.err == ""
