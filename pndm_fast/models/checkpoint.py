"""Loading and saving plain state dicts (.ckpt/.pt/.pth via torch.save, or .safetensors), with one-line errors."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..errors import UserError

_SHOWN = 3  # how many offending keys an error message names


def _names(keys: list[str]) -> str:
    more = f", ... {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _reason(err: Exception) -> str:
    """The informative line of a load error: torch's weights_only refusal buries it after a paragraph of
    advice ("WeightsUnpickler error: Unsupported global: GLOBAL io.open ...")."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0].split(". Please")[0] if lines else type(err).__name__
    return reason[:200]


def _read(path: str) -> Mapping[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise UserError(
            f"checkpoint {path} not found; the published checkpoints of the paper are linked from "
            "https://github.com/luping-liu/PNDM (README), or train one with --runner train"
        )
    try:
        if path.endswith(".safetensors"):
            state = load_file(path, device="cpu")
        else:
            # weights_only refuses any pickle that would construct arbitrary objects or call code
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure here means the same thing to the user
        raise UserError(
            f"checkpoint {path} could not be read: it is not a plain state dict, or loading it would execute "
            f"code and was refused ({_reason(err)})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"checkpoint {path} holds a {type(state).__name__}, not a plain state dict of tensors; "
            "save model.state_dict() alone"
        )
    return state


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a plain state dict into `model` with strict keys and shapes; tensors are cast to the model's
    dtype. Returns the model."""
    path = os.fspath(path)
    state = _read(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not match the model: {len(missing)} missing keys ({_names(missing)}), "
            f"{len(unexpected)} unexpected keys ({_names(unexpected)}); check that the config's Model section "
            "is the one the checkpoint was trained with"
        )
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        shapes = ", ".join(
            f"{k} (checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)})" for k in wrong[:_SHOWN]
        )
        more = f", ... {len(wrong) - _SHOWN} more" if len(wrong) > _SHOWN else ""
        raise UserError(
            f"checkpoint {path} has {len(wrong)} tensors of the wrong shape: {shapes}{more}; check that the "
            "config's Model section is the one the checkpoint was trained with"
        )
    model.load_state_dict(state, strict=True)
    return model


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict atomically: to a temporary file in the same folder, then os.replace, so that a
    crash mid-write never leaves a truncated checkpoint under `path`. safetensors for .safetensors, else
    torch.save."""
    with atomic_path(path) as tmp:
        if os.fspath(path).endswith(".safetensors"):
            save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
        else:
            torch.save(dict(state_dict), tmp)
