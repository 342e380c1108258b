"""The two UNets against the reference implementation's outputs, the published key manifests, and the
checkpoint loader's refusals."""

import math

import numpy as np
import pytest
import torch
from conftest import golden_json, golden_path

from pndm_fast.config import load_config
from pndm_fast.errors import UserError
from pndm_fast.models import build_model, load_checkpoint, save_state_dict
from pndm_fast.models.ddim import timestep_embedding as ddim_embedding

SMALL = {"DDIM": "ddim_small_linear", "iDDPM": "iddpm_small_cosine"}
PUBLISHED = ["ddim-cifar10", "ddim-celeba", "ddim-church", "ddim-bedroom", "iddpm-cifar10"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def small_model(struc: str, dtype=torch.float32) -> torch.nn.Module:
    """The 16x16 golden model of `struc` with its trained weights, in eval mode."""
    name = SMALL[struc]
    config = {"Model": golden_json(f"{name}_seed1.json")["Model"], "Dataset": {"image_size": 16}}
    model = build_model(config).eval()
    load_checkpoint(model, golden_path(f"{name}.ckpt"))
    return model.to(dtype)


def golden_forward(struc: str):
    """x (3, 3, 16, 16), t (4,) float64, eps (4, 3, 3, 16, 16): the reference model's output at each t."""
    data = np.load(golden_path(f"{SMALL[struc]}_forward.npz"))
    return torch.from_numpy(data["x"]), torch.from_numpy(data["t"]), torch.from_numpy(data["eps"])


@pytest.mark.parametrize("struc", ["DDIM", "iDDPM"])
def test_forward_matches_reference(struc):
    model = small_model(struc)
    x, ts, eps = golden_forward(struc)
    with torch.no_grad():
        for i, (t, ref) in enumerate(zip(ts.tolist(), eps)):
            # every other call with channels_last input, the layout the GPU engine uses
            x_in = x.to(memory_format=torch.channels_last) if i % 2 else x
            out = model(x_in, torch.full((x.shape[0],), t))
            # The reference's iDDPM forward returns only the eps half of its learned-sigma output.
            assert rel_err(out[:, : ref.shape[1]], ref) <= 1e-5, f"t={t}"


@pytest.mark.parametrize("channels_last", [False, True])
def test_iddpm_eps_only_is_the_eps_half_dense(channels_last):
    """eps_only computes the first C output channels alone: equal to the full output's first C channels (same
    weights, same input to the last conv), dense, and still the reference's eps."""
    model = small_model("iDDPM")
    assert model.out[2].out_channels == 6 and type(model).eps_only_supported
    x, ts, eps = golden_forward("iDDPM")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        t = torch.full((x.shape[0],), ts[2].item())
        full, only = model(x, t), model(x, t, eps_only=True)
    dense = only.is_contiguous() or only.is_contiguous(memory_format=torch.channels_last)
    assert only.shape == (3, 3, 16, 16) and dense
    torch.testing.assert_close(only, full[:, :3], rtol=1e-6, atol=1e-6)
    assert rel_err(only, eps[2]) <= 1e-5


def test_iddpm_eps_only_without_learned_sigma_is_the_whole_output():
    config = {"Model": dict(golden_json("iddpm_small_cosine_seed1.json")["Model"], out_channels=3),
              "Dataset": {"image_size": 16}}
    torch.manual_seed(0)
    model = build_model(config).eval()
    torch.nn.init.normal_(model.out[2].weight)  # zero-initialised at build: make the output non-trivial
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, torch.full((2,), 3.0), eps_only=True), model(x, torch.full((2,), 3.0)))


@pytest.mark.parametrize("name", PUBLISHED)
def test_keys_and_shapes_match_published_checkpoints(name):
    manifest = golden_json(f"manifests/{name.replace('-', '_')}.keys.json")
    with torch.device("meta"):
        model = build_model(load_config(name))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert model.out_channels_eps == 3


def test_ddim_float64_uses_float32_timestep_embedding():
    model = small_model("DDIM", torch.float64)
    x, ts, eps = golden_forward("DDIM")
    with torch.no_grad():
        out = model(x.double(), torch.full((3,), ts[1].item(), dtype=torch.float64))
        assert out.dtype == torch.float64
        assert rel_err(out, eps[1]) <= 1e-5
        # 1000/3 is not a float32 number: an embedding computed in float64 would change the output.
        t = torch.full((3,), 1000 / 3, dtype=torch.float64)
        assert torch.equal(model(x.double(), t), model(x.double(), t.float()))


def test_timestep_embedding_is_float32_sin_then_cos():
    t = torch.tensor([1000 / 3], dtype=torch.float64)
    emb = ddim_embedding(t, 8)
    freqs = torch.exp(torch.arange(4, dtype=torch.float32) * -(math.log(10000) / 3))
    args = torch.tensor([1000 / 3], dtype=torch.float32) * freqs
    assert emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.cat([args.sin(), args.cos()]))


@pytest.mark.parametrize("struc", ["DDIM", "iDDPM"])
def test_bfloat16_model_is_close_to_float32(struc):
    x, _, _ = golden_forward(struc)
    t = torch.full((3,), 17.5)
    with torch.no_grad():
        ref = small_model(struc)(x, t)
        out = small_model(struc, torch.bfloat16)(x.bfloat16(), t)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 5e-2


def test_ddim_refuses_wrong_image_size():
    model = small_model("DDIM")
    with pytest.raises(ValueError, match="16x16"):
        model(torch.zeros(1, 3, 16, 8), torch.zeros(1))


def test_unknown_struc():
    with pytest.raises(UserError, match="unknown Model.struc 'UNet'"):
        build_model({"Model": {"struc": "UNet"}})


def tiny_ddim() -> torch.nn.Module:
    config = {"Model": golden_json("ddim_small_linear_seed1.json")["Model"]}
    return build_model(config)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found.*luping-liu/PNDM"):
        load_checkpoint(tiny_ddim(), tmp_path / "nope.ckpt")


def test_renamed_key(tmp_path):
    model = tiny_ddim()
    state = model.state_dict()
    state["conv_in.weight_renamed"] = state.pop("conv_in.weight")
    save_state_dict(state, tmp_path / "renamed.ckpt")
    with pytest.raises(UserError, match=r"1 missing keys \(conv_in.weight\), 1 unexpected keys \(conv_in.weight_renamed\)"):
        load_checkpoint(model, tmp_path / "renamed.ckpt")


def test_wrong_shape(tmp_path):
    model = tiny_ddim()
    state = model.state_dict()
    state["conv_out.bias"] = torch.zeros(6)
    save_state_dict(state, tmp_path / "shape.pt")
    with pytest.raises(UserError, match=r"conv_out.bias \(checkpoint \[6\] vs model \[3\]\)"):
        load_checkpoint(model, tmp_path / "shape.pt")


def test_safetensors_round_trip(tmp_path):
    source, target = tiny_ddim(), tiny_ddim()
    save_state_dict(source.state_dict(), tmp_path / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left behind
    load_checkpoint(target, tmp_path / "model.safetensors")
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key])


class Exploit:
    """Unpickling this would create the file `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": Exploit(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="would execute code and was refused"):
        load_checkpoint(tiny_ddim(), tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_garbage_file_is_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a plain state dict"):
        load_checkpoint(tiny_ddim(), tmp_path / "junk.pth")
