"""Loading and saving plain state dicts (.ckpt/.pt/.pth via torch.save, or .safetensors), with one-line errors.

Nothing here unpickles code: torch.save files are read with torch.load(weights_only=True), which accepts
tensors, dicts, lists, tuples, strings and numbers only and refuses any other global before it is called, and
.safetensors files hold raw tensor bytes and a JSON header, no pickle at all.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..atomic import DestinationExists, atomic_file
from ..errors import UserError, first_line

_SHOWN = 3  # how many offending keys an error message names
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
# safetensors stores tensors sorted by dtype and name and forgets the dict's order; the order is kept in the
# header's string-to-string metadata so that a round trip gives back the state dict key for key, in order
KEY_ORDER = "pndm_fast.key_order"
DATA_PARALLEL_PREFIX = "module."  # what nn.DataParallel / DistributedDataParallel put before every key


def _names(keys: list[str]) -> str:
    more = f", ... {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _reason(err: Exception) -> str:
    """The informative line of a load error: torch's weights_only refusal buries it after a paragraph of
    advice ("WeightsUnpickler error: Unsupported global: GLOBAL io.open ...", or for a blocked module such as
    os, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.")."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return first_line(named[0] if named else text if text.strip() else err).split(". Please")[0].rstrip(".")


def is_safetensors(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(SAFETENSORS_SUFFIX)


def torch_load(path: str, map_location="cpu", what: str = "checkpoint"):
    """torch.load(path, weights_only=True), with every failure turned into a one-line UserError.

    A pickle that names any global other than torch's tensor rebuilders (io.open, os.system, a class with a
    __reduce__) is refused before that global is looked up, so nothing in the file runs.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found")
    try:
        with warnings.catch_warnings():
            # a raw pickle (not torch.save's zip) makes torch warn about its protocol on stderr before refusing
            # it; the refusal below is the one line the user needs
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure here means the same thing to the user
        reason = _reason(err)
        if "GLOBAL" in reason or "Unsupported class" in reason:
            raise UserError(
                f"{what} {path}: loading it would execute code and was refused ({reason}); only plain state "
                "dicts of tensors are read (torch.load weights_only=True): re-save model.state_dict() alone, "
                "or as .safetensors, where the file was made"
            ) from None
        # e.g. a raw pickle of protocol 4 or 5 ("Unsupported operand 149"), refused before any of it is run
        raise UserError(
            f"{what} {path} could not be read and was refused: it is not a plain state dict saved by torch.save "
            f"({reason})"
        ) from None


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            order = json.loads(metadata[KEY_ORDER]) if KEY_ORDER in metadata else None
            if not (isinstance(order, list) and all(isinstance(k, str) for k in order)
                    and sorted(order) == sorted(keys)):
                order = keys  # written by another program: its header order (sorted by safetensors)
            return {k: f.get_tensor(k) for k in order}
    except (SafetensorError, OSError, ValueError) as err:  # ValueError: a corrupt KEY_ORDER entry
        raise UserError(f"checkpoint {path} could not be read: it is not a valid .safetensors file "
                        f"({_reason(err)})") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in `path` (on the CPU, in the file's key order and dtypes), or a one-line UserError when
    the file is missing, unreadable, would run code, or holds anything but a flat mapping of names to tensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(
            f"checkpoint {path} not found; the published checkpoints of the paper are linked from "
            "https://github.com/luping-liu/PNDM (README), or train one with --runner train"
        )
    state = _read_safetensors(path) if is_safetensors(path) else torch_load(path)
    if not isinstance(state, Mapping):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a plain state dict of tensors; "
                        "save model.state_dict() alone")
    others = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if others:
        raise UserError(
            f"checkpoint {path} is not a plain state dict of tensors: {len(others)} entries are something else "
            f"({_names(others)}); save model.state_dict() alone (for a training folder, load its ema.ckpt)"
        )
    return dict(state)


def strip_data_parallel_prefix(state: Mapping[str, torch.Tensor],
                               expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the leading "module." removed from every key, when every key has it and the model's keys
    do not: checkpoints saved from an nn.DataParallel or DistributedDataParallel wrapper (as the reference's
    training did) look like that. Any other state dict is returned as it is, so a mismatch is still reported."""
    keys = list(state)
    if keys and all(k.startswith(DATA_PARALLEL_PREFIX) for k in keys) \
            and not any(k.startswith(DATA_PARALLEL_PREFIX) for k in expected):
        return {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: str) -> None:
    """UserError unless `state` has exactly the keys of `expected` (a model's state_dict(), possibly on the
    meta device) with the same shapes, and floating-point tensors where the model has them (float dtypes may
    differ: they are cast on load)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not match the model: {len(missing)} missing keys ({_names(missing)}), "
            f"{len(unexpected)} unexpected keys ({_names(unexpected)}); check that the config's Model section "
            "is the one the checkpoint was trained with"
        )
    # a float parameter read from an integer, bool or complex tensor would be cast without a word (int32 weights
    # truncated, complex ones dropping their imaginary part): refused instead
    cast = [k for k in expected if expected[k].is_floating_point() and not state[k].is_floating_point()]
    if cast:
        shown = ", ".join(f"{k} ({str(state[k].dtype).replace('torch.', '')})" for k in cast[:_SHOWN])
        more = f", ... {len(cast) - _SHOWN} more" if len(cast) > _SHOWN else ""
        raise UserError(
            f"checkpoint {path} has {len(cast)} tensors that are not floating point where the model's are: "
            f"{shown}{more}; it is not a checkpoint of this model's weights (convert it to float where it was made)"
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


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a plain state dict into `model` with strict keys and shapes; tensors are cast to the model's
    dtype, and a "module." prefix on every key (a DataParallel checkpoint) is dropped. Returns the model."""
    path = os.fspath(path)
    expected = model.state_dict()
    state = strip_data_parallel_prefix(read_state_dict(path), expected)
    check_state_dict(state, expected, path)
    model.load_state_dict(state, strict=True)
    return model


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU tensors that safetensors' save_file accepts: contiguous, and no two of them on the same
    storage (tied weights, or views of one buffer, which save_file refuses); those are cloned, each then
    stored once per key, and the values are unchanged bit for bit."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    owners: dict[int, int] = {}
    for v in tensors.values():
        if v.numel():
            ptr = v.untyped_storage().data_ptr()
            owners[ptr] = owners.get(ptr, 0) + 1
    return {k: v.clone() if v.numel() and owners[v.untyped_storage().data_ptr()] > 1 else v
            for k, v in tensors.items()}


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict atomically: to a new temporary file in the same folder (created exclusively, never
    through a link), then os.replace, so that a crash mid-write never leaves a truncated checkpoint under `path`.
    safetensors for .safetensors (key order kept in its metadata), else torch.save."""
    with atomic_file(path) as file:
        write_state_dict(state_dict, file, safetensors=is_safetensors(path))


def write_new_checkpoint(state_dict: Mapping[str, torch.Tensor], out_path: str) -> None:
    """--runner convert's output file: written like save_state_dict, but exclusively, so that a file that appears
    under out_path while converting is kept, and fsync'd, so that a power loss never leaves a zero-length
    checkpoint; UserError (one line) when that file appeared."""
    try:
        with atomic_file(out_path, exclusive=True) as file:
            write_state_dict(state_dict, file, safetensors=is_safetensors(out_path))
    except DestinationExists:
        raise UserError(f"--out_path {out_path} appeared while converting; it was left as it is") from None


def write_state_dict(state_dict: Mapping[str, torch.Tensor], file, *, safetensors: bool) -> None:
    """The plain, non-atomic write behind save_state_dict into an open binary `file` (callers pick the final name
    themselves). safetensors' own save_file would create the file itself, mode 0600 and following links; its
    bytes go through `file` instead (the file's mode is then the umask's, like every other output)."""
    if safetensors:
        tensors = _unshared(state_dict)
        file.write(safetensors_bytes(tensors, metadata={"format": "pt", KEY_ORDER: json.dumps(list(tensors))}))
    else:
        torch.save(dict(state_dict), file)
