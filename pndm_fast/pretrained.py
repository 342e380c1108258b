"""The models that ship inside the package, in one call and offline:

    model, schedule = pndm_fast.pretrained("digits")

A bundled model is a bundled config (pndm_fast/configs/NAME.yml) whose Sample.model_path names a weights file in
pndm_fast/weights/; today that is `digits`, a 16x16 DDIM UNet trained on scikit-learn's digits. The paper's
published checkpoints (CIFAR-10, CelebA, LSUN) are too large to ship: download one and build it by hand, with
load_config, build_model and load_checkpoint (README, Python API).
"""

from __future__ import annotations

from importlib import resources
from typing import NamedTuple

import torch

from .config import bundled_config_names, load_config
from .errors import UserError
from .models import build_model, load_checkpoint
from .continuous import schedule_from_config
from .schedule import Schedule


class Pretrained(NamedTuple):
    """A bundled model in eval mode without gradients, and its noise schedule; unpacks as (model, schedule)."""

    model: torch.nn.Module
    schedule: Schedule

    def __repr__(self) -> str:
        parameters = sum(p.numel() for p in self.model.parameters())
        shape = "x".join(map(str, image_shape(self.model)))
        return (f"Pretrained(model={type(self.model).__name__} ({parameters / 1e6:.2f} M parameters, "
                f"{shape} images, {next(self.model.parameters()).dtype}), "
                f"schedule={self.schedule.num_steps} diffusion steps)")


def _weights(name: str):
    """The packaged weights file of bundled config `name`, or None when it ships without weights."""
    file = (load_config(name).get("Sample") or {}).get("model_path")
    if not file or "/" in file:
        return None
    path = resources.files("pndm_fast") / "weights" / file
    return path if path.is_file() else None


def pretrained_names() -> list[str]:
    """Names `pretrained` takes: the bundled configs that ship with weights."""
    return [name for name in bundled_config_names() if _weights(name) is not None]


def image_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images a bundled model makes: noise for a batch of B is
    torch.randn(B, *image_shape(model))."""
    return (model.out_channels_eps, model.image_size, model.image_size)


def pretrained(name: str = "digits", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Pretrained:
    """The bundled model `name` (dash or underscore spelling) with its packaged weights, on `device` in `dtype`,
    in eval mode without gradients, and the Schedule of its config. Reads only files inside the package."""
    names = pretrained_names()
    key = name.replace("_", "-") if isinstance(name, str) else name
    if key not in names:
        raise UserError(f"no bundled model {name!r}: pretrained() takes {', '.join(names)}; for the paper's "
                        "published checkpoints use load_config, build_model and load_checkpoint (README, Python API)")
    config = load_config(key)
    model = build_model(config)
    load_checkpoint(model, str(_weights(key)))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Pretrained(model, schedule_from_config(config["Schedule"]))
