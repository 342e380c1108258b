"""Seeds derived from a tuple of integers, so each random draw depends on what it is for and nothing else."""

import numpy as np


def derived_seed(*words: int) -> int:
    """A 63-bit seed that depends on `words` only (e.g. (seed, image index)), well mixed by SeedSequence."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> np.uint64(1))
