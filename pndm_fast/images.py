"""Turning samples into PNG files, written atomically."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) samples in [-1, 1] -> (B, H, W, C) uint8, rounding as torchvision's save_image does:
    floor(clamp((x + 1) / 2, 0, 1) * 255 + 0.5)."""
    v = ((x.detach().float().cpu() + 1) / 2).clamp_(0, 1)
    return (v * 255 + 0.5).floor_().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pil(pixels: np.ndarray) -> Image.Image:
    """An (H, W, C) uint8 array as a grey (C = 1) or RGB (C = 3) image."""
    return Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")


def write_png_atomic(pixels: np.ndarray, path: str) -> None:
    """Write a PNG so that a reader never sees a partial file under `path` (see atomic_path)."""
    with atomic_path(path) as tmp:
        _pil(pixels).save(tmp, format="PNG")


def image_grid(pixels: np.ndarray, padding: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 tiles -> one (rows, cols) grid image with `padding` black pixels between tiles."""
    n, h, w, c = pixels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[top: top + h, left: left + w] = pixels[i]
    return grid
