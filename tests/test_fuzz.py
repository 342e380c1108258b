"""Bad input, fuzzed: configs, command-line flags and noise tensors either work or fail with a one-line UserError
(exit code 2 on the command line), never with another exception or a traceback."""

import contextlib
import copy
import io
import math
import os
import re
import tempfile

import pytest
import torch
from conftest import torch_threads
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pndm_fast import Schedule, UserError, sample
from pndm_fast.cli import main
from pndm_fast.continuous import schedule_from_config
from pndm_fast.config import (
    MAX_TOTAL_NUM,
    SECTIONS,
    bundled_config_names,
    load_config,
    validate_config,
    validate_model,
)
from pndm_fast.models import DDIMUNet, IDDPMUNet, build_model, save_state_dict
from pndm_fast.methods import METHODS, build_plan
from pndm_fast.plans import Lin
from pndm_fast.sampling import BACKENDS

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BUNDLED = {name: load_config(name) for name in bundled_config_names()}
KEY_NAMED = re.compile(r"\b(" + "|".join(SECTIONS) + r")(\.\w+| is)|section (" + "|".join(SECTIONS) + r")\b"
                       r"|unknown section '\w+'")

TINY_DDIM = {
    "Schedule": {"type": "linear", "beta_start": 0.0001, "beta_end": 0.02, "diffusion_step": 1000},
    "Model": {"struc": "DDIM", "ch": 32, "out_ch": 1, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [2],
              "dropout": 0.0, "in_channels": 1, "image_size": 4, "resamp_with_conv": True},
    "Sample": {"batch_size": 2, "total_num": 2},
}
TINY_IDDPM = {
    "Model": {"struc": "iDDPM", "in_channels": 2, "model_channels": 32, "out_channels": 4, "num_res_blocks": 1,
              "attention_resolutions": [2], "dropout": 0.0, "channel_mult": [1, 2], "conv_resample": True,
              "use_scale_shift_norm": True, "num_heads": 2, "num_heads_upsample": 2},
    "Dataset": {"image_size": 4},
}
SCHEDULE = Schedule.from_config(TINY_DDIM["Schedule"])


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    """The models here are tiny: a second OpenMP thread saves nothing, and on a busy machine the threads' barrier
    waits made each call ~30x slower."""
    with torch_threads(1):
        yield


def assert_one_line_user_error(err: UserError) -> str:
    message = str(err)
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


_FORWARDS_SEEN: set = set()


def meta_forward_works(config: dict) -> None:
    """Build the model on the meta device and run one forward there: shapes only, no memory, no arithmetic.
    A model section already checked is skipped (most mutations touch other sections; a forward takes seconds)."""
    seen = repr((config["Model"], (config.get("Dataset") or {}).get("image_size")))
    if seen in _FORWARDS_SEEN:
        return
    _FORWARDS_SEEN.add(seen)
    with torch.device("meta"):
        model = build_model(config)
        factor = 2 ** (len(model.down) - 1) if isinstance(model, DDIMUNet) else 2**model.num_downsamples
        size = model.image_size or 2 * factor
        # batch 2: one image at a 1x1 lowest level is refused by GroupNorm (sample() says so)
        out = model(torch.zeros(2, model.out_channels_eps, size, size), torch.zeros(2))
    assert out.shape[0] == 2 and out.shape[1] >= model.out_channels_eps and out.shape[2:] == (size, size)


# --- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_every_bundled_config_validates_builds_and_runs_on_meta(name):
    config = BUNDLED[name]
    validate_config(config)
    meta_forward_works(config)
    plan = build_plan(schedule_from_config(config["Schedule"]), "F-PNDM", 50)
    assert plan.model_calls == 4 * 3 + 47


