"""`--runner fid`: FID of a folder of images against reference statistics, with pytorch-fid's Inception features.

    pndm-fast --runner fid --image_path REAL_DIR --fid_stats stats.npz --make_stats   # write (mu, sigma)
    pndm-fast --runner fid --image_path temp/results --fid_stats stats.npz            # print the FID

Features are those of pytorch-fid (Seitzer, the port of the TTUR reference's TensorFlow Inception): its
InceptionV3 with the FID weights, 2048-d final-pool features, each image read as RGB in [0, 1] and resized to
299x299 bilinearly inside the network, exactly as `python -m pytorch_fid` does. The Frechet distance itself is
pndm_fast.frechet's (float64, eigendecompositions), which agrees with pytorch-fid's scipy sqrtm to rounding. The
weights are only ever read from the local torch hub cache, never downloaded.
"""

from __future__ import annotations

import os
from typing import Protocol
from unittest import mock

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_file
from ..data import IMAGE_SUFFIXES
from ..errors import UserError, first_line
from ..frechet import frechet_distance, statistics
from ..models.checkpoint import torch_load

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS}"


class FeatureExtractor(Protocol):
    """What the FID pipeline needs of a network: the PIL mode images are read in ("RGB" or "L"), and a call
    mapping a (B, C, H, W) float32 batch in [0, 1] (all of one size) to (B, D) features."""

    mode: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionFeatures:
    """pytorch-fid's InceptionV3 pool3 features (B, 2048), on `device`."""

    mode = "RGB"

    def __init__(self, device: str):
        weights = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS)
        try:
            from pytorch_fid import inception
        except Exception as err:  # noqa: BLE001 - ImportError, or torchvision failing against this torch
            inception, failure = None, first_line(err)
        need = []
        if inception is None:
            need.append(f"pip install pytorch-fid and the torchvision release built for torch {torch.__version__} "
                        f"(importing pytorch_fid failed: {failure})")
        if not os.path.isfile(weights):
            need.append(f"download {FID_WEIGHTS_URL} to {weights} (it is never downloaded here)")
        if need:
            raise UserError("FID with Inception features needs: " + "; and ".join(need))

        def local_weights(url, *args, **kwargs):
            # pytorch-fid would download here; the file is already in the hub cache, read as plain tensors only.
            return torch_load(weights, what="Inception weights")

        with mock.patch.object(inception, "load_state_dict_from_url", local_weights):
            net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        self.net = net.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.device))[0].flatten(1).cpu()


def image_files(folder: str) -> list[str]:
    """The image files directly in `folder` (not its subfolders, as pytorch-fid reads a folder), sorted."""
    if not folder or not os.path.isdir(folder):
        raise UserError(f"image folder {folder} does not exist: pass --image_path with a folder of images")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, name)))
    if len(paths) < 2:
        found = "no images" if not paths else "only 1 image"
        raise UserError(f"{found} ({', '.join(IMAGE_SUFFIXES)}) in {folder}: FID estimates a covariance and needs "
                        "at least 2 images (thousands for a meaningful score; the papers use 50000)")
    return paths


def read_image(path: str, mode: str) -> torch.Tensor:
    """One image file -> (C, H, W) float32 in [0, 1], as torchvision's ToTensor gives it."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode), dtype=np.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path} ({first_line(err)}): remove or replace the file") from None
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1) / 255.0


def folder_features(folder: str, extractor: FeatureExtractor, batch_size: int) -> np.ndarray:
    """(N, D) float64 features of every image in `folder`, in batches of at most `batch_size` images of one size
    (pytorch-fid batches whole folders and so needs one size; here a size change just starts a new batch)."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    feats, pending = [], []

    def flush():
        if pending:
            out = extractor(torch.stack(pending))
            feats.append(out.detach().double().cpu().numpy())
            pending.clear()

    for path in image_files(folder):
        image = read_image(path, extractor.mode)
        if pending and (len(pending) == batch_size or image.shape != pending[0].shape):
            flush()
        pending.append(image)
    flush()
    return np.concatenate(feats)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    # a file object: np.savez would append .npz to the temporary name
    with atomic_file(path) as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) from an .npz with arrays mu and sigma (pytorch-fid's --save-stats layout)."""
    if not os.path.isfile(path):
        raise UserError(f"FID statistics {path} not found: write them from a folder of real images with "
                        f"--runner fid --make_stats --image_path REAL_DIR --fid_stats {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except Exception as err:  # noqa: BLE001 - not an npz, a pickled array, or a missing key: all one answer
        raise UserError(f"FID statistics {path} could not be read ({first_line(err)}): expected an .npz holding "
                        "arrays mu (D,) and sigma (D, D), as --make_stats writes") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"FID statistics {path} hold mu {mu.shape} and sigma {sigma.shape}: expected finite mu "
                        "(D,) and sigma (D, D); rewrite them with --make_stats")
    return mu, sigma


def run_fid(image_path: str, fid_stats: str | None, *, make_stats: bool = False, device: str = "cpu",
            batch_size: int = 50, extractor: FeatureExtractor | None = None) -> int:
    """With make_stats, write (mu, sigma) of image_path's images to fid_stats; else print their FID against
    fid_stats. Returns the exit code (0). `extractor` replaces the Inception network (tests use a small one)."""
    if not fid_stats:
        raise UserError("--runner fid needs --fid_stats STATS.npz: the reference statistics to read, or with "
                        "--make_stats to write")
    image_files(image_path)  # an empty or missing folder is refused before any network is loaded
    reference = None if make_stats else load_stats(fid_stats)
    if extractor is None:
        from .sample import check_device

        extractor = InceptionFeatures(str(check_device(device)))
    mu, sigma = statistics(folder_features(image_path, extractor, batch_size))
    if make_stats:
        save_stats(fid_stats, mu, sigma)
        print(f"wrote FID statistics of {image_path} (features of dimension {mu.shape[0]}) to {fid_stats}")
        return 0
    if reference[0].shape != mu.shape:
        raise UserError(f"FID statistics {fid_stats} are of {reference[0].shape[0]}-d features, the images give "
                        f"{mu.shape[0]}-d: rewrite them with --make_stats from the same feature network")
    print(f"FID {frechet_distance(mu, sigma, *reference):.4f} of {image_path} against {fid_stats}")
    return 0
