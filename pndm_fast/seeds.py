"""Seeds derived from a tuple of integers, so each random draw depends on what it is for and nothing else.

`derived_seeds` is numpy's SeedSequence (the hash of O'Neill's seed_seq) written over arrays: thousands of seeds,
one per (image, draw) of a stochastic run, cost one vectorised hash instead of one SeedSequence object each, bit
for bit the same (tests/test_seeds.py checks it against numpy's own).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

POOL_SIZE = 4
INIT_A, MULT_A = 0x43B0D7E5, 0x931E8875
INIT_B, MULT_B = 0x8B51F9DD, 0x58F38DED
MIX_MULT_L, MIX_MULT_R = 0xCA01F9DD, 0x4973F715
XSHIFT = 16


def derived_seed(*words: int) -> int:
    """A 63-bit seed that depends on `words` only (e.g. (seed, image index)), well mixed by SeedSequence."""
    return derived_seeds([words])[0]


def derived_seeds(rows: Sequence[Sequence[int]]) -> list[int]:
    """[derived_seed(*row) for row in rows], hashed as arrays: rows whose words split into the same number of
    32-bit words (almost always all of them) are hashed together."""
    entropies = [_uint32_words(row) for row in rows]
    seeds = [0] * len(rows)
    for length in {len(e) for e in entropies}:
        positions = [i for i, e in enumerate(entropies) if len(e) == length]
        block = np.array([entropies[i] for i in positions], dtype=np.uint32)
        for i, seed in zip(positions, _hash(block).tolist()):
            seeds[i] = seed
    return seeds


def _uint32_words(row: Sequence[int]) -> list[int]:
    """SeedSequence's entropy: each integer as its little-endian 32-bit words (0 as one word)."""
    words = []
    for value in row:
        if value < 0:
            raise ValueError(f"seed words must be >= 0, got {value}")
        words.append(value & 0xFFFFFFFF)
        value >>= 32
        while value:
            words.append(value & 0xFFFFFFFF)
            value >>= 32
    return words


def _hash(entropy: np.ndarray) -> np.ndarray:
    """(rows, words) uint32 entropy -> (rows,) 63-bit seeds: SeedSequence's mix_entropy, then generate_state(1,
    uint64) shifted right by one."""
    rows, length = entropy.shape
    hash_const = np.full(rows, INIT_A, dtype=np.uint32)

    def hashmix(value):
        nonlocal hash_const
        value = value ^ hash_const
        hash_const = hash_const * np.uint32(MULT_A)
        value = value * hash_const
        return value ^ (value >> np.uint32(XSHIFT))

    def mix(x, y):
        result = np.uint32(MIX_MULT_L) * x - np.uint32(MIX_MULT_R) * y
        return result ^ (result >> np.uint32(XSHIFT))

    zero = np.zeros(rows, dtype=np.uint32)
    pool = [hashmix(entropy[:, i] if i < length else zero) for i in range(POOL_SIZE)]
    for src in range(POOL_SIZE):
        for dst in range(POOL_SIZE):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(POOL_SIZE, length):
        for dst in range(POOL_SIZE):
            pool[dst] = mix(pool[dst], hashmix(entropy[:, src]))
    # generate_state(1, uint64): two uint32 words from the pool's first two entries, low word first
    out_const = np.full(rows, INIT_B, dtype=np.uint32)
    state = []
    for word in pool[:2]:
        value = word ^ out_const
        out_const = out_const * np.uint32(MULT_B)
        value = value * out_const
        state.append(value ^ (value >> np.uint32(XSHIFT)))
    seed64 = state[0].astype(np.uint64) | (state[1].astype(np.uint64) << np.uint64(32))
    return seed64 >> np.uint64(1)
