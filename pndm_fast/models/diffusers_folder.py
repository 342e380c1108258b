"""diffusers model folders, as `save_pretrained` writes them, for sampling and conversion.

A model folder holds config.json and diffusion_pytorch_model.safetensors (or .bin); a pipeline folder holds
model_index.json with the model in unet/ and the noise schedule in scheduler/scheduler_config.json. Both are
accepted wherever a folder is asked for. Reading the config and the weights needs no diffusers; building the
diffusers network (load_diffusers_unet) does, and says so in one line when it is missing. Weights are read as
.safetensors (no code at all) or with torch.load(weights_only=True), never as a pickle that could run code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import UserError, first_line
from ..diffusers_schedulers import betas_of
from .checkpoint import read_state_dict, torch_load

CONFIG = "config.json"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PIPELINE_INDEX = "model_index.json"
SCHEDULER_CONFIGS = (os.path.join("scheduler", "scheduler_config.json"), "scheduler_config.json")
# the diffusers networks a folder may hold for sampling: a UNet taking (x, t) and returning an image-shaped output
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
INSTALL = "pip install diffusers"
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _model_folder(path: str | os.PathLike) -> str | None:
    """The folder holding config.json and the weights: `path` itself, or its unet/ in a pipeline folder."""
    path = os.fspath(path)
    for folder in (path, os.path.join(path, "unet")):
        if os.path.isfile(os.path.join(folder, CONFIG)) and any(
                os.path.isfile(os.path.join(folder, w)) for w in WEIGHTS):
            return folder
    return None


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} could not be read as JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} holds a JSON {type(value).__name__}, not an object")
    return value


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder with a diffusers model: config.json naming a diffusers class (its
    "_class_name") beside diffusion_pytorch_model.safetensors or .bin, there or in its unet/ subfolder."""
    folder = _model_folder(path) if os.path.isdir(path) else None
    if folder is None:
        return False
    try:
        return isinstance(_read_json(os.path.join(folder, CONFIG), "config").get("_class_name"), str)
    except UserError:
        return False


def read_diffusers_config(path: str | os.PathLike) -> tuple[str, dict]:
    """(the model folder, its config.json) of a diffusers model or pipeline folder; a one-line UserError for
    anything else."""
    folder = _model_folder(path) if os.path.isdir(path) else None
    if folder is None or not is_diffusers_folder(path):
        raise UserError(f"{path} is not a diffusers model folder: expected config.json with a \"_class_name\" and "
                        f"{WEIGHTS[0]} (or .bin), as save_pretrained writes them, there or in its unet/ folder")
    return folder, _read_json(os.path.join(folder, CONFIG), "config")


def read_diffusers_folder(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json's content, state dict) of a diffusers model folder, read without diffusers."""
    folder, config = read_diffusers_config(path)
    weights = next(os.path.join(folder, w) for w in WEIGHTS if os.path.isfile(os.path.join(folder, w)))
    if weights.endswith(".bin"):  # read_state_dict knows torch.save files by their usual suffixes only
        state = torch_load(weights)
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise UserError(f"checkpoint {weights} is not a plain state dict of tensors")
        return config, dict(state)
    return config, read_state_dict(weights)


def load_diffusers_unet(path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The diffusers UNet in a model (or pipeline) folder, built by diffusers from config.json with the folder's
    weights loaded strictly, on `device` in `dtype`, in eval mode. Needs diffusers; never downloads."""
    _, config = read_diffusers_config(path)
    name = config["_class_name"]
    if name not in UNET_CLASSES:
        raise UserError(f"{path} holds a diffusers {name}, not a UNet to sample with ({', '.join(UNET_CLASSES)})")
    try:
        import diffusers
    except ImportError:
        raise UserError(f"{path} is a diffusers model folder; loading it needs diffusers: {INSTALL}") from None
    config, state = read_diffusers_folder(path)
    try:
        model = getattr(diffusers, name).from_config(config)
    except Exception as err:  # noqa: BLE001 - any failure here is a config diffusers refuses
        raise UserError(f"{path}: diffusers could not build its {name} from config.json "
                        f"({first_line(err)})") from None
    state = modern_attention_names(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UserError(f"{path}: the weights do not match config.json's {name} "
                        f"({lines[1] if len(lines) > 1 else lines[0]})") from None
    return model.to(device=device, dtype=dtype).eval()


def scheduler_config_path(path: str | os.PathLike) -> str | None:
    """The scheduler config of a folder: scheduler/scheduler_config.json or scheduler_config.json in it, or in
    the pipeline folder above when `path` is a pipeline's unet/ folder; None when there is none."""
    path = os.path.abspath(os.fspath(path))
    for folder in (path, os.path.dirname(path)):
        for name in SCHEDULER_CONFIGS:
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate) and (folder == path or os.path.isfile(os.path.join(folder, PIPELINE_INDEX))):
                return candidate
    return None


def schedule_from_folder(path: str | os.PathLike) -> tuple[np.ndarray, str] | None:
    """(betas, prediction_type) from the folder's scheduler config, or None when the folder has none.

    betas are those diffusers computes from beta_start, beta_end, num_train_timesteps and beta_schedule (linear,
    scaled_linear, squaredcos_cap_v2), or trained_betas as listed. prediction_type is "epsilon", "sample" or
    "v_prediction"; anything else is a one-line UserError.
    """
    where = scheduler_config_path(path)
    if where is None:
        return None
    config = _read_json(where, "scheduler config")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UserError(f"scheduler config {where} has prediction_type {prediction!r}: expected one of "
                        f"{', '.join(PREDICTION_TYPES)}")
    if config.get("rescale_betas_zero_snr"):
        raise UserError(f"scheduler config {where} sets rescale_betas_zero_snr: a schedule that reaches zero "
                        "signal is not supported")
    return betas_of(f"scheduler config {where}", config), prediction


def modern_attention_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with older diffusers files' attention names (query, key, value, proj_attn, as in the google/ddpm-*
    checkpoints) renamed to today's (to_q, to_k, to_v, to_out.0); other keys and all values unchanged."""
    renamed = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(\w+)", key)
        renamed[f"{m[1]}.{LEGACY_ATTENTION[m[2]]}.{m[3]}" if m else key] = value
    return renamed
