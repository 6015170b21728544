"""Random event streams for the data tests."""

import numpy as np

from evclip_jax.events.io import EVENT_DTYPE


def random_events(rng: np.random.Generator, n: int, sensor: tuple[int, int]) -> np.ndarray:
    """``n`` events uniformly over a (H, W) sensor, sorted timestamps below 2^20 us."""
    ev = np.zeros(n, EVENT_DTYPE)
    ev["x"] = rng.integers(0, sensor[1], n)
    ev["y"] = rng.integers(0, sensor[0], n)
    ev["t"] = np.sort(rng.integers(0, 1 << 20, n))
    ev["p"] = rng.integers(0, 2, n)
    return ev
