"""Checkpoints: a pickle that would run code is refused everywhere a file is read, safetensors round trips are
bitwise, and --runner convert writes the same tensors in the other format or refuses with one line."""

import copy
import json
import os
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pndm_fast
import pndm_fast.models.checkpoint as checkpoint_module
from pndm_fast import UserError, load_config
from pndm_fast.cli import main
from pndm_fast.models import build_model, load_checkpoint, save_state_dict
from pndm_fast.models.checkpoint import read_state_dict
from pndm_fast.runners.train import STATE_FILE, load_train_state, train

SHIPPED = os.path.join(os.path.dirname(pndm_fast.__file__), "weights", "digits.safetensors")


class CreatesFile:
    """Unpickling this calls open(path, "w"), which creates the file: a stand-in for any code in a pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_malicious(path, marker, how: str) -> None:
    """A would-be state dict whose one value runs code on unpickling, written by torch.save or plain pickle."""
    payload = {"conv_in.weight": CreatesFile(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(how.split()[-1]))


def unpickle_unsafely(path, how: str):
    """What a loader without weights_only does: it runs the pickle's code (and returns an open file)."""
    if how == "torch.save":
        return torch.load(path, weights_only=False)
    with open(path, "rb") as f:
        return pickle.load(f)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: torch.equal says -0.0 == 0.0 and NaN != NaN, a byte comparison does neither."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)  # same keys, same order
    for key, value in a.items():
        assert value.dtype == b[key].dtype and value.shape == b[key].shape, key
        assert torch.equal(bits(value), bits(b[key])), key


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pndm-fast: error: ") and "Traceback" not in err, err
    return lines[0]


HOWS = ["torch.save", "pickle protocol 2", "pickle protocol 5"]
SUFFIX = {"torch.save": ".ckpt", "pickle protocol 2": ".pt", "pickle protocol 5": ".pth"}
# weights_only=True names the global it refused when it gets that far (io.open pickles as "_io.open" from Python
# 3.12 on); protocol 5's framing is refused earlier
REFUSAL = {"torch.save": r"would execute code and was refused \(Unsupported global: GLOBAL _?io\.open",
           "pickle protocol 2": r"would execute code and was refused \(Unsupported global: GLOBAL _?io\.open",
           "pickle protocol 5": "was refused: it is not a plain state dict saved by torch.save"}


@pytest.mark.parametrize("how", HOWS)
def test_code_executing_pickle_is_refused_and_never_runs(how, tmp_path, capsys):
    marker, evil = tmp_path / "created_by_the_pickle", tmp_path / f"evil{SUFFIX[how]}"
    write_malicious(evil, marker, how)
    assert not marker.exists()
    with pytest.raises(UserError) as err:
        load_checkpoint(build_model(load_config("digits")), evil)
    assert "\n" not in str(err.value) and re.search(REFUSAL[how], str(err.value))
    out = tmp_path / "out.safetensors"
    assert main(["--runner", "convert", "--model_path", str(evil), "--out_path", str(out)]) == 2
    assert re.search(REFUSAL[how], one_error_line(capsys.readouterr().err))
    assert main(["--config", "digits", "--model_path", str(evil), "--image_path", str(tmp_path / "images"),
                 "--device", "cpu", "--no_progress"]) == 2
    one_error_line(capsys.readouterr().err)
    assert not marker.exists() and not out.exists() and not (tmp_path / "images").exists()
    # the same file, read the way weights_only=True prevents, does run its code: the refusal above mattered
    loaded = unpickle_unsafely(evil, how)
    loaded["conv_in.weight"].close()
    assert marker.exists()


