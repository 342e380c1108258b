"""Configurations in the paper's YAML layout (Schedule, Dataset, Model, Train, Optim, Sample)."""

from __future__ import annotations

import difflib
import math
import os
from importlib import resources

import yaml

from .errors import UserError, first_line

SECTIONS = ("Schedule", "Dataset", "Model", "Train", "Optim", "Sample")


def bundled_config_names() -> list[str]:
    """Names of the configurations shipped inside the package, without the .yml suffix."""
    folder = resources.files("pndm_fast") / "configs"
    return sorted(p.name[: -len(".yml")] for p in folder.iterdir() if p.name.endswith(".yml"))


def resolve_config_path(name_or_path: str) -> str:
    """A path to an existing file, or a bundled name in dash or underscore spelling, with or without .yml."""
    if os.path.isfile(name_or_path):
        return name_or_path
    stem = os.path.basename(name_or_path)
    for suffix in (".yml", ".yaml"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = stem.replace("_", "-")
    names = ", ".join(bundled_config_names())
    if os.path.isdir(name_or_path):
        raise UserError(f"config {name_or_path} is a folder: expected a YAML file in it, or one of the bundled "
                        f"names {names}")
    if stem in bundled_config_names():
        return str(resources.files("pndm_fast") / "configs" / f"{stem}.yml")
    if os.path.dirname(name_or_path) or name_or_path.endswith((".yml", ".yaml")):
        raise UserError(f"config file {name_or_path} not found (looked in {os.path.abspath(name_or_path)}); check "
                        f"the path, or give a bundled name: {names}")
    raise UserError(f"unknown config {name_or_path!r}: give a YAML file path or one of {names}")


def load_config(name_or_path: str) -> dict:
    """Read a configuration by bundled name or path, checked by `validate_config`."""
    path = resolve_config_path(name_or_path)
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML ({first_line(err)})") from None
    except UnicodeDecodeError:
        raise UserError(f"config {path} is not a text file; give a YAML file in the published layout") from None
    except OSError as err:
        raise UserError(f"config {path} could not be read ({err.strerror}); check the path and its "
                        "permissions") from None
    validate_config(config, prefix=f"config {path}:")
    return config


# Upper bounds far above any published config (diffusion_step 1000, ch 128, 6 levels, 2 blocks, 256 pixels): past
# them a typo would only surface as an allocation failure or a build taking minutes.
MAX_DIFFUSION_STEP = 100_000
MAX_SIZE = 65_536
MAX_LEVELS = 16
MAX_BLOCKS = 64
GROUPS = 32  # both UNets normalise with GroupNorm(32 groups): every channel count must be a multiple of 32

_MISSING = object()


def _show(value) -> str:
    """repr, cut short, always one line (repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Section:
    """One config section with typed getters; every refusal is a one-line UserError naming `Section.key`."""

    def __init__(self, config: dict, name: str, prefix: str, required: bool):
        self.name, self.prefix = name, prefix
        value = config.get(name)
        if value is None and not required:
            value = {}
        if not isinstance(value, dict):
            what = "missing" if value is None else f"a {type(value).__name__}"
            raise UserError(f"{prefix} section {name} is {what}: expected a mapping of keys to values, "
                            f"as in the published configs (e.g. pndm_fast/configs/ddim-cifar10.yml)")
        self.values = value

    def error(self, key: str, value, expected: str) -> UserError:
        where = f"{self.name}.{key}"
        if value is _MISSING:
            return UserError(f"{self.prefix} {where} is missing: expected {expected}; add it to the "
                             f"{self.name} section")
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads a quoted number, or one like 1e-4, as text: write it unquoted, 1e-4 as 1.0e-4)"
            except ValueError:
                pass
        return UserError(f"{self.prefix} {where} is {_show(value)} ({type(value).__name__}): expected {expected}"
                         f"{hint}; fix {where} in the config")

    def get(self, key: str, default=_MISSING):
        return self.values.get(key, default)

    def integer(self, key: str, default=_MISSING, *, minimum: int = 1, maximum: int = MAX_SIZE, multiple: int = 1,
                why: str = "") -> int:
        value = self.get(key, default)
        ok = isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum
        if not ok or value % multiple:
            expected = f"an integer from {minimum} to {maximum}"
            if multiple > 1:
                expected = f"a multiple of {multiple} from {minimum} to {maximum}"
            raise self.error(key, value, expected + why)
        return value

    def number(self, key: str, default=_MISSING, *, low: float, high: float, low_open: bool = True,
               high_open: bool = True) -> float:
        value = self.get(key, default)
        # YAML integers are unbounded: 10**400 would overflow float() and math.isfinite
        ok = (isinstance(value, float) and math.isfinite(value)
              or isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63)
        if ok:
            ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise self.error(key, value, f"a number in {interval}")
        return float(value)

    def flag(self, key: str, default=_MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, value, "true or false")
        return value

    def int_list(self, key: str, default=_MISSING, *, nonempty: bool, minimum: int = 1,
                 maximum: int = MAX_SIZE, max_len: int = MAX_LEVELS) -> list:
        value = self.get(key, default)
        ok = (isinstance(value, (list, tuple)) and (len(value) > 0 or not nonempty) and len(value) <= max_len
              and all(isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum for v in value))
        if not ok:
            what = "a non-empty list" if nonempty else "a list (possibly empty)"
            raise self.error(key, value, f"{what} of at most {max_len} integers from {minimum} to {maximum}")
        return list(value)

    def choice(self, key: str, choices: tuple, default=_MISSING):
        value = self.get(key, default)
        if not isinstance(value, str) or value not in choices:
            raise self.error(key, value, f"one of {', '.join(choices)}")
        return value


def validate_schedule(section, prefix: str = "config") -> None:
    """Refuse a Schedule section that cannot give a usable table of betas (types, ranges, beta_start <= beta_end)."""
    s = _Section({"Schedule": section}, "Schedule", prefix, required=True)
    refuse_unknown_keys(s.values, "Schedule", KNOWN_KEYS["Schedule"], prefix)
    kind = s.choice("type", ("linear", "quad", "cosine", "flow"), "linear")
    s.integer("diffusion_step", 1000, minimum=2, maximum=MAX_DIFFUSION_STEP)
    if kind == "flow":  # a rectified flow: no betas, the resolution shift of its uniform grid
        s.number("shift", 1.0, low=0.0, high=1e6)
        return
    if "shift" in s.values:
        raise UserError(f"{prefix} Schedule.shift belongs to a rectified flow (type: flow), not a {kind} table")
    start = s.number("beta_start", 1e-4, low=0.0, high=1.0)
    end = s.number("beta_end", 2e-2, low=0.0, high=1.0)
    if start > end:
        raise UserError(f"{prefix} Schedule.beta_start {start:g} is above Schedule.beta_end {end:g}: expected "
                        "beta_start <= beta_end (the noise grows over time); swap them in the config")


def validate_model(config, prefix: str = "config") -> None:
    """Refuse a Model section (and the Dataset.image_size an iDDPM model reads) that cannot build a working UNet:
    types, positive sizes, channel counts that GroupNorm(32) and the attention heads divide, and image sizes that
    every downsampling level halves exactly (so the up path meets its skips)."""
    if not isinstance(config, dict):
        raise UserError(f"{prefix} is a {type(config).__name__}: expected a mapping with at least the sections "
                        "Schedule and Model")
    m = _Section(config, "Model", prefix, required=True)
    struc = m.get("struc")
    if struc not in ("DDIM", "iDDPM"):
        raise UserError(f"{prefix} has unknown Model.struc {_show(struc)}: expected DDIM or iDDPM; fix Model.struc "
                        "in the config")
    refuse_unknown_keys(m.values, "Model", MODEL_KEYS[struc], prefix, what=f"a {struc} Model")
    in_channels = m.integer("in_channels", minimum=1, maximum=MAX_SIZE)
    m.number("dropout", low=0.0, high=1.0, low_open=False)
    m.integer("num_res_blocks", maximum=MAX_BLOCKS)
    group_why = f" (GroupNorm uses {GROUPS} groups)"
    if struc == "DDIM":
        m.integer("ch", multiple=GROUPS, maximum=MAX_SIZE, why=group_why)
        mults = m.int_list("ch_mult", nonempty=True, maximum=64)
        m.integer("out_ch", minimum=in_channels,
              why=" (at least Model.in_channels: the sampler reads eps from the first in_channels outputs)")
        m.int_list("attn_resolutions", nonempty=False, max_len=64)
        m.flag("resamp_with_conv")
        m.integer("num_classes", 0, minimum=0, why=" (0 or absent: an unconditional model)")
        m.choice("prediction", ("eps", "x0", "v", "flow"), "eps")
        m.choice("time_input", ("t", "1000t"), "t")
        factor = 2 ** (len(mults) - 1)
        m.integer("image_size", multiple=factor,
                  why=f" (each of the {len(mults) - 1} downsamplings of Model.ch_mult must halve it exactly)")
        return
    if m.get("num_classes", 0) != 0:
        raise m.error("num_classes", m.get("num_classes"), "0 or absent (class labels are a DDIM-model option)")
    model_channels = m.integer("model_channels", multiple=GROUPS, why=group_why)
    mults = m.int_list("channel_mult", nonempty=True, maximum=64)
    m.integer("out_channels", minimum=in_channels,
          why=" (at least Model.in_channels: the sampler reads eps from the first in_channels outputs)")
    attention = m.int_list("attention_resolutions", nonempty=False, max_len=64)
    m.flag("conv_resample")
    m.flag("use_scale_shift_norm")
    if m.get("dims", 2) != 2:
        raise m.error("dims", m.get("dims"), "2 (only images are supported)")
    for key, levels in (("num_heads", [(2**i, k) for i, k in enumerate(mults)] + [(None, mults[-1])]),
                        ("num_heads_upsample", [(2**i, k) for i, k in enumerate(mults)])):
        heads = m.integer(key, maximum=MAX_SIZE)
        # An attention block splits its channels evenly between heads: at every level that has one (rates
        # listed in attention_resolutions; the middle block always), channels % heads must be 0.
        for rate, mult in levels:
            if (rate is None or rate in attention) and (model_channels * mult) % heads:
                raise m.error(key, heads, f"a divisor of {model_channels * mult}, the channel count of an "
                                          "attention block (model_channels x channel_mult)")
    data = _Section(config, "Dataset", prefix, required=False)
    if "image_size" in data.values:
        factor = 2 ** (len(mults) - 1)
        data.integer("image_size", multiple=factor,
                     why=f" (each of the {len(mults) - 1} downsamplings of Model.channel_mult must halve it exactly)")


def validate_config(config, prefix: str = "config") -> None:
    """Check a whole configuration (a dict in the published layout) before anything is built from it.

    Raises UserError with one line that names the key (e.g. "Model.ch"), what it holds, and what is expected.
    Unknown sections and keys are refused with the closest known name (the reference ignores them, so a typo such
    as `difusion_step` silently ran with the default). `prefix` starts each message (e.g. "config path.yml:").
    """
    if not isinstance(config, dict) or not {"Schedule", "Model"} <= set(config):
        raise UserError(f"{prefix} must be a YAML mapping with at least the sections Schedule and Model")
    refuse_unknown_keys(config, None, SECTIONS, prefix)
    for name in SECTIONS:
        if name not in ("Schedule", "Model") and isinstance(config.get(name), dict):
            refuse_unknown_keys(config[name], name, KNOWN_KEYS[name], prefix)
    validate_schedule(config["Schedule"], prefix)
    validate_model(config, prefix)
    data = _Section(config, "Dataset", prefix, required=False)
    for key in ("image_size", "channels", "batch_size"):
        if key in data.values:
            data.integer(key)
    sample = _Section(config, "Sample", prefix, required=False)
    for key in ("batch_size", "total_num"):
        if key in sample.values:
            sample.integer(key, maximum=MAX_TOTAL_NUM)
    if sample.values.get("model_path") is not None and not isinstance(sample.values["model_path"], str):
        raise sample.error("model_path", sample.values["model_path"], "a checkpoint path or file name")
    validate_training(config, prefix)


def validate_training(config: dict, prefix: str = "config") -> None:
    """Check every field the training runner reads from Train and Optim (and Dataset.random_flip), when present,
    as the sampling fields are checked: a number given as text, a flag given as "no" (which Python reads as true),
    beta1 outside [0, 1) or a negative grad_clip (which would ascend the gradient) would otherwise train wrongly
    without a word, or fail deep inside torch."""
    train = _Section(config, "Train", prefix, required=False)
    for key in ("epoch", "max_steps", "save_every"):
        if train.values.get(key) is not None:
            train.integer(key, maximum=2**62)
    if "ema_rate" in train.values:
        train.number("ema_rate", low=0.0, high=1.0, low_open=False, high_open=False)
    if "ema" in train.values:
        train.flag("ema")
    if "loss_type" in train.values:
        train.choice("loss_type", ("linear", "square"))
    optim = _Section(config, "Optim", prefix, required=False)
    if "optimizer" in optim.values:
        optim.choice("optimizer", ("adam", "sgd"))
    if "lr" in optim.values:
        optim.number("lr", low=0.0, high=math.inf)
    if "lr_schedule" in optim.values:
        optim.choice("lr_schedule", LR_SCHEDULES)
    if "weight_decay" in optim.values:
        optim.number("weight_decay", low=0.0, high=math.inf, low_open=False)
    if "beta1" in optim.values:
        optim.number("beta1", low=0.0, high=1.0, low_open=False)
    if "eps" in optim.values:
        optim.number("eps", low=0.0, high=math.inf)
    if "amsgrad" in optim.values:
        optim.flag("amsgrad")
    if optim.values.get("grad_clip") is not None:  # null: no clipping
        optim.number("grad_clip", low=0.0, high=math.inf)
    data = _Section(config, "Dataset", prefix, required=False)
    if "random_flip" in data.values:
        data.flag("random_flip")


# Optim.lr_schedule: "constant" (the reference's), or "cosine" from lr at step 0 to 0 at the run's last step
LR_SCHEDULES = ("constant", "cosine")


# Images are named 000000.png .. 999999.png: six digits keep them fixed-width and in order.
MAX_TOTAL_NUM = 999_999


# Every key of the published configs (the paper's config/*.yml) and the bundled ones, per section. Keys the
# reference reads but pndm_fast does not (e.g. Dataset.logit_transform, Schedule.learn_sigma) stay allowed, so
# that every published file loads as it is; anything else is a typo or a setting that would be silently ignored.
KNOWN_KEYS = {
    "Schedule": ("type", "beta_start", "beta_end", "diffusion_step", "shift", "learn_sigma", "noise_schedule",
                 "predict_xstart", "rescale_learned_sigmas", "rescale_timesteps", "sigma_small", "timestep_respacing",
                 "use_kl"),
    "Dataset": ("dataset", "path", "category", "image_size", "channels", "batch_size", "num_workers", "random_flip",
                "rescaled", "logit_transform", "uniform_dequantization", "gaussian_dequantization"),
    "Train": ("epoch", "max_steps", "save_every", "loss_type", "ema", "ema_rate", "label_dropout"),
    "Optim": ("optimizer", "lr", "lr_schedule", "beta1", "amsgrad", "eps", "weight_decay", "grad_clip"),
    "Sample": ("batch_size", "total_num", "model_path", "last_only", "mpi4py"),
}
MODEL_KEYS = {
    "DDIM": ("struc", "type", "image_size", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
             "attn_resolutions", "dropout", "var_type", "resamp_with_conv", "num_classes", "prediction",
             "time_input"),
    "iDDPM": ("struc", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
              "dropout", "channel_mult", "dims", "conv_resample", "use_checkpoint", "use_scale_shift_norm",
              "num_heads", "num_heads_upsample"),
}


def refuse_unknown_keys(values: dict, section: str | None, known, prefix: str, what: str = "") -> None:
    """A one-line UserError for the first key of `values` not in `known`, naming the closest known key.

    `section` None checks the section names themselves."""
    for key in values:
        if key in known:
            continue
        if section is None:
            where = f"section {key!r}"
        elif isinstance(key, str) and key.isidentifier():
            where = f"key {section}.{key}"
        else:  # an empty or odd key reads badly after the dot (YAML allows "": 0 and keys that are numbers)
            where = f"key {key!r} in section {section}"
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        if close:
            raise UserError(f"{prefix} unknown {where}: did you mean {close[0]!r}? fix or remove it")
        kind = what or (f"the {section} section" if section else "a config")
        raise UserError(f"{prefix} unknown {where}: {kind} takes {', '.join(known)}; fix or remove it")
