"""Training images, all read from local files: CIFAR-10 batches, a folder of images, scikit-learn's digits.

Every dataset yields float32 tensors (C, image_size, image_size) with values in [0, 1]; the training loop maps
them to [-1, 1] and applies the random flips itself, so that their randomness can be derived from the step.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UserError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory as one tensor (N, C, H, W), divided by `scale` when read; with `labels` (N,) int64,
    each item is (image, label) instead of the image alone.

    CIFAR-10 stays uint8 until read: 150 MB instead of 600 MB as float32.
    """

    def __init__(self, images: torch.Tensor, scale: float, labels: torch.Tensor | None = None):
        self.images, self.scale, self.labels = images, scale, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index].float() / self.scale
        return image if self.labels is None else (image, self.labels[index])


class ImageFolder(torch.utils.data.Dataset):
    """Image files read one at a time, center-cropped to a square and resized to image_size."""

    def __init__(self, paths: list[str], image_size: int, channels: int):
        self.paths, self.image_size, self.mode = paths, image_size, "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = square_resize(image.convert(self.mode), self.image_size)
        except OSError as err:
            raise UserError(f"cannot read image {path} ({err}): remove or replace the file") from None
        array = np.asarray(image, dtype=np.float32).reshape(self.image_size, self.image_size, -1)
        return torch.from_numpy(array).permute(2, 0, 1) / 255.0


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """The largest centered square of the image, resized to size x size (bilinear, antialiased by Pillow)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) images with `channels` channels: gray is replicated, colour turned to luma (ITU-R 601)."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * luma).sum(1, keepdim=True).round().to(images.dtype)
    raise UserError(f"Dataset.channels must be 1 or {images.shape[1]} for this dataset, got {channels}")


def load_digits(image_size: int, channels: int, labels: bool = False) -> TensorImages:
    """scikit-learn's 1797 8x8 digits (values 0..16), upscaled bilinearly: smooth strokes, unlike blocky nearest.
    With labels, each item is (image, digit 0..9)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise UserError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    digits = sklearn_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    targets = torch.from_numpy(digits.target).long() if labels else None
    return TensorImages(match_channels(images, channels), 1.0, targets)


def cifar_folder(path: str) -> str:
    """The folder holding data_batch_1..5: `path` itself or its cifar-10-batches-py/ subfolder."""
    for folder in (path, os.path.join(path, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(folder, name)) for name in CIFAR_BATCHES):
            return folder
    hint = " (cifar-10-python.tar.gz is there: extract it)" if os.path.isfile(
        os.path.join(path, "cifar-10-python.tar.gz")) else ""
    raise UserError(f"CIFAR-10 not found in {path}{hint}: put the python-pickle batches data_batch_1..5 "
                    f"(cifar-10-python.tar.gz from {CIFAR_URL}, extracted) there, or pass --data_path")


def load_cifar10(path: str, image_size: int, channels: int) -> TensorImages:
    """The 50000 training images of CIFAR-10, from its python-pickle batches (rows of 3072 uint8, CHW order)."""
    folder = cifar_folder(path)
    arrays = []
    for name in CIFAR_BATCHES:
        with open(os.path.join(folder, name), "rb") as f:
            arrays.append(np.asarray(pickle.load(f, encoding="bytes")[b"data"], dtype=np.uint8))
    images = torch.from_numpy(np.concatenate(arrays)).view(-1, 3, 32, 32)
    if image_size != 32:
        resized = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return TensorImages(match_channels(images, channels), 255.0)


def load_image_folder(path: str, image_size: int, channels: int) -> ImageFolder:
    """Every image file under `path` (recursively, in sorted order so the data order is reproducible)."""
    if not os.path.isdir(path):
        raise UserError(f"image folder {path} does not exist: pass --data_path with a folder of images")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {path}: put the training images "
                        f"there, or pass --data_path with a folder that has them")
    return ImageFolder(paths, image_size, channels)


def load_dataset(config: dict, data_path: str | None = None, labels: bool = False) -> torch.utils.data.Dataset:
    """The training set named by config["Dataset"]["dataset"]: CIFAR10, digits, or folder (alias images).

    The files are read from `data_path`, else from Dataset.path in the config; digits need none. With labels
    (a class-conditional model), items are (image, class); only digits carry classes.
    """
    section = config.get("Dataset") or {}
    name = str(section.get("dataset", "")).lower()
    size, channels = int(section.get("image_size", 32)), int(section.get("channels", 3))
    if name == "digits":
        return load_digits(size, channels, labels)
    if labels:
        raise UserError(f"Model.num_classes needs a dataset with class labels, and Dataset.dataset "
                        f"{section.get('dataset')!r} has none here: use digits, or remove Model.num_classes")
    if name not in ("cifar10", "folder", "images"):
        raise UserError(f"unknown Dataset.dataset {section.get('dataset')!r}: expected CIFAR10, digits or folder "
                        f"(any folder of images, e.g. CelebA's, with --data_path)")
    path = data_path or section.get("path")
    if not path:
        raise UserError(f"Dataset {section.get('dataset')} needs its files: pass --data_path DIR "
                        f"or set Dataset.path in the config")
    if name == "cifar10":
        return load_cifar10(path, size, channels)
    return load_image_folder(path, size, channels)
