"""The two network architectures of the paper's configs, built from a config's Model section."""

from __future__ import annotations

import torch

from ..config import validate_model
from .checkpoint import load_checkpoint, save_state_dict
from .ddim import DDIMUNet
from .iddpm import IDDPMUNet

__all__ = ["build_model", "load_checkpoint", "save_state_dict", "input_problem", "DDIMUNet", "IDDPMUNet"]


def _take(section: dict, keys: list[str]) -> dict:
    return {k: section[k] for k in keys}


def build_model(config: dict) -> torch.nn.Module:
    """The network of `config["Model"]["struc"]` ("DDIM" or "iDDPM"), freshly initialised, in float32
    (or on the current default device, e.g. inside `with torch.device("meta")`).

    The Model section (and Dataset.image_size for iDDPM) is checked first by `validate_model`: a bad value is
    a one-line UserError naming the key, never an error from deep inside torch.
    """
    validate_model(config)
    model = config["Model"]
    if model["struc"] == "DDIM":
        keys = ["ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels",
                "image_size", "resamp_with_conv"]
        return DDIMUNet(**_take(model, keys), bayesian=model.get("type") == "bayesian",
                        num_classes=int(model.get("num_classes") or 0))
    keys = ["in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
            "dropout", "channel_mult", "conv_resample", "use_scale_shift_norm", "num_heads", "num_heads_upsample"]
    # dims: only images (2) are supported (validate_model refuses others); use_checkpoint (gradient
    # checkpointing) is ignored.
    image_size = (config.get("Dataset") or {}).get("image_size")
    return IDDPMUNet(**_take(model, keys), image_size=image_size)


def input_problem(model: torch.nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why `model` cannot take a (B, C, H, W) input of `shape`, or None when it can (or the model is not one of
    ours and its needs are unknown).

    DDIM: C = Model.in_channels and H = W = Model.image_size exactly; its forward refuses anything else (the
    attention levels are placed by resolution at build time). iDDPM: C = in_channels and H, W divisible by
    2 ** (levels - 1), any size, since each level halves them and the up path must meet its skips. Both: one
    image alone must not shrink to 1x1 at the lowest level.
    """
    if not isinstance(model, (DDIMUNet, IDDPMUNet)):
        return None
    batch, channels, height, width = shape
    halvings = model.num_resolutions - 1 if isinstance(model, DDIMUNet) else model.num_downsamples
    factor = 2**halvings
    if channels != model.out_channels_eps:
        return (f"the model takes {model.out_channels_eps} channels (Model.in_channels), the noise has {channels}; "
                f"draw noise of shape (batch, {model.out_channels_eps}, H, W)")
    if isinstance(model, DDIMUNet) and (height, width) != (model.image_size, model.image_size):
        size = model.image_size
        return (f"the DDIM model takes {size}x{size} images (Model.image_size), the noise is {height}x{width}; "
                f"draw noise of shape (batch, {channels}, {size}, {size})")
    if height % factor or width % factor:
        return (f"the model halves H and W {halvings} times, so both must be multiples of {factor}; the noise is "
                f"{height}x{width}")
    # torch's group_norm refuses a batch whose every channel holds a single value (batch x H x W == 1), as one
    # image meets it at a 1x1 lowest level.
    if batch * (height // factor) * (width // factor) == 1:
        return (f"one {height}x{width} image reaches 1x1 at the model's lowest level, where GroupNorm needs more "
                "than one value per channel; sample at least 2 images at once")
    return None
