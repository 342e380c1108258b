"""Turning samples into PNG files, written atomically."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .atomic import atomic_file


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) samples in [-1, 1] -> (B, H, W, C) uint8, rounding as torchvision's save_image does:
    floor(clamp((x + 1) / 2, 0, 1) * 255 + 0.5)."""
    v = ((x.detach().float().cpu() + 1) / 2).clamp_(0, 1)
    return (v * 255 + 0.5).floor_().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pil(pixels: np.ndarray) -> Image.Image:
    """An (H, W, C) uint8 array as a grey (C = 1) or RGB (C = 3) image."""
    return Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")


def write_png_atomic(pixels: np.ndarray, path: str, *, text: dict[str, str] | None = None,
                     fsync: bool = True) -> None:
    """Write a PNG so that a reader never sees a partial file under `path` (see atomic_file), with `text` as
    tEXt chunks (key -> value)."""
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    with atomic_file(path, fsync=fsync) as file:
        _pil(pixels).save(file, format="PNG", pnginfo=info)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes):
    """The chunks of PNG bytes after the signature, in order, as (kind, body, state): state "ok" (its CRC
    matches), "bad" (it does not) or "cut" (the bytes end inside it; body is what is there). The walk stops after
    the first chunk that is not "ok"; a tail too short for a chunk header yields nothing more."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            yield kind, data[pos + 8: end], "cut"
            return
        intact = zlib.crc32(data[pos + 4: end]) == struct.unpack(">I", data[end: end + 4])[0]
        yield kind, data[pos + 8: end], "ok" if intact else "bad"
        if not intact:
            return
        pos = end + 4


def png_chunks_intact(data: bytes) -> bool:
    """Whether `data` is a whole PNG: the signature, then chunks whose CRCs all match, ending with IEND.

    Pillow checks the CRCs of header chunks only, and a flipped bit in the pixel data (IDAT) can still
    inflate, so a damaged file could otherwise decode into wrong pixels without an error.
    """
    if not data.startswith(PNG_SIGNATURE):
        return False
    size = len(PNG_SIGNATURE)
    for kind, body, state in png_chunks(data):
        if state != "ok":
            return False
        size += 12 + len(body)
        if kind == b"IEND":
            return size == len(data)
    return False


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks (key -> value) of PNG bytes that may be cut short or damaged further on: each chunk up to
    the first broken one, counted only when its own CRC matches, and, when the bytes end inside a tEXt chunk,
    the part of it that is there (a value cut short). Pillow writes tEXt before the pixel data, so a file of this
    module's that lost its end or had a pixel bit flipped still says which program wrote it."""
    text: dict[str, str] = {}
    if not data.startswith(PNG_SIGNATURE):
        return text
    for kind, body, state in png_chunks(data):
        if state == "bad":
            break
        if kind == b"tEXt" and b"\0" in body:
            key, value = body.split(b"\0", 1)
            text[key.decode("latin-1")] = value.decode("latin-1")
        if kind in (b"IDAT", b"IEND"):
            break
    return text


def load_picture(data: bytes, shape: tuple[int, int, int], what: str, mask: bool = False) -> torch.Tensor:
    """A picture file's bytes (any format Pillow reads) as a (1, C, H, W) float32 tensor for `shape` = (C, H, W):
    resized to the model's size, in [-1, 1] (an image), or 1 where it is light, 0 where dark, one channel (a mask:
    white repaints). UserError, one line naming `what`, when Pillow cannot read it."""
    from .errors import UserError

    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture = picture.convert("L" if mask or channels == 1 else "RGB")
            if picture.size != (width, height):
                picture = picture.resize((width, height), Image.NEAREST if mask else Image.LANCZOS)
            pixels = np.asarray(picture, dtype=np.float32)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{what} is not a picture Pillow can read ({type(err).__name__})") from None
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if mask:
        return torch.from_numpy((pixels >= 128).astype(np.float32)).permute(2, 0, 1)[None]
    return torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)[None]


def read_png(path: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict[str, str]] | None:
    """The (H, W, C) uint8 pixels and the tEXt chunks of the PNG at `path`, or None when it is absent, cut
    short, damaged, or not a `shape` = (C, H, W) image in this module's modes (L for C = 1, RGB for C = 3)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    if not png_chunks_intact(data):
        return None
    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format != "PNG" or image.size != (width, height) or image.mode != ("L" if channels == 1
                                                                                         else "RGB"):
                return None
            pixels = np.asarray(image)
            text = dict(getattr(image, "text", {}))
    except Exception:  # noqa: BLE001 - whatever Pillow raises on a bad file, the file is not a usable image
        return None
    return (pixels[..., None] if pixels.ndim == 2 else pixels), text


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
