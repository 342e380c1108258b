"""The rectified-flow digits model: training noises the data as a flow and asks the network for the velocity at
1000 s, a flow config reads as a flow schedule and a velocity network, and the shipped weights make digits through
the command line and through pretrained()."""

import copy

import numpy as np
import pytest
import torch
from conftest import read_images

import pndm_fast
from pndm_fast import UserError, load_config
from pndm_fast.cli import main
from pndm_fast.continuous import FlowSchedule
from pndm_fast.runners.train import FlowNoising, train


pytestmark = pytest.mark.usefixtures("one_thread")


def sure_share(images: torch.Tensor) -> float:
    """The share of (B, 1, 16, 16) digits in [-1, 1] the shipped classifier gives a probability >= 0.9."""
    from digits_classifier import load_classifier

    with torch.no_grad():
        probabilities = load_classifier()(((images + 1) / 2).clamp(0, 1)).softmax(1)
    return float((probabilities.max(1).values >= 0.9).double().mean())


def test_flow_noising_is_the_straight_path_and_its_target_the_velocity():
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    x, t, target = FlowNoising(1000.0)(x0, torch.Generator().manual_seed(0), 6, slice(0, 6))
    s = (t / 1000.0).view(-1, 1, 1, 1)
    eps = target + x0  # the velocity is eps - x0
    torch.testing.assert_close(x, (1 - s) * x0 + s * eps, rtol=0, atol=1e-6)
    assert torch.allclose(s[:2].flatten() + s[4:].flatten(), torch.ones(2))  # antithetic: u, then 1 - u
    assert abs(float(eps.std()) - 1) < 0.3


def test_a_flow_config_trains_and_its_network_declares_how_it_reads(tmp_path):
    config = copy.deepcopy(load_config("digits-flow"))
    config["Dataset"].update(image_size=8, batch_size=16)
    config["Model"].update(image_size=8, attn_resolutions=[4])
    summary = train(config, str(tmp_path), max_steps=2, progress=False)
    assert summary["step"] == 2 and np.isfinite(summary["losses"]).all()
    net = pndm_fast.build_model(config)
    assert net.sampling_reading == {"prediction": "flow", "time_input": "1000t"}
    denoiser = pndm_fast.Denoiser(net)
    assert (denoiser.prediction, denoiser.time_input) == ("flow", "1000t")
    bad = copy.deepcopy(config)
    bad["Model"]["time_input"] = "sigma"
    with pytest.raises(UserError, match="Model.time_input"):
        pndm_fast.build_model(bad)


def test_the_shipped_flow_model_makes_digits_from_the_command_line(tmp_path):
    """`pndm-fast --config digits-flow` in 10 model calls: digits the shipped classifier is sure of (the
    benchmark measures 500; the eps model's rate is the yardstick, docs/families.md)."""
    argv = ["--config", "digits-flow", "--method", "UniPC-bh2", "--model_calls", "10", "--total_num", "32",
            "--batch_size", "32", "--image_path", str(tmp_path), "--no_progress"]
    assert main(argv) == 0
    pixels = np.stack(list(read_images(tmp_path).values())).reshape(-1, 1, 16, 16)
    images = torch.from_numpy(pixels).float() / 127.5 - 1
    assert images.shape == (32, 1, 16, 16)
    assert sure_share(images) >= 0.7


def test_pretrained_flow_model_comes_with_its_flow_schedule():
    model, schedule = pndm_fast.pretrained("digits-flow")
    assert isinstance(schedule, FlowSchedule) and "digits-flow" in pndm_fast.pretrained_names()
    noise = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x = pndm_fast.sample(model, noise, schedule, "DPM-Solver++2M", model_calls=10, backend="fused")
    assert sure_share(x) >= 0.7 and float(x.abs().max()) < 1.3
    # the network given s instead of its 1000 s makes far fewer digits; read as an eps model on the table, none
    wrong_time = pndm_fast.Denoiser(model, "flow", time_input="t")
    assert sure_share(pndm_fast.sample(wrong_time, noise, schedule, "DPM-Solver++2M", model_calls=10)) < 0.6
    as_eps = pndm_fast.sample(pndm_fast.Denoiser(model, "eps"), noise, pndm_fast.Schedule.from_config(
        {"type": "linear"}), "DPM-Solver++2M", model_calls=10, backend="fused")
    assert float(as_eps.abs().max()) > 3


def test_a_flow_network_under_a_vp_schedule_is_one_line_and_exit_2(tmp_path, capsys):
    """A config whose network predicts a velocity on the paper's table, and one with a time input no network of
    this kind reads: each refused by the command line in one line, exit code 2, nothing written."""
    import yaml

    for section, change, message in (("Schedule", {"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2},
                                      "belongs to a flow schedule"),
                                     ("Model", {"time_input": "c_noise"}, "Model.time_input")):
        config = copy.deepcopy(load_config("digits-flow"))
        if section == "Schedule":
            config["Schedule"] = {**change, "diffusion_step": 1000}
        else:
            config["Model"].update(change)
        path = tmp_path / f"{section}.yml"
        path.write_text(yaml.safe_dump(config))
        out = tmp_path / f"out-{section}"
        code = main(["--config", str(path), "--sample_step", "2", "--total_num", "2", "--batch_size", "2",
                     "--image_path", str(out), "--no_progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "\n" not in err, err
        assert not out.exists() or not any(out.iterdir())
