"""The two network architectures of the paper's configs, built from a config's Model section."""

from __future__ import annotations

import torch

from ..errors import UserError
from .checkpoint import load_checkpoint, save_state_dict
from .ddim import DDIMUNet
from .iddpm import IDDPMUNet

__all__ = ["build_model", "load_checkpoint", "save_state_dict", "DDIMUNet", "IDDPMUNet"]


def _take(section: dict, keys: list[str]) -> dict:
    missing = [k for k in keys if k not in section]
    if missing:
        raise UserError(f"config Model section lacks {', '.join(missing)} (needed by Model.struc {section['struc']})")
    return {k: section[k] for k in keys}


def build_model(config: dict) -> torch.nn.Module:
    """The network of `config["Model"]["struc"]` ("DDIM" or "iDDPM"), freshly initialised, in float32
    (or on the current default device, e.g. inside `with torch.device("meta")`)."""
    model = config.get("Model")
    if not isinstance(model, dict):
        raise UserError("config has no Model section: expected a mapping with at least struc")
    struc = model.get("struc")
    if struc == "DDIM":
        keys = ["ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels",
                "image_size", "resamp_with_conv"]
        return DDIMUNet(**_take(model, keys), bayesian=model.get("type") == "bayesian")
    if struc == "iDDPM":
        keys = ["in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
                "dropout", "channel_mult", "conv_resample", "use_scale_shift_norm", "num_heads",
                "num_heads_upsample"]
        # dims: only images (2) are supported; use_checkpoint (gradient checkpointing) is ignored.
        if model.get("dims", 2) != 2:
            raise UserError(f"Model.dims is {model['dims']}: only 2 (images) is supported")
        image_size = (config.get("Dataset") or {}).get("image_size")
        return IDDPMUNet(**_take(model, keys), image_size=image_size)
    raise UserError(f"unknown Model.struc '{struc}': expected DDIM or iDDPM")