def test_code_executing_train_state_is_refused(tmp_path, capsys):
    config = copy.deepcopy(load_config("digits"))
    config["Train"]["max_steps"] = 1
    marker = tmp_path / "created_by_the_pickle"
    write_malicious(tmp_path / STATE_FILE, marker, "torch.save")
    with pytest.raises(UserError, match="would execute code and was refused"):
        load_train_state(str(tmp_path / STATE_FILE), torch.device("cpu"))
    with pytest.raises(UserError, match="would execute code and was refused"):
        train(config, str(tmp_path), restart=True, progress=False)
    assert main(["--runner", "train", "--config", "digits", "--train_path", str(tmp_path), "--restart",
                 "--device", "cpu", "--no_progress"]) == 2
    assert "would execute code" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == [STATE_FILE]  # nothing was written over or beside it


def test_train_state_that_is_not_one_is_refused(tmp_path):
    torch.save({"conv_in.weight": torch.zeros(1)}, tmp_path / STATE_FILE)  # a plain state dict, not a run's state
    with pytest.raises(UserError, match="not written by --runner train"):
        load_train_state(str(tmp_path / STATE_FILE), torch.device("cpu"))


class Tied(torch.nn.Module):
    """Two layers sharing one weight (weight tying): their state_dict() holds one storage under two keys."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 4, bias=False)
        self.head = torch.nn.Linear(6, 4)
        self.head.weight = self.embed.weight


def awkward_state() -> dict:
    """Every kind of tensor a state dict can hold, keys deliberately out of alphabetical order (safetensors
    sorts them), with bit patterns that a value comparison would miss."""
    torch.manual_seed(0)
    tied = Tied().state_dict()
    base = torch.randn(5, 7)
    half = torch.tensor([-0.0, float("nan"), 65504.0, 6e-8, 1.0], dtype=torch.float16)
    return {
        "z.tied.embed.weight": tied["embed.weight"],
        "z.tied.head.weight": tied["head.weight"],  # the same storage as the key above
        "y.bf16": torch.randn(3, 4).bfloat16(),
        "a.fp16": half,
        "m.transposed": base.t(),  # non-contiguous
        "b.overlapping.rows": base[1:4],  # a view overlapping the next one
        "c.overlapping.more": base[2:5],
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "steps": torch.arange(4),
        "empty": torch.zeros(0, 3),
        "flags": torch.tensor([True, False]),
    }


def test_raw_safetensors_refuses_shared_tensors(tmp_path):
    """The reference that makes the next test meaningful: safetensors itself rejects this state dict."""
    with pytest.raises(RuntimeError, match="share memory"):
        save_file({k: v.contiguous() for k, v in awkward_state().items()}, str(tmp_path / "raw.safetensors"))


@pytest.mark.parametrize("name", ["state.safetensors", "state.ckpt", "state.pt", "state.pth"])
def test_round_trip_is_bitwise_in_order(name, tmp_path):
    state = awkward_state()
    save_state_dict(state, tmp_path / name)
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind
    loaded = read_state_dict(tmp_path / name)
    assert_same_state(state, loaded)
    if name.endswith(".safetensors"):  # an independent reader sees the same tensors
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert sorted(f.keys()) == sorted(state)
            for key in state:
                assert torch.equal(bits(f.get_tensor(key)), bits(state[key])), key
        loaded["z.tied.embed.weight"].add_(1)  # what was shared on save is independent on load
        assert not torch.equal(loaded["z.tied.head.weight"], loaded["z.tied.embed.weight"])


def test_safetensors_from_elsewhere_loads_in_file_order(tmp_path):
    model = build_model(load_config("digits"))
    save_file(model.state_dict(), str(tmp_path / "other.safetensors"))  # no key order in its metadata
    target = load_checkpoint(build_model(load_config("digits")), tmp_path / "other.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


def test_data_parallel_prefix_is_dropped_explicitly(tmp_path):
    source = build_model(load_config("digits"))
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    save_state_dict(wrapped, tmp_path / "dp.ckpt")
    target = load_checkpoint(build_model(load_config("digits")), tmp_path / "dp.ckpt")
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    # only a prefix on every key is a DataParallel checkpoint; a partial one is a mismatch like any other
    partly = dict(source.state_dict())
    partly["module.conv_in.weight"] = partly.pop("conv_in.weight")
    save_state_dict(partly, tmp_path / "partly.ckpt")
    with pytest.raises(UserError, match=r"1 missing keys \(conv_in.weight\)"):
        load_checkpoint(build_model(load_config("digits")), tmp_path / "partly.ckpt")


def test_convert_round_trip_of_the_shipped_weights(tmp_path, capsys):
    shipped = read_state_dict(SHIPPED)
    ckpt, back = tmp_path / "digits.ckpt", tmp_path / "digits.safetensors"
    assert main(["--runner", "convert", "--config", "digits", "--model_path", SHIPPED, "--out_path", str(ckpt)]) == 0
    line = capsys.readouterr().out.strip()
    parameters = sum(v.numel() for v in shipped.values())
    assert line == (f"converted {SHIPPED} -> {ckpt}: {len(shipped)} tensors, {parameters:,} parameters, "
                    f"{os.path.getsize(SHIPPED):,} -> {os.path.getsize(ckpt):,} bytes")
    assert_same_state(shipped, torch.load(ckpt, weights_only=True))  # read back by torch itself
    assert main(["--runner", "convert", "--model_path", str(ckpt), "--out_path", str(back)]) == 0
    assert_same_state(shipped, read_state_dict(back))
    assert sorted(os.listdir(tmp_path)) == ["digits.ckpt", "digits.safetensors"]
    with safe_open(str(back), framework="pt") as f:
        assert json.loads(f.metadata()["pndm_fast.key_order"]) == list(shipped)


def test_convert_keeps_dtypes_and_keys(tmp_path, capsys):
    state = awkward_state()
    save_state_dict(state, tmp_path / "in.pt")
    assert main(["--runner", "convert", "--model_path", str(tmp_path / "in.pt"),
                 "--out_path", str(tmp_path / "out.safetensors")]) == 0
    assert_same_state(state, read_state_dict(tmp_path / "out.safetensors"))
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_convert_checks_the_config_with_a_data_parallel_prefix(tmp_path, capsys):
    model = build_model(load_config("digits"))
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    save_state_dict(wrapped, tmp_path / "dp.pth")
    out = tmp_path / "dp.safetensors"
    assert main(["--runner", "convert", "--config", "digits", "--model_path", str(tmp_path / "dp.pth"),
                 "--out_path", str(out)]) == 0
    assert_same_state(wrapped, read_state_dict(out))  # keys are converted as they are, prefix included
    load_checkpoint(build_model(load_config("digits")), out)


def refusal(capsys, tmp_path, *argv) -> str:
    before = sorted(os.listdir(tmp_path))
    assert main(["--runner", "convert", *argv]) == 2
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary file left
    return one_error_line(capsys.readouterr().err)


def test_convert_refusals(tmp_path, capsys):
    good = tmp_path / "good.ckpt"
    save_state_dict(build_model(load_config("digits")).state_dict(), good)
    torch.save({"model": {"w": torch.zeros(1)}, "step": 3}, tmp_path / "run.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    out = str(tmp_path / "out.safetensors")
    assert "not found" in refusal(capsys, tmp_path, "--model_path", str(tmp_path / "absent.ckpt"), "--out_path", out)
    assert "needs --model_path IN and --out_path OUT" in refusal(capsys, tmp_path, "--model_path", str(good))
    assert "unknown extension '.bin'" in refusal(capsys, tmp_path, "--model_path", str(good), "--out_path",
                                                 str(tmp_path / "out.bin"))
    assert "unknown extension '.npz'" in refusal(capsys, tmp_path, "--model_path", str(tmp_path / "x.npz"),
                                                 "--out_path", out)
    assert "2 entries are something else (model, step)" in refusal(
        capsys, tmp_path, "--model_path", str(tmp_path / "run.pt"), "--out_path", out)
    assert "holds a list" in refusal(capsys, tmp_path, "--model_path", str(tmp_path / "list.pt"), "--out_path", out)
    assert "is the input checkpoint itself" in refusal(
        capsys, tmp_path, "--model_path", str(good), "--out_path", os.path.join(tmp_path, ".", "good.ckpt"))
    assert "exists and is not overwritten" in refusal(
        capsys, tmp_path, "--model_path", str(good), "--out_path", str(tmp_path / "taken.safetensors"))
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"
    assert "does not match the model" in refusal(
        capsys, tmp_path, "--config", "ddim-cifar10", "--model_path", str(good), "--out_path", out)


def full_disk_after(monkeypatch, nbytes: int) -> None:
    """A disk that fills up after `nbytes` more bytes: ENOSPC injected at the one call through which every
    temporary file's bytes go (pndm_fast.atomic._write), as a real full disk raises it from write(2)."""
    import pndm_fast.atomic as atomic

    left = [nbytes]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(28, "No space left on device")
        n = os.write(fd, bytes(data[: left[0]]))
        left[0] -= n
        return n

    monkeypatch.setattr(atomic, "_write", write)


