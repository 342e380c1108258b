"""A small CNN classifier of the 16x16 digits the bundled diffusion model was trained on; its penultimate layer is
the feature space of the digits Frechet-distance benchmark (benchmarks/accuracy_digits.py), standing in for
Inception, which knows nothing of 16x16 grey digits.

The shipped weights, benchmarks/weights/digits_classifier.safetensors, are written by
`python benchmarks/train_digits_classifier.py`, trained on the digits outside `held_out_indices()`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pndm_fast.errors import UserError

WEIGHTS = "digits_classifier.safetensors"
IMAGE_SIZE = 16
HELD_OUT = 360  # a fifth of scikit-learn's 1797 digits, never seen in training


class DigitsClassifier(nn.Module):
    """conv 3x3 (16) - pool - conv 3x3 (32) - pool - fc 64 - fc 10: 38 k parameters, 150 KB in float32."""

    FEATURES = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, self.FEATURES)
        self.out = nn.Linear(self.FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) images in [0, 1] -> (B, 64) penultimate activations (after ReLU, as Inception's pool)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise UserError(f"the digits classifier reads (batch, 1, 16, 16) images, got shape {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(self.conv1(x * 2 - 1)), 2)  # centred input: [0, 1] -> [-1, 1]
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 64) features -> (B, 10) logits."""
        return self.out(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) images in [0, 1] -> (B, 10) logits."""
        return self.head(self.features(x))


def held_out_indices(count: int = 1797) -> np.ndarray:
    """Indices (into scikit-learn's digits, in their order) of the test digits: a fixed random fifth."""
    return np.sort(np.random.default_rng(0).permutation(count)[:HELD_OUT])


def weights_path() -> str:
    return str(Path(__file__).resolve().parent / "weights" / WEIGHTS)


def load_classifier(path: str | None = None) -> DigitsClassifier:
    """The classifier with the shipped weights (or those at `path`), in eval mode, on the CPU."""
    import os

    from pndm_fast.models.checkpoint import load_checkpoint

    path = path or weights_path()
    if not os.path.isfile(path):
        raise UserError(f"digits classifier weights {path} not found: run python benchmarks/train_digits_classifier.py")
    model = DigitsClassifier()
    load_checkpoint(model, path)  # safetensors, strict keys
    return model.eval().requires_grad_(False)


def digits_with_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as the diffusion model saw them, (1797, 1, 16, 16) in [0, 1], and labels (1797,)."""
    from sklearn.datasets import load_digits as sklearn_digits

    from pndm_fast.data import load_digits

    return load_digits(IMAGE_SIZE, 1).images, torch.from_numpy(sklearn_digits().target)


@torch.inference_mode()
def test_accuracy(model: DigitsClassifier) -> float:
    """Fraction of the held-out digits classified right."""
    images, labels = digits_with_labels()
    idx = torch.from_numpy(held_out_indices(len(images)))
    return float((model(images[idx]).argmax(1) == labels[idx]).double().mean())
