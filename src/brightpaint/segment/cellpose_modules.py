"""Cellpose's modules, imported with its numba kernels cached on disk.

`cellpose.dynamics` (imported by `cellpose.models`, `.metrics`, `.core` and `.train`) compiles its
numba kernels with explicit signatures the moment it is imported, three of them without numba's
cache: ~7 CPU-s in every process that imports it (a demo shard's networks take ~40 s), paid again
by every segmentation, calibration and evaluation job. Imported here, the kernels are compiled
with `cache=True`: numba writes the machine code beside Cellpose's module (or, where that folder is
read-only, in its user-wide cache) once per machine kind and Cellpose version, and later processes
load it (~7 s less per process). The code numba compiles is the same, so are the masks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from types import ModuleType

# The Cellpose modules that define numba kernels (metrics: a lazily compiled one).
KERNEL_MODULES = ("cellpose.dynamics", "cellpose.metrics")


@contextlib.contextmanager
def _numba_cache():
    """numba's jit decorators with `cache=True` while Cellpose's modules are imported (they call
    `numba.njit` / `numba.jit` as they are defined)."""
    import numba  # inside: only Cellpose's import needs it

    njit, jit = numba.njit, numba.jit
    numba.njit, numba.jit = functools.partial(njit, cache=True), functools.partial(jit, cache=True)
    try:
        yield
    finally:
        numba.njit, numba.jit = njit, jit


def import_cellpose(name: str) -> ModuleType:
    """The Cellpose module `name` (e.g. "cellpose.models"), its numba kernels loaded from numba's
    cache when this process imports them first."""
    if not all(module in sys.modules for module in KERNEL_MODULES):
        try:
            with _numba_cache():
                for module in KERNEL_MODULES:
                    importlib.import_module(module)
        except RuntimeError:
            pass  # numba found no writable cache folder: the import below compiles them as before
    return importlib.import_module(name)
