"""Random generators keyed by names, so every draw of the demo screen is reproducible and
independent of the number of worker processes."""

from __future__ import annotations

import hashlib
from numbers import Integral

import numpy as np


def seed_entropy(*parts) -> list[int]:
    """Stable 32-bit integers for SeedSequence entropy (str hash() is salted per process)."""
    out = []
    for part in parts:
        if isinstance(part, Integral):
            out.append(int(part))
        else:
            out.append(int.from_bytes(hashlib.sha256(str(part).encode()).digest()[:4], "little"))
    return out


def keyed_rng(seed: int, *parts) -> np.random.Generator:
    """A generator seeded by (seed, *parts), e.g. (seed, 'well', plate, well)."""
    return np.random.default_rng(np.random.SeedSequence(seed_entropy(seed, *parts)))
