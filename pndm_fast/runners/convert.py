"""pndm-fast --runner convert: a checkpoint from .ckpt/.pt/.pth to .safetensors or back, tensor for tensor.

The output holds the same keys in the same order, and tensors equal bit for bit in their original dtypes
(nothing is cast); keys are not renamed either, so a "module." prefix stays (load_checkpoint drops it). An
existing output is never overwritten, like a training folder's checkpoints: remove it or choose another name.
"""

from __future__ import annotations

import os

import torch

from ..errors import UserError
from ..models import build_model, diffusers_layout
from ..models.checkpoint import (
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    check_state_dict,
    read_state_dict,
    strip_data_parallel_prefix,
    write_new_checkpoint,
)

SUFFIXES = TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)


def _suffix(path: str, flag: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{flag} {path} has an unknown extension {suffix or '(none)'!r}: expected one of "
                        f"{', '.join(SUFFIXES)} (.safetensors is written with safetensors, the others with "
                        "torch.save)")
    return suffix


def convert(model_path: str, out_path: str, config: dict | None = None) -> dict:
    """Write the state dict in model_path to out_path in the format out_path's extension names; when either is a
    diffusers model folder (an existing folder, or an out_path without a checkpoint suffix), convert between the
    paper's DDIM layout and diffusers' UNet2DModel layout instead (the paper's side needs its config).

    With a config, the checkpoint must first match that config's model (strict keys and shapes, as
    load_checkpoint checks them). Returns {"keys", "parameters" (elements of all tensors), "bytes_in",
    "bytes_out"}.
    """
    if not model_path or not out_path:
        raise UserError("--runner convert needs --model_path IN and --out_path OUT (.ckpt, .pt, .pth or "
                        ".safetensors), e.g. --model_path ddim_cifar10.ckpt --out_path ddim_cifar10.safetensors")
    if diffusers_layout.is_folder_path(model_path) or diffusers_layout.is_folder_path(out_path):
        # a diffusers model folder on either side: keys renamed and reshaped (models/diffusers_layout.py)
        return diffusers_layout.convert_layout(model_path, out_path, config)
    _suffix(model_path, "--model_path")
    _suffix(out_path, "--out_path")
    if os.path.abspath(model_path) == os.path.abspath(out_path) or (
            os.path.exists(out_path) and os.path.exists(model_path) and os.path.samefile(model_path, out_path)):
        raise UserError(f"--out_path {out_path} is the input checkpoint itself: choose another name")
    if os.path.lexists(out_path):
        raise UserError(f"--out_path {out_path} exists and is not overwritten: remove it or choose another name")
    state = read_state_dict(model_path)
    if config is not None:
        with torch.device("meta"):  # shapes only: no memory, no initialisation, even for the 256x256 UNets
            expected = build_model(config).state_dict()
        check_state_dict(strip_data_parallel_prefix(state, expected), expected, model_path)
    write_new_checkpoint(state, out_path)
    return {"keys": len(state), "parameters": sum(v.numel() for v in state.values()),
            "bytes_in": os.path.getsize(model_path), "bytes_out": os.path.getsize(out_path)}


def run_convert(model_path: str | None, out_path: str | None, config: dict | None) -> int:
    """The command line's convert runner: convert, then one summary line on stdout. Returns the exit code."""
    summary = convert(model_path, out_path, config)
    print(f"converted {model_path} -> {out_path}: {summary['keys']} tensors, {summary['parameters']:,} "
          f"parameters, {summary['bytes_in']:,} -> {summary['bytes_out']:,} bytes")
    return 0
