"""The run's noise, counter-based: image i's starting noise depends on (seed, i) only, and a stochastic sampler's
k-th fresh draw for image i on (seed, i, k) only, so any batch size, backend, number of processes or interruption
gives every image the same noise. Starting noise is drawn on the CPU and moved once per run; a stochastic run's
draws on a GPU are drawn there (docs/stochastic.md)."""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from .errors import UserError
from .seeds import derived_seeds

STEP_STREAM = 1  # a fourth word in the seed of a step's draw: never the (seed, i) of a starting noise
# Threads pay off for rows of 4096 values and up (2 cores: 1.7x at 3x64x64); below, the per-row Python work under
# the GIL costs more than the draws (digits' 784 values: 1.5x slower on 2 threads).
MIN_THREADED_ROW, MIN_ROWS_PER_THREAD = 4096, 64
# Why a CUDA run draws on the host after all (None while the device kernel works): the draws then are the CPU's.
DEVICE_DRAW_ERROR: str | None = None


def noise_for(indices: Sequence[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Starting noise of images `indices`, (len, *shape) float32 on the CPU. Image i's noise depends only on
    (seed, i), never on the batch it falls in, so any batch size (or split across processes) writes the same
    images."""
    return _draws([(seed, index) for index in indices], shape).view(len(indices), *shape)


def step_noise(seed: int, indices: Sequence[int], count: int, shape: tuple[int, ...],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """A stochastic run's fresh draws, (count, len(indices), *shape) float32 on `device`: [k, row] is draw k of
    image indices[row]. On a CUDA device with Triton they are drawn there, by one launch of a counter-based
    generator (Philox, kernels/normal.py) keyed with the same seeds, and nothing is drawn on the host; elsewhere
    by torch's CPU generator (also where the kernel fails to launch: DEVICE_DRAW_ERROR says why). The two are
    different numbers: a run's images depend on the device type it runs on, never on its backend, batch or
    processes."""
    global DEVICE_DRAW_ERROR
    words = [(seed, index, STEP_STREAM, k) for k in range(count) for index in indices]
    device = torch.device(device)
    kernel = device_generator() if device.type == "cuda" and DEVICE_DRAW_ERROR is None else None
    if kernel is not None:
        seeds = torch.tensor(derived_seeds(words), dtype=torch.int64).to(device, non_blocking=True)
        try:
            return kernel(seeds, math.prod(shape)).view(count, len(indices), *shape)
        except Exception as error:  # noqa: BLE001 - a card Triton cannot compile for: the CPU's draws still work
            DEVICE_DRAW_ERROR = f"{type(error).__name__}: {error}"
    return _draws(words, shape).view(count, len(indices), *shape).to(device)


@functools.cache
def device_generator():
    """kernels/normal.py's normal_rows, or None where Triton does not import."""
    try:
        from .kernels.normal import normal_rows
    except ImportError:
        return None
    return normal_rows


def _draws(words: list[tuple[int, ...]], shape: tuple[int, ...]) -> torch.Tensor:
    """(len(words), *shape): row j a standard normal draw from a CPU generator seeded with derived_seed(*words[j]).

    The seeds are hashed together, and large rows are drawn in torch's intra-op threads, each reseeding a
    generator of its own per row: a row's values depend on its seed alone, so the split cannot change them. (A
    fresh generator and SeedSequence per row cost 4x more: 135 ms for a 10-step run's draws at batch 256 of
    digits.)"""
    out = torch.empty((len(words), *shape))
    seeds = derived_seeds(words)
    threads = torch.get_num_threads() if math.prod(shape) >= MIN_THREADED_ROW else 1
    chunks = max(1, min(threads, len(words) // MIN_ROWS_PER_THREAD))
    bounds = [len(words) * c // chunks for c in range(chunks + 1)]

    def draw(chunk: int) -> None:
        generator = torch.Generator()
        for row in range(bounds[chunk], bounds[chunk + 1]):
            torch.randn(shape, generator=generator.manual_seed(seeds[row]), out=out[row])

    if chunks == 1:
        draw(0)
    else:
        with ThreadPoolExecutor(chunks) as pool:
            list(pool.map(draw, range(chunks)))
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
