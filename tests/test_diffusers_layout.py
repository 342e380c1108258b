"""The paper's DDIM UNet and diffusers' UNet2DModel are one network: weights converted either way give the same
outputs as the peer library's own model, for every DDIM config of the paper (shrunk), and a round trip through a
diffusers model folder gives the tensors back bit for bit."""

import copy
import os
import subprocess
import sys

import pytest
import torch

import pndm_fast
from pndm_fast import UserError, load_config
from pndm_fast.cli import main
from pndm_fast.models import build_model, save_state_dict
from pndm_fast.models.checkpoint import read_state_dict
from pndm_fast.models.ddim import timestep_embedding
from pndm_fast.models.diffusers_layout import (
    from_diffusers_config,
    to_diffusers,
    to_diffusers_config,
    to_paper,
)

diffusers = pytest.importorskip("diffusers")

# (config, shrink): ch 32 everywhere (the smallest GroupNorm(32) allows); the 256x256 LSUN UNets run at 64x64 with
# attention moved from 16 to 4, so that it stays at the same level (the fifth of six) and the layout is the same
CONFIGS = [("ddim-cifar10", 1), ("ddim-celeba", 1), ("ddim-church", 4), ("ddim-bedroom", 4), ("digits", 1),
           ("digits-cond", 1)]
TOLERANCE = 1e-6  # relative L2, float32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; these UNets are small
    yield
    torch.set_num_threads(threads)


def small_model_section(name: str, shrink: int) -> dict:
    model = copy.deepcopy(load_config(name)["Model"])
    model.update(ch=32, dropout=0.0, image_size=model["image_size"] // shrink,
                 attn_resolutions=[r // shrink for r in model["attn_resolutions"]])
    return model


def diffusers_unet(config: dict) -> torch.nn.Module:
    return diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()


def inputs(model: dict, times=(1.0, 4.0)):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(times), model["in_channels"], model["image_size"], model["image_size"], generator=gen)
    labels = torch.tensor([3, model["num_classes"]])[: len(times)] if model.get("num_classes") else None
    return x, torch.tensor(times), labels


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def outputs(ours, unet, x, t, labels):
    with torch.no_grad():
        return ours(x, t, labels) if labels is not None else ours(x, t), unet(x, t, class_labels=labels).sample


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn anew, GroupNorm affines and biases included (a fresh init leaves them 1 and 0, and
    a swapped pair of those would go unseen)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p[0].numel() ** 0.5 if p.dim() > 1 else 0.2))


