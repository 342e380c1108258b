"""What the sample runner samples from: a pndm_fast checkpoint or a diffusers model folder, and for a
class-conditional model the labels and the guidance of each batch (`--class`, `--guidance`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..adapters import DIFFUSERS_PREDICTIONS, Denoiser
from ..errors import UserError
from ..models.diffusers_folder import (WEIGHTS, is_diffusers_folder, load_diffusers_unet, read_diffusers_config,
                                       schedule_from_folder)
from ..continuous import schedule_from_config
from ..schedule import Schedule

@dataclass
class Source:
    """The network to sample, how to read it, its schedule, its image shape and the file that identifies it."""

    net: torch.nn.Module
    prediction: str
    schedule: Schedule
    shape: tuple[int, int, int]
    weights_file: str
    num_classes: int
    from_diffusers: bool = False  # a diffusers UNet, read through Denoiser.from_diffusers


def open_diffusers_folder(path: str, config: dict, device, dtype: torch.dtype) -> Source:
    """A diffusers UNet folder: the network through diffusers, its scheduler config's betas and prediction type
    when the folder has one (else the config's Schedule section, reading eps)."""
    folder, unet_config = read_diffusers_config(path)
    net = load_diffusers_unet(path, device, dtype).requires_grad_(False)
    found = schedule_from_folder(path)
    if found is None:
        schedule, prediction = schedule_from_config(config["Schedule"]), "eps"
    else:
        betas, kind = found
        schedule, prediction = Schedule(betas, description=f"{path}'s scheduler config"), DIFFUSERS_PREDICTIONS[kind]
    size = unet_config.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    if not isinstance(size, int) or size < 1:
        raise UserError(f"{path}: config.json gives no integer sample_size, so the image size is unknown")
    return Source(net, prediction, schedule, (int(unet_config.get("in_channels", 3)), size, size),
                  folder_weights(path), 0, from_diffusers=True)


def is_folder_model(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and is_diffusers_folder(path)


def folder_weights(path: str) -> str:
    """The weights file of a diffusers model folder: what identifies the model in each image's settings."""
    folder, _ = read_diffusers_config(path)
    return next(os.path.join(folder, w) for w in WEIGHTS if os.path.isfile(os.path.join(folder, w)))


def check_classes(source: Source, requested: str | None, guidance: float) -> None:
    """Refuse --class and --guidance where they cannot apply, with one line each."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0:
        raise UserError(f"--guidance must be a number >= 0 (1 is the conditional model alone, 0 the "
                        f"unconditional one), got {guidance!r}")
    if requested is None:
        if guidance != 1.0:
            raise UserError("--guidance needs --class N or --class all: guidance steers towards a class")
        return
    if source.num_classes == 0:
        raise UserError(f"--class {requested}: this model is unconditional (its config has no Model.num_classes); "
                        "use a class-conditional config such as digits-cond")
    if requested != "all":
        if not requested.lstrip("-").isdigit() or not 0 <= int(requested) < source.num_classes:
            raise UserError(f"--class {requested} is not a class of this model: expected 0 to "
                            f"{source.num_classes - 1}, or all")


def labels_for(indices: range, requested: str | None, num_classes: int, total: int) -> torch.Tensor | None:
    """Image i's class: --class N for every image, or with --class all (i * classes) // total, so that a grid of
    classes x classes images has one row per class."""
    if requested is None:
        return None
    if requested == "all":
        return torch.tensor([(i * num_classes) // total for i in indices], dtype=torch.long)
    return torch.full((len(indices),), int(requested), dtype=torch.long)


def denoiser_for(source: Source, labels: torch.Tensor | None, guidance: float):
    """The model to pass to sample(): the network read as its prediction says, conditioned on `labels` with
    classifier-free guidance `guidance` against the null class (label num_classes)."""
    if labels is None:
        if source.from_diffusers:
            return Denoiser.from_diffusers(source.net, source.prediction)
        return source.net if source.prediction == "eps" else Denoiser(source.net, source.prediction)
    labels = labels.to(next(source.net.parameters()).device)
    null = torch.full_like(labels, source.num_classes)
    return Denoiser(source.net, source.prediction, cond={"y": labels}, uncond={"y": null}, guidance=guidance)
