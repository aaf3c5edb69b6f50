"""Stores derived from a plate's images.zarr (denoised channels, later virtual stains): the same
HCS layout, float32, one plane per channel, written per shard with `ingest.write_sites` and
assembled with `ingest.assemble_plate_store`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .ingest import StoreLayout, read_field, write_sites


def derived_layout(layout: StoreLayout, channels: list[str]) -> StoreLayout:
    """Layout of a store holding `channels` of `layout`'s plate as float32 single planes."""
    missing = [c for c in channels if c not in layout.channels]
    if missing:
        raise ValueError(f"plate {layout.plate} has no channel(s) {missing}; it has {layout.channels}")
    return StoreLayout(plate=layout.plate, channels=list(channels), planes={c: [0] for c in channels},
                       n_z=1, shape=layout.shape, dtype="float32",
                       source_dtypes={c: layout.source_dtypes[c] for c in channels},
                       roles={c: r for c, r in layout.roles.items() if c in channels})


def write_derived_store(source: str | Path, layout: StoreLayout, sites: list[tuple[str, int]],
                        channels: list[str], transform: Callable[[str, np.ndarray], np.ndarray],
                        out: str | Path, threads: int = 1) -> pd.DataFrame:
    """For every site, read each channel's plane from the source store, apply `transform(channel,
    plane)` and write the result to a shard store at `out`. Returns one row per (site, channel)
    with the output's min, max and mean."""
    target = derived_layout(layout, channels)

    def fill(array, well, site):
        field = read_field(source, well, site)
        rows, ranges = [], {}
        for index, channel in enumerate(channels):
            plane = field[0, layout.channels.index(channel), layout.planes[channel][0]]
            result = np.asarray(transform(channel, plane), dtype=np.float32)
            array[0, index, 0] = result
            low, high = float(result.min()), float(result.max())
            ranges[channel] = (low, high)
            rows.append({"well": well, "site": int(site), "channel": channel, "min": low, "max": high,
                         "mean": float(result.mean())})
        return rows, ranges

    return pd.DataFrame(write_sites(out, sites, target, fill, threads))