@pytest.mark.parametrize("out", ["out.safetensors", "out.ckpt"])
def test_a_full_disk_is_one_line_and_leaves_no_output(tmp_path, monkeypatch, capsys, out):
    save_state_dict(build_model(load_config("digits")).state_dict(), tmp_path / "good.ckpt")
    full_disk_after(monkeypatch, 100_000)
    assert main(["--runner", "convert", "--model_path", str(tmp_path / "good.ckpt"),
                 "--out_path", str(tmp_path / out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"no space left on the device writing {tmp_path / out}" in line and " free in " in line, line
    assert os.listdir(tmp_path) == ["good.ckpt"]
    monkeypatch.undo()
    assert main(["--runner", "convert", "--model_path", str(tmp_path / "good.ckpt"),
                 "--out_path", str(tmp_path / out)]) == 0  # the rerun, with space again, completes


def test_an_output_that_appears_while_converting_is_kept(tmp_path, monkeypatch, capsys):
    """The existence check runs before the (slow) write; a file another process puts under --out_path meanwhile is
    neither replaced nor removed, and the temporary file goes."""
    save_state_dict(build_model(load_config("digits")).state_dict(), tmp_path / "good.ckpt")
    out = tmp_path / "out.safetensors"
    write = checkpoint_module.write_state_dict

    def racing_write(state, file, *, safetensors):
        write(state, file, safetensors=safetensors)
        out.write_bytes(b"someone else's")

    monkeypatch.setattr(checkpoint_module, "write_state_dict", racing_write)
    assert main(["--runner", "convert", "--model_path", str(tmp_path / "good.ckpt"), "--out_path", str(out)]) == 2
    assert "appeared while converting; it was left as it is" in one_error_line(capsys.readouterr().err)
    assert out.read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == ["good.ckpt", "out.safetensors"]


@pytest.mark.parametrize("order", ['5', '{"w": 1}', '["w", ["x"]]', '[1, 2]', 'not json'])
def test_key_order_metadata_of_the_wrong_type_is_not_a_traceback(order, tmp_path, capsys):
    """The key-order entry of a .safetensors header, when it is not a list of the file's keys (another program's,
    or edited), is ignored: the tensors load in the file's order, as a file from elsewhere does; a value that is
    not even JSON is refused in one line. Before, a number or a list of lists there raised a TypeError."""
    import json
    import struct

    from pndm_fast.models.checkpoint import KEY_ORDER, read_state_dict

    header = json.dumps({"__metadata__": {KEY_ORDER: order}, "w": {"dtype": "F32", "shape": [1],
                                                                  "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.5))
    if order == "not json":
        with pytest.raises(UserError, match="not a valid .safetensors file"):
            read_state_dict(path)
    else:
        assert read_state_dict(path) == {"w": torch.tensor([1.5])}