NASTY = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-1, 0, 1, 2, 3, 7, 16, 31, 32, 33, 64, 96, 2**31, 2**63, 10**400]),
    st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["1e-4", "0.02", "32", "linear", "cosine", "DDIM", "iDDPM"]),
    st.lists(st.integers(-2, 40), max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def mutated_configs(draw):
    """A bundled config with a few of its keys (or whole sections) replaced, deleted, or added. The 256-pixel
    configs share their layout with these and take seconds per forward even on meta, so they are left out."""
    config = copy.deepcopy(BUNDLED[draw(st.sampled_from(["digits", "ddim-cifar10", "iddpm-cifar10"]))])
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(SECTIONS + ("Extra",)))
        action = draw(st.sampled_from(["set", "set", "set", "delete_key", "delete_section", "replace_section"]))
        if action == "delete_section":
            config.pop(section, None)
        elif action == "replace_section":
            config[section] = draw(NASTY)
        elif isinstance(config.get(section), dict):
            keys = sorted(config[section]) + ["unknown_key"]
            key = draw(st.sampled_from(keys))
            if action == "delete_key":
                config[section].pop(key, None)
            else:
                config[section][key] = draw(NASTY)
    return config


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs())
@example({**load_config("digits"), "Schedule": {"": 0}})  # an empty key, found by this test
def test_a_mutated_config_is_either_valid_or_refused_in_one_line_naming_the_key(config):
    try:
        validate_config(config)
    except UserError as err:
        message = assert_one_line_user_error(err)
        assert KEY_NAMED.search(message) or "Schedule and Model" in message, message
        return
    # Valid: the model builds and runs (on meta), and the schedule either gives plans with finite
    # coefficients or is refused in one line (a table that underflows in float32 is only seen once computed).
    meta_forward_works(config)
    try:
        schedule = Schedule.from_config(config["Schedule"])
        plan = build_plan(schedule, "F-PNDM", min(10, schedule.num_steps // 2))
    except UserError as err:
        assert_one_line_user_error(err)
        return
    weights = [w for step in plan.steps for e in step if isinstance(e, Lin) for w in e.expr.terms.values()]
    assert weights and all(math.isfinite(w) for w in weights)


BAD_VALUES = {
    ("Model", "ch"): [-32, 0, 31, 48, "128", 128.0, None, [128], True, 2**40],
    ("Model", "num_res_blocks"): [-1, 0, 2.5, "2", None, 10**9],
    ("Model", "ch_mult"): [[], [0, 1], [1, -2], "1,2", 2, None, [1.5]],
    ("Model", "image_size"): [0, -32, 33, "32", None, 1.0e9],
    ("Model", "in_channels"): [0, -3, "3", None],
    ("Model", "out_ch"): [0, 2, "3", None],
    ("Model", "attn_resolutions"): [16, "16", None, [16.0]],
    ("Model", "dropout"): [-0.1, 1.0, "0.1", float("nan"), None],
    ("Model", "resamp_with_conv"): ["yes", 1, None],
    ("Schedule", "diffusion_step"): [0, 1, -1000, "1000", 1000.0, True, None, 10**12],
    ("Schedule", "beta_start"): [0, -1e-4, 1.0, 2.0, "1e-4", float("nan"), float("inf"), None],
    ("Schedule", "beta_end"): [0, 1.5, "0.02", None, 1e-5],
    ("Schedule", "type"): ["sigmoid", 1, None],
    ("Dataset", "channels"): [0, "3", -1],
    ("Sample", "batch_size"): [0, -1, "64", MAX_TOTAL_NUM + 1],
    ("Sample", "total_num"): [0, "12500", None],
    ("Optim", "lr"): [0, -1e-3, 10**400, "1e-3", float("inf")],
    ("Train", "ema_rate"): [1.5, -0.1, 10**400],
}


@pytest.mark.parametrize("section,key,value", [(s, k, v) for (s, k), values in BAD_VALUES.items() for v in values])
def test_a_bad_value_names_its_key(section, key, value):
    config = copy.deepcopy(BUNDLED["ddim-cifar10"])
    config[section][key] = value
    with pytest.raises(UserError) as err:
        validate_config(config)
    assert f"{section}.{key}" in assert_one_line_user_error(err.value)


@pytest.mark.parametrize("key,value", [("model_channels", 48), ("num_heads", 3), ("num_heads_upsample", 5),
                                       ("channel_mult", [1, 2, 2, 2, 2, 2, 2]), ("out_channels", 2), ("dims", 3)])
def test_iddpm_values_that_would_fail_inside_torch_name_their_key(key, value):
    config = copy.deepcopy(BUNDLED["iddpm-cifar10"])
    config["Model"][key] = value
    with pytest.raises(UserError) as err:
        build_model(config)
    message = assert_one_line_user_error(err.value)
    assert f"Model.{key}" in message or (key == "channel_mult" and "Dataset.image_size" in message), message


def test_build_model_and_schedule_refuse_bad_dicts_in_one_line():
    for config in [{"Model": None}, {"Model": []}, {"Model": {"struc": "DDIM"}}, {}, []]:
        with pytest.raises(UserError) as err:
            build_model(config)
        assert_one_line_user_error(err.value)
    for section in [None, [], {"beta_start": 0.3, "beta_end": 0.2}, {"beta_start": 0.5, "beta_end": 0.9},
                    {"beta_start": 1e-9, "beta_end": 1e-9}]:
        with pytest.raises(UserError) as err:
            Schedule.from_config(section)
        assert_one_line_user_error(err.value)


def test_sections_that_may_be_absent_or_empty_still_validate_but_unknown_names_are_refused():
    config = copy.deepcopy(BUNDLED["digits"])
    config.update(Sample=None, Train=None)
    del config["Optim"]
    validate_config(config)  # the published layout allows these (the defaults apply)
    validate_model({"Model": config["Model"]})
    for where, typo, meant in [(None, "Sampel", "Sample"), ("Schedule", "difusion_step", "diffusion_step"),
                               ("Schedule", "beta_ends", "beta_end"), ("Model", "chmult", "ch_mult"),
                               ("Dataset", "image_sizes", "image_size")]:
        bad = copy.deepcopy(config)
        (bad if where is None else bad[where])[typo] = 1
        with pytest.raises(UserError) as err:
            validate_config(bad)
        message = assert_one_line_user_error(err.value)
        assert typo in message and f"did you mean {meant!r}" in message, message
    # a key of the other architecture is unknown too: an iDDPM key in a DDIM Model would be ignored
    with pytest.raises(UserError, match="Model.model_channels"):
        validate_model({"Model": {**config["Model"], "model_channels": 64}})


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"[1, 2]", b"Schedule: {}\n", b"a: [", b""])
def test_load_config_refuses_unreadable_files_in_one_line(tmp_path, content):
    path = tmp_path / "bad.yml"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_config(str(path))
    assert str(path) in assert_one_line_user_error(err.value)


