"""diffusers model folders: found, loaded (to the same outputs as the saved model), refused with one line when
they are not one, and their scheduler's betas equal diffusers' own and the closed forms."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from pndm_fast import UserError
from pndm_fast.models.diffusers_folder import is_diffusers_folder, load_diffusers_unet, schedule_from_folder

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=None, norm_eps=1e-6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model folder, pipeline folder, the UNet saved in both)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY).eval()
    root = tmp_path_factory.mktemp("diffusers")
    unet.save_pretrained(root / "model")
    pipeline = root / "pipeline"
    unet.save_pretrained(pipeline / "unet")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction").save_pretrained(pipeline / "scheduler")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": [
        "diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return root / "model", pipeline, unet


def test_folders_are_recognised(saved, tmp_path):
    model, pipeline, _ = saved
    assert is_diffusers_folder(model) and is_diffusers_folder(pipeline) and is_diffusers_folder(pipeline / "unet")
    (tmp_path / "config.json").write_text("{}")  # no _class_name, no weights
    assert not is_diffusers_folder(tmp_path)
    assert not is_diffusers_folder(model / "config.json")  # a file
    assert not is_diffusers_folder(tmp_path / "absent")


@pytest.mark.parametrize("which", ["model", "pipeline"])
def test_loaded_unet_gives_the_saved_models_outputs(saved, which):
    model, pipeline, unet = saved
    loaded = load_diffusers_unet(model if which == "model" else pipeline, "cpu", torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64 and not loaded.training
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        expected = unet.double()(x.double(), t).sample
        unet.float()
        assert torch.equal(loaded(x.double(), t).sample, expected)


def test_refusals_are_one_line(saved, tmp_path):
    with pytest.raises(UserError, match="is not a diffusers model folder") as err:
        load_diffusers_unet(tmp_path, "cpu", torch.float32)
    assert "\n" not in str(err.value)
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "sched")
    with pytest.raises(UserError, match="is not a diffusers model folder"):
        load_diffusers_unet(tmp_path / "sched", "cpu", torch.float32)
    model, _, unet = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((model / "config.json").read_text().replace('"layers_per_block": 1',
                                                                                 '"layers_per_block": 2'))
    (bad / "diffusion_pytorch_model.safetensors").write_bytes((model / "diffusion_pytorch_model.safetensors")
                                                              .read_bytes())
    with pytest.raises(UserError, match="the weights do not match config.json's UNet2DModel") as err:
        load_diffusers_unet(bad, "cpu", torch.float32)
    assert "\n" not in str(err.value)


def test_without_diffusers_one_line_says_what_to_install(saved):
    model, _, _ = saved
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import torch\n"
            "from pndm_fast.errors import UserError\n"
            "from pndm_fast.models.diffusers_folder import is_diffusers_folder, load_diffusers_unet\n"
            f"assert is_diffusers_folder({str(model)!r})\n"
            f"try:\n    load_diffusers_unet({str(model)!r}, 'cpu', torch.float32)\n"
            "except UserError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("loading it needs diffusers: pip install diffusers")
    assert len(done.stdout.strip().splitlines()) == 1


def write_scheduler(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **config}))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_equal_diffusers_own_and_the_closed_form(tmp_path, schedule):
    settings = dict(num_train_timesteps=500, beta_start=0.0002, beta_end=0.03, beta_schedule=schedule)
    diffusers.DDPMScheduler(**settings).save_pretrained(tmp_path / "scheduler")
    betas, prediction = schedule_from_folder(tmp_path)
    assert prediction == "epsilon" and betas.dtype == np.float64 and betas.shape == (500,)
    theirs = diffusers.DDPMScheduler(**settings).betas.double().numpy()  # diffusers keeps them in float32
    # diffusers' own numbers (its float32 linspace rounds unlike a float64 one's), so the table is the model's
    assert np.array_equal(betas.astype(np.float32), theirs.astype(np.float32))
    i = np.arange(500)
    if schedule == "linear":
        closed = 0.0002 + (0.03 - 0.0002) * i / 499
    elif schedule == "scaled_linear":
        closed = (0.0002**0.5 + (0.03**0.5 - 0.0002**0.5) * i / 499) ** 2
    else:
        bar = [math.cos((s / 500 + 0.008) / 1.008 * math.pi / 2) ** 2 for s in range(501)]
        closed = np.minimum([1 - bar[k + 1] / bar[k] for k in range(500)], 0.999)
    np.testing.assert_allclose(betas, closed, rtol=2**-22, atol=0)  # the closed form, to float32 rounding


def test_pipeline_folder_reads_its_scheduler_and_prediction_type(saved):
    model, pipeline, _ = saved
    betas, prediction = schedule_from_folder(pipeline)
    assert prediction == "v_prediction"
    np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=2**-23)
    assert schedule_from_folder(pipeline / "unet")[1] == "v_prediction"  # the pipeline's unet/ finds it too
    assert schedule_from_folder(model) is None  # a bare model folder has no schedule


def test_trained_betas_and_refusals(tmp_path):
    write_scheduler(tmp_path / "a", trained_betas=[0.1, 0.2, 0.3], prediction_type="sample")
    betas, prediction = schedule_from_folder(tmp_path / "a")
    assert betas.tolist() == [0.1, 0.2, 0.3] and prediction == "sample"
    for config, message in (({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
                            ({"prediction_type": "flow"}, "prediction_type 'flow'"),
                            ({"trained_betas": [0.1, 1.5]}, "trained_betas"),
                            ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start <= beta_end"),
                            ({"rescale_betas_zero_snr": True}, "zero signal")):
        write_scheduler(tmp_path / "b", **config)
        with pytest.raises(UserError, match=message) as err:
            schedule_from_folder(tmp_path / "b")
        assert "\n" not in str(err.value)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(UserError, match="could not be read as JSON"):
        schedule_from_folder(tmp_path / "c")
