"""The run's noise, counter-based: image i's starting noise depends on (seed, i) only, and a stochastic sampler's
k-th fresh draw for image i on (seed, i, k) only, so any batch size, backend, number of processes or interruption
gives every image the same noise. Drawn on the CPU, where the generator is the same everywhere, and moved once
per run (docs/stochastic.md says why it is not drawn inside the CUDA graph)."""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import UserError
from .seeds import derived_seed

STEP_STREAM = 1  # a fourth word in the seed of a step's draw: never the (seed, i) of a starting noise


def noise_for(indices: Sequence[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Starting noise of images `indices`, (len, *shape) float32 on the CPU. Image i's noise depends only on
    (seed, i), never on the batch it falls in, so any batch size (or split across processes) writes the same
    images."""
    out = torch.empty((len(indices), *shape))
    for row, index in enumerate(indices):
        out[row] = torch.randn(shape, generator=torch.Generator().manual_seed(derived_seed(seed, index)))
    return out


def step_noise(seed: int, indices: Sequence[int], count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A stochastic run's fresh draws, (count, len(indices), *shape) float32 on the CPU: [k, row] is draw k of
    image indices[row]."""
    out = torch.empty((count, len(indices), *shape))
    for row, index in enumerate(indices):
        for k in range(count):
            gen = torch.Generator().manual_seed(derived_seed(seed, index, STEP_STREAM, k))
            out[k, row] = torch.randn(shape, generator=gen)
    return out


def check_seed(seed, batch: int, indices) -> tuple[int, list[int]]:
    """(seed, image indices) of a stochastic run: `seed` an integer >= 0, `indices` one per image (default
    0 .. batch - 1)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")
    indices = list(range(batch)) if indices is None else list(indices)
    if len(indices) != batch or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                        for i in indices):
        raise UserError(f"indices must be {batch} integers >= 0 (one per image of the batch), got {indices!r}")
    return seed, indices