# --- command-line flags ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny.yml").write_text(yaml.safe_dump(TINY_DDIM))
    torch.manual_seed(0)
    save_state_dict(build_model(TINY_DDIM).state_dict(), str(folder / "tiny.ckpt"))
    (folder / "a_file").write_text("not a folder")
    return folder


def flag_values(folder):
    """Up to two flags, each given a bad value or a cheap good one."""
    weird_text = st.text(st.characters(codec="utf-8"), max_size=8)
    values = {
        "--sample_step": st.one_of(st.integers(-10**30, 0), st.integers(1001, 10**30), st.sampled_from([1, 2, 4, 333]),
                                   st.sampled_from(["x", "", "1.5", "2e3"])),
        "--total_num": st.one_of(st.integers(-10**30, 0), st.integers(MAX_TOTAL_NUM + 1, 10**30), st.just(2)),
        "--batch_size": st.one_of(st.integers(-10**30, 0), st.integers(1, 10**30)),
        "--seed": st.integers(-10**30, 10**30),
        "--device": st.one_of(st.sampled_from(["cpu", "cuda", "cuda:7", "cuda:-1", "meta", "xpu", "mps", "cpu:0", "",
                                               "CPU", "gpu", "cpu:x", "cuda:0:1"]), weird_text),
        "--method": st.one_of(st.sampled_from(list(METHODS) + ["auto"]), weird_text),
        "--backend": st.one_of(st.sampled_from(list(BACKENDS)), weird_text),
        "--dtype": st.one_of(st.sampled_from(["fp32", "bf16", "fp16", "fp64", "int8"]), weird_text),
        "--model_path": st.sampled_from([str(folder / p) for p in ("nope.ckpt", "tiny.yml", "a_file", "", "tiny.ckpt")]
                                        + [str(folder)]),
        "--config": st.sampled_from([str(folder / "nope.yml"), str(folder / "tiny.ckpt"), str(folder), "no-such",
                                     "digits", str(folder / "tiny.yml")]),
        "--image_path": st.sampled_from([str(folder / "a_file"), str(folder / "a_file" / "below")]),
        "--model_calls": st.one_of(st.integers(-5, 0), st.sampled_from(["1", "3", "8", "x"])),
        "--image_grid": st.sampled_from([str(folder), str(folder / "a_file" / "grid.png"),
                                         str(folder / "g" / "grid.png")]),
    }
    return st.lists(st.sampled_from(sorted(values)), max_size=2, unique=True).flatmap(
        lambda flags: st.fixed_dictionaries({flag: values[flag] for flag in flags}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_flags_exit_0_or_2_with_one_line(tiny, data):
    flags = data.draw(flag_values(tiny))
    out = tempfile.mkdtemp(dir=tiny)  # fresh, so an earlier example's images never meet this one's settings
    argv = {"--config": str(tiny / "tiny.yml"), "--model_path": str(tiny / "tiny.ckpt"), "--sample_step": "2",
            "--total_num": "1", "--device": "cpu", "--image_path": out}
    argv.update({flag: str(value) for flag, value in flags.items()})
    args = [f"{flag}={value}" for flag, value in argv.items()] + ["--no_progress"]
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse refuses by exiting
            code = exit_.code
    # a run that works may warn (--dtype fp16 on the CPU), one line per warning; a refusal is one line alone
    err = "".join(line for line in stderr.getvalue().splitlines(True) if not line.startswith("pndm-fast: warning:"))
    event(f"exit code {code}")
    assert code in (0, 2), (args, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == (code == 2), (args, err)
    if code == 0:
        assert sorted(os.listdir(argv["--image_path"]))[:1] == ["000000.png"], args


# --- noise tensors passed to sample() --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"DDIM": build_model(TINY_DDIM).eval(), "iDDPM": build_model(TINY_IDDPM).eval()}


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8,
          torch.bool, torch.complex64]


def acceptable(model, shape, dtype, poison) -> bool:
    """What sample() must take: rank 4, a real float dtype, no empty dimension, the model's channels and a
    spatial size it runs at (DDIM: exactly image_size; iDDPM: multiples of 2 ** (levels - 1)), finite values."""
    if len(shape) != 4 or dtype not in DTYPES[:4] or 0 in shape or poison:
        return False
    _, c, h, w = shape
    if isinstance(model, DDIMUNet):
        return c == 1 and h == w == 4
    assert isinstance(model, IDDPMUNet)
    return c == 2 and h % 2 == 0 and w % 2 == 0 and shape[0] * h * w > 4  # not one image at 1x1 lowest


@FUZZ
@given(data=st.data())
def test_sample_takes_good_noise_and_refuses_bad_noise_in_one_line(models, data):
    name = data.draw(st.sampled_from(sorted(models)))
    model = models[name]
    # A noise the model takes, then none, one or two of its properties spoilt: both outcomes occur often.
    shape = [data.draw(st.integers(1, 3)), model.out_channels_eps, 4, 4 if name == "DDIM" else 6]
    dtype, poison = data.draw(st.sampled_from(DTYPES[:4])), None
    for spoil in data.draw(st.lists(st.sampled_from(["rank", "dim", "dtype", "poison"]), max_size=2)):
        if spoil == "rank":
            shape = data.draw(st.lists(st.sampled_from([1, 2, 4]), max_size=6).filter(lambda s: len(s) != 4))
        elif spoil == "dim" and len(shape) == 4:
            shape[data.draw(st.integers(0, 3))] = data.draw(st.sampled_from([0, 1, 2, 3, 5, 6, 8]))
        elif spoil == "dtype":
            dtype = data.draw(st.sampled_from(DTYPES))
        elif spoil == "poison":
            poison = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    shape = tuple(shape)
    noise = torch.randn(shape).to(dtype)
    if poison is not None and noise.numel() and dtype.is_floating_point:
        noise.view(-1)[data.draw(st.integers(0, noise.numel() - 1))] = poison
    else:
        poison = None
    backend = data.draw(st.sampled_from(["reference", "torch", "fused"]))
    method = data.draw(st.sampled_from(list(METHODS)))
    try:
        x = sample(model, noise, SCHEDULE, method, 2, backend)
    except UserError as err:
        event("refused")
        assert not acceptable(model, shape, dtype, poison), err
        assert_one_line_user_error(err)
        return
    event("sampled")
    assert acceptable(model, shape, dtype, poison), (shape, dtype, poison)
    assert x.shape == noise.shape and x.dtype == noise.dtype and torch.isfinite(x.float()).all()


def test_each_kind_of_bad_noise_gets_its_own_message(models):
    ddim = models["DDIM"]
    cases = [
        (torch.randn(4, 4), "shape (4, 4)"),
        (torch.randn(1, 1, 4, 4).int(), "dtype torch.int32"),
        (torch.randn(1, 1, 4, 4, dtype=torch.complex64), "dtype torch.complex64"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.bool), "dtype torch.bool"),
        (torch.randn(0, 1, 4, 4), "is empty"),
        (torch.randn(1, 3, 4, 4), "takes 1 channels"),
        (torch.randn(1, 1, 8, 8), "takes 4x4 images"),
        (torch.randn(1, 1, 4, 4, device="meta"), "meta device"),
        (torch.full((1, 1, 4, 4), float("nan")), "NaN or Inf"),
        (torch.randn(1, 1, 4, 4).numpy(), "torch.Tensor"),
    ]
    for noise, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            sample(ddim, noise, SCHEDULE, "F-PNDM", 2, "fused")
    with pytest.raises(UserError, match="multiples of 2"):
        sample(models["iDDPM"], torch.randn(1, 2, 4, 3), SCHEDULE, "F-PNDM", 2, "fused")


def test_other_arguments_of_sample_are_refused_in_one_line(models):
    noise = torch.randn(1, 1, 4, 4)
    for kwargs, message in [({"method": ["DDIM"]}, "unknown method"), ({"method": None}, "unknown method"),
                            ({"sample_step": True}, "sample_step"), ({"sample_step": [2]}, "sample_step"),
                            ({"sample_step": 2.0}, "sample_step"), ({"backend": "cuda"}, "unknown backend")]:
        with pytest.raises(UserError, match=message):
            sample(models["DDIM"], noise, SCHEDULE, **{"method": "DDIM", "sample_step": 2, **kwargs})
    with pytest.raises(UserError, match="pndm_fast.Schedule"):
        sample(models["DDIM"], noise, {"type": "linear"}, "DDIM", 2)


def test_a_model_on_another_device_than_the_noise_is_refused():
    with torch.device("meta"):
        on_meta = build_model(TINY_DDIM)
    with pytest.raises(UserError, match="model's parameters are on the meta device"):
        sample(on_meta, torch.randn(1, 1, 4, 4), SCHEDULE, "DDIM", 2, "fused")
    if torch.cuda.is_available():
        with pytest.raises(UserError, match="the model is on cpu and the noise on cuda"):
            sample(build_model(TINY_DDIM), torch.randn(1, 1, 4, 4, device="cuda"), SCHEDULE, "DDIM", 2, "fused")


def test_the_finiteness_check_can_be_turned_off(models):
    noise = torch.full((1, 1, 4, 4), float("nan"))
    with pytest.raises(UserError, match="NaN or Inf"):
        sample(models["DDIM"], noise, SCHEDULE, "DDIM", 2, "fused")
    assert torch.isnan(sample(models["DDIM"], noise, SCHEDULE, "DDIM", 2, "fused", check_finite=False)).all()


def test_iddpm_runs_at_any_even_size_not_only_its_dataset_size(models):
    for b, h, w in [(2, 2, 2), (1, 4, 4), (1, 6, 8), (1, 8, 2), (1, 2, 4)]:
        x = sample(models["iDDPM"], torch.randn(b, 2, h, w), SCHEDULE, "F-PNDM", 2, "fused")
        assert x.shape == (b, 2, h, w) and torch.isfinite(x).all()
    with pytest.raises(UserError, match="reaches 1x1 at the model's lowest level"):
        sample(models["iDDPM"], torch.randn(1, 2, 2, 2), SCHEDULE, "F-PNDM", 2, "fused")