@pytest.mark.parametrize("name,shrink", CONFIGS)
def test_diffusers_unet_converted_to_the_paper_layout_gives_its_outputs(name, shrink):
    model = small_model_section(name, shrink)
    unet = diffusers_unet(to_diffusers_config(model))
    randomize(unet, 0)
    state, derived = to_paper(unet.state_dict(), dict(unet.config))
    for key in ("image_size", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions"):
        assert derived[key] == model[key], key
    assert derived.get("num_classes", 0) == model.get("num_classes", 0)
    ours = build_model({"Model": derived}).eval()
    ours.load_state_dict(state, strict=True)
    a, b = outputs(ours, unet, *inputs(model))
    assert relative_l2(a, b) <= TOLERANCE


@pytest.mark.parametrize("name,shrink", CONFIGS)
def test_paper_unet_converted_to_diffusers_gives_its_outputs(name, shrink):
    model = small_model_section(name, shrink)
    ours = build_model({"Model": model}).eval()
    randomize(ours, 1)
    state, config = to_diffusers(ours.state_dict(), model)
    unet = diffusers_unet(config)
    unet.load_state_dict(state, strict=True)
    a, b = outputs(ours, unet, *inputs(model))
    assert relative_l2(a, b) <= TOLERANCE


def test_the_two_time_embeddings_are_the_same_sinusoid():
    """[sin | cos] with freq_k = exp(-k ln 1e4 / (half - 1)) on both sides: flip_sin_to_cos false, freq_shift 1.
    They differ only by float32 rounding of the frequencies (diffusers divides after multiplying), at most
    t x 2 ulp(1) = 2.4e-4 at t = 999; a flipped order or another shift would differ by O(1)."""
    unet = diffusers_unet(to_diffusers_config(small_model_section("ddim-cifar10", 1)))
    t = torch.arange(0, 1000, 37, dtype=torch.float32)
    with torch.no_grad():
        difference = (timestep_embedding(t, 32) - unet.time_proj(t)).abs().max().item()
    assert difference <= 999 * 2 * 2**-23
    freqs = torch.exp(-torch.arange(16, dtype=torch.float64) * torch.log(torch.tensor(1e4, dtype=torch.float64)) / 15)
    exact = torch.cat([torch.sin(t.double()[:, None] * freqs), torch.cos(t.double()[:, None] * freqs)], 1)
    assert (unet.time_proj(t).double() - exact).abs().max().item() <= 999 * 2 * 2**-23


class PaperSinusoid(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


def test_in_float64_with_one_sinusoid_the_networks_agree_to_rounding():
    """Late times too: with the time embedding computed once (both sides compute it in float32, each with its
    own rounding), the rest of the network agrees to float64 rounding, so the mapping itself is exact."""
    model = small_model_section("ddim-cifar10", 1)
    ours = build_model({"Model": model}).eval().double()
    randomize(ours, 2)
    state, config = to_diffusers(ours.state_dict(), model)
    unet = diffusers_unet(config).double()
    unet.load_state_dict(state, strict=True)
    unet.time_proj = PaperSinusoid(model["ch"])  # the paper's sinusoid on both sides
    x, t, _ = inputs(model, times=(500.0, 999.0))
    a, b = outputs(ours, unet, x.double(), t.double(), None)
    assert relative_l2(a, b) <= 1e-13


def test_round_trip_through_a_diffusers_folder_on_the_command_line(tmp_path, capsys):
    """paper checkpoint -> diffusers folder (loaded by diffusers' from_pretrained) -> paper checkpoint again,
    bit for bit; the shipped class-conditional digits model takes this path too."""
    config = load_config("digits-cond")
    ours = build_model(config).eval()
    randomize(ours, 3)
    save_state_dict(ours.state_dict(), tmp_path / "in.safetensors")
    folder = tmp_path / "digits-cond-diffusers"
    assert main(["--runner", "convert", "--config", "digits-cond", "--model_path", str(tmp_path / "in.safetensors"),
                 "--out_path", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(f"converted {tmp_path / 'in.safetensors'} -> {folder}: ")
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    unet = diffusers.UNet2DModel.from_pretrained(folder, local_files_only=True).eval()
    a, b = outputs(ours, unet, *inputs(config["Model"]))
    assert relative_l2(a, b) <= TOLERANCE
    back = tmp_path / "back.safetensors"
    assert main(["--runner", "convert", "--config", "digits-cond", "--model_path", str(folder),
                 "--out_path", str(back)]) == 0
    original, again = ours.state_dict(), read_state_dict(back)
    assert list(again) == list(original)
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_diffusers_save_pretrained_folder_converts(tmp_path):
    """A folder written by diffusers itself (not by us), including the older attention names of the
    google/ddpm-* files (query, key, value, proj_attn)."""
    model = small_model_section("ddim-cifar10", 1)
    unet = diffusers_unet(to_diffusers_config(model))
    randomize(unet, 4)
    unet.save_pretrained(tmp_path / "saved", safe_serialization=True)
    out = tmp_path / "paper.ckpt"
    assert main(["--runner", "convert", "--model_path", str(tmp_path / "saved"), "--out_path", str(out)]) == 0
    ours = build_model({"Model": model}).eval()
    ours.load_state_dict(read_state_dict(out), strict=True)
    a, b = outputs(ours, unet, *inputs(model))
    assert relative_l2(a, b) <= TOLERANCE
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v for k, v in unet.state_dict().items()}
    assert any(".query." in k for k in legacy)
    state, _ = to_paper(legacy, dict(unet.config))
    assert all(torch.equal(state[k], v) for k, v in read_state_dict(out).items())


def test_what_diffusers_cannot_express_is_refused_with_one_line(tmp_path, capsys):
    model = small_model_section("ddim-cifar10", 1)
    with pytest.raises(UserError, match="always resamples with a conv"):
        to_diffusers_config({**model, "resamp_with_conv": False})
    with pytest.raises(UserError, match="logvar"):
        to_diffusers_config({**model, "type": "bayesian"})
    with pytest.raises(UserError, match="iDDPM UNet is another network"):
        to_diffusers_config(load_config("iddpm-cifar10")["Model"])
    config = to_diffusers_config(model)
    for key, value, message in (("flip_sin_to_cos", True, "flip_sin_to_cos: True"),
                                ("freq_shift", 0, "freq_shift: 0"),
                                ("downsample_padding", 1, "downsample_padding: 1"),
                                ("attention_head_dim", 8, "more than one attention head"),
                                ("time_embedding_type", "fourier", "time_embedding_type"),
                                ("_class_name", "UNet2DConditionModel", "not a UNet2DModel")):
        with pytest.raises(UserError, match=message):
            from_diffusers_config({**config, key: value})
    up = list(config["up_block_types"])
    with pytest.raises(UserError, match="attention at other levels"):
        from_diffusers_config({**config, "up_block_types": up[::-1]})
    with pytest.raises(UserError, match="diffusers' defaults differ"):
        from_diffusers_config({k: v for k, v in config.items() if k != "freq_shift"})
    shipped = os.path.join(os.path.dirname(pndm_fast.__file__), "weights", "digits.safetensors")
    assert main(["--runner", "convert", "--model_path", shipped, "--out_path", str(tmp_path / "folder")]) == 2
    assert "needs the checkpoint's --config" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main(["--runner", "convert", "--config", "digits", "--model_path", shipped,
                 "--out_path", str(tmp_path / "taken")]) == 2
    assert "exists and is not overwritten" in capsys.readouterr().err
    assert main(["--runner", "convert", "--config", "ddim-cifar10", "--model_path", shipped,
                 "--out_path", str(tmp_path / "wrong")]) == 2
    assert "does not match the model" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "wrong")


def test_the_package_converts_without_diffusers(tmp_path):
    """Writing a diffusers folder needs no diffusers: run with it made unimportable."""
    shipped = os.path.join(os.path.dirname(pndm_fast.__file__), "weights", "digits.safetensors")
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from pndm_fast.cli import main\n"
            f"sys.exit(main(['--runner', 'convert', '--config', 'digits', '--model_path', {shipped!r}, "
            f"'--out_path', {str(tmp_path / 'out')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "diffusion_pytorch_model.safetensors"]
