"""The run's seeds and draws, against numpy's SeedSequence and torch's generator called one row at a time."""

import random

import numpy as np
import pytest
import torch

from pndm_fast.noise import STEP_STREAM, noise_for, step_noise
from pndm_fast.seeds import derived_seed, derived_seeds


def seed_sequence(*words: int) -> int:
    """numpy's own SeedSequence, the definition derived_seeds must equal."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def test_derived_seeds_equal_numpys_seed_sequence_bit_for_bit():
    """Rows of 1 to 7 words, small, 32-bit, 64-bit and longer integers: every length of entropy, every pool
    path (planted: one mixing constant off by one, or the pool's words taken high word first, fails)."""
    rng = random.Random(0)
    pick = [lambda: 0, lambda: 1, lambda: rng.randrange(100), lambda: rng.randrange(2**32),
            lambda: rng.randrange(2**64), lambda: rng.randrange(2**100)]
    rows = [tuple(rng.choice(pick)() for _ in range(rng.randint(1, 7))) for _ in range(2000)]
    assert derived_seeds(rows) == [seed_sequence(*row) for row in rows]
    assert derived_seed(5, 7) == seed_sequence(5, 7) == derived_seeds([(5, 7)])[0]


def test_negative_words_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        derived_seeds([(1, -1)])


def one_row_at_a_time(rows: list[tuple[int, ...]], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed_sequence(*row)))
                        for row in rows])


@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 64, 64)])  # one thread, and rows big enough to draw in threads
@pytest.mark.parametrize("threads", [1, 2])
def test_draws_equal_a_generator_per_image_and_step(shape, threads, monkeypatch):
    """Draw k of image i comes from a generator seeded with (seed, i, STEP_STREAM, k) whatever the threads that
    drew it; a starting noise from (seed, i)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    indices = [3, 0, 2**40, *range(100, 161)]  # 64 rows per draw: enough to split
    draws = step_noise(9, indices, 3, shape)
    want = one_row_at_a_time([(9, i, STEP_STREAM, k) for k in range(3) for i in indices], shape)
    assert torch.equal(draws, want.view(3, len(indices), *shape))
    assert torch.equal(noise_for(indices, shape, 2**33), one_row_at_a_time([(2**33, i) for i in indices], shape))


# Philox4x32-10 in numpy, written from Salmon et al. (2011) and checked on Random123's published known answers.
PHILOX_M, PHILOX_W = (0xD2511F53, 0xCD9E8D57), (0x9E3779B9, 0xBB67AE85)
KNOWN_ANSWERS = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
                 ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
                 ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                  (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


def philox4x32(counter, key):
    mask = np.uint64(0xFFFFFFFF)
    c = [np.asarray(v, dtype=np.uint64) for v in counter]
    k = [np.asarray(v, dtype=np.uint64) for v in key]
    for _ in range(10):
        p0, p1 = np.uint64(PHILOX_M[0]) * c[0], np.uint64(PHILOX_M[1]) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & mask]
        k = [(k[0] + np.uint64(PHILOX_W[0])) & mask, (k[1] + np.uint64(PHILOX_W[1])) & mask]
    return c


def philox_normals(seed: int, numel: int) -> np.ndarray:
    """kernels/normal.py's definition in float64: counter (j, 0, 0, 0), key the seed's halves, 24-bit uniforms."""
    j = np.arange(numel, dtype=np.uint64)
    w0, w1, _, _ = philox4x32((j, 0 * j, 0 * j, 0 * j), (seed & 0xFFFFFFFF, seed >> 32))
    u1 = ((w0 >> np.uint64(8)) + np.uint64(1)).astype(np.float64) / 2**24
    u2 = (w1 >> np.uint64(8)).astype(np.float64) / 2**24
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


@pytest.mark.parametrize("counter,key,want", KNOWN_ANSWERS)
def test_the_numpy_philox_gives_the_published_known_answers(counter, key, want):
    assert tuple(int(v) for v in philox4x32(counter, key)) == want


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from pndm_fast.kernels.normal import normal_rows
    return normal_rows


def test_the_device_draws_are_philox_and_box_muller(interpreter):
    """The Triton kernel (in triton's interpreter) against its definition in float64 (planted: the counter's
    second word set, or u1 and u2 swapped, fails by far more than float32 rounding)."""
    seeds = [0, 1, 2**62 + 12345, 987654321987654321]
    got = interpreter(torch.tensor(seeds), 3000).double().numpy()
    want = np.stack([philox_normals(s, 3000) for s in seeds])
    assert np.abs(got - want).max() < 5e-6
    # a row is its seed's alone: a shorter row is its prefix, the same seed elsewhere the same row
    again = interpreter(torch.tensor([7, seeds[2], 7]), 100)
    assert torch.equal(again[0], again[2]) and torch.equal(again[1], torch.from_numpy(got[2, :100]).float())


def test_the_device_draws_are_standard_normal_and_independent(interpreter):
    draws = interpreter(torch.tensor(derived_seeds([(0, i, STEP_STREAM, 0) for i in range(64)])), 4096).double()
    flat = draws.flatten()
    assert abs(flat.mean()) < 0.01 and abs(flat.var() - 1) < 0.01
    assert abs((flat**3).mean()) < 0.03 and abs((flat**4).mean() - 3) < 0.06
    # adjacent elements and rows of adjacent seeds uncorrelated (n = 262144: sd of a correlation ~0.002)
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([draws[:-1].flatten(), draws[1:].flatten()]))[0, 1]) < 0.01


def test_bad_seeds_are_refused(interpreter):
    with pytest.raises(TypeError, match="int64"):
        interpreter(torch.tensor([1.0]), 4)
