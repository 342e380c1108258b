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
        net = DDIMUNet(**_take(model, keys), bayesian=model.get("type") == "bayesian",
                       num_classes=int(model.get("num_classes") or 0))
        # what it predicts and the time it reads (a flow model: the velocity at 1000 s); Denoiser reads these
        net.sampling_reading = {"prediction": model.get("prediction", "eps"),
                                "time_input": model.get("time_input", "t")}
        return net
    keys = ["in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
            "dropout", "channel_mult", "conv_resample", "use_scale_shift_norm", "num_heads", "num_heads_upsample"]
    # dims: only images (2) are supported (validate_model refuses others); use_checkpoint (gradient
    # checkpointing) is ignored.
    image_size = (config.get("Dataset") or {}).get("image_size")
    return IDDPMUNet(**_take(model, keys), image_size=image_size)


def input_problem(model, shape: tuple[int, ...]) -> str | None:
    """Why `model` cannot take a (B, C, H, W) input of `shape`, or None when it can, or when its family does not
    say (a network states what it takes with an `input_problem(shape)` method, as both UNets here do)."""
    check = getattr(model, "input_problem", None)
    return check(tuple(shape)) if callable(check) else None
