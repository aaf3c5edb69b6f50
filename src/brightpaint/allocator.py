"""glibc's allocator settings for the workflow's jobs and CellProfiler's runs (GLIBC_TUNABLES).

The stages allocate and free arrays of a whole site, or of a network's activations, time and again
(37 MB of float64 per 2160 px image). By default glibc serves each with a fresh mmap, which the
kernel zero-fills page by page and unmaps again on free. ALLOCATOR_TUNABLES keep such arrays in the
heap up to 32 MB (glibc's largest threshold), do not hand freed memory back to the kernel at every
free, and ask for transparent huge pages where the kernel allows them (`madvise`). Measured on the
2-vCPU development machine (docs/performance.md): CellProfiler on one 2160 px site 95 -> 71 CPU-s
(1.62 million page faults -> 0.14 million, peak RSS +5 %), a 1080 px site 18.5 either way; the
virtual-staining network on a 2160 px site 17.2 -> 13.9 CPU-s. Tunables a glibc does not know are
ignored, and other C libraries ignore the variable.
"""

from __future__ import annotations

import os

ALLOCATOR_TUNABLES = {"glibc.malloc.hugetlb": "1", "glibc.malloc.mmap_threshold": str(32 * 2**20),
                      "glibc.malloc.trim_threshold": str(2**30), "glibc.malloc.top_pad": str(64 * 2**20)}


def allocator_tunables(current: str = "") -> str:
    """A GLIBC_TUNABLES value: `current` (the environment's own) followed by every ALLOCATOR_TUNABLES
    entry it does not set itself (the user's value wins)."""
    own = [item for item in current.split(":") if item]
    named = {item.split("=", 1)[0] for item in own}
    return ":".join(own + [f"{name}={value}" for name, value in ALLOCATOR_TUNABLES.items()
                           if name not in named])


def use_allocator_tunables() -> str:
    """Put the allocator tunables into this process's GLIBC_TUNABLES, for the processes it starts
    (glibc reads the variable when a process starts: this process keeps its own allocator)."""
    os.environ["GLIBC_TUNABLES"] = allocator_tunables(os.environ.get("GLIBC_TUNABLES", ""))
    return os.environ["GLIBC_TUNABLES"]
