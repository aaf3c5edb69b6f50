"""Plate access, as every stage after ingest reads a plate: its stores (images.zarr and, where
Noise2Void ran, denoised.zarr), layout, focus table and illumination functions (`PlateSource`,
`open_plate_source`, from the paths a `brightpaint.layout.PlateSources` names); a site's
illumination-corrected brightfield window around focus (`brightfield_planes`) and fluorescence
channel (`fluorescence_plane`); robust intensity scales per field or per plate (`robust_scale`,
`plate_scales`); a seeded subsample of sites (`sample_items`).

Virtual channels in a plate's virtual.zarr are named VS_<channel> (`VIRTUAL_PREFIX`) and their
uncertainty maps SD_<channel> (`UNCERTAINTY_PREFIX`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .focus import focus_window
from .illumination import IlluminationFunction, correct_illumination, load_illumination
from .ingest import StoreLayout, channel_plane, read_plane, read_store_layout, stored_sites
from .layout import PlateSources

VIRTUAL_PREFIX = "VS_"
UNCERTAINTY_PREFIX = "SD_"  # per-pixel spread of the test-time augmented predictions
SPREAD_QUANTILE = 0.995
MIN_SPREAD = 1e-6


class PlateError(UserError):
    """A plate's images cannot be read as asked: names the plate / well / site / channel and what is
    wrong (no in-focus plane, a missing channel or illumination function, NaN pixels)."""


@dataclass
class PlateSource:
    """A plate as the stages read it: its store, layout, focus table, illumination functions
    (brightfield and the fluorescence channels it reads) and, optionally, a denoised store whose
    channels replace the corrected raw ones."""

    plate: str
    store: Path
    layout: StoreLayout
    focus: pd.DataFrame
    brightfield: str
    illumination: dict[str, IlluminationFunction]
    denoised: Path | None = None
    denoised_layout: StoreLayout | None = None
    platemap: pd.DataFrame | None = None

    def has_channel(self, channel: str) -> bool:
        return channel in self.layout.channels

    def focus_plane(self, well: str, site: int) -> int:
        """The chosen brightfield z of a site, or a PlateError if focus found none."""
        rows = self.focus[(self.focus["well"] == well) & (self.focus["site"] == site)]
        if rows.empty:
            raise PlateError(f"plate {self.plate} well {well} site {site}: not in the focus table")
        plane = int(rows["plane"].iloc[0])
        if plane < 0:
            raise PlateError(f"plate {self.plate} well {well} site {site}: no in-focus brightfield "
                             f"plane ({rows['reason'].iloc[0]})")
        return plane

    def usable_sites(self, wells: Sequence[str] | None = None) -> list[tuple[str, int]]:
        """Sites of the store (in `wells`) with an in-focus plane and no out-of-focus flag."""
        ok = self.focus[(self.focus["plane"] >= 0)
                        & ~self.focus["flag"].astype(str).str.contains("out_of_focus")]
        good = set(zip(ok["well"], ok["site"].astype(int), strict=True))
        return [s for s in stored_sites(self.store, wells) if s in good]


def open_plate_source(sources: PlateSources, brightfield: str, *, platemap: pd.DataFrame | None = None,
                      use_denoised: bool = True) -> PlateSource:
    """A plate's sources as a PlateSource: the paths come from the caller (a workflow script's
    named inputs, `PlateSources.from_input`; or `PlateFolder.sources_on_disk` for a finished
    folder), so what is opened is exactly what the job lists. Illumination functions are those of
    the layout's channels among `sources.illumination`; the denoised store is used when given and
    wanted."""
    layout = StoreLayout.from_json(Path(sources.layout).read_text())
    illumination = {c: load_illumination(sources.illumination[c]) for c in layout.channels
                    if c in sources.illumination}
    if brightfield not in illumination:
        raise PlateError(f"plate {layout.plate}: no illumination function for brightfield {brightfield!r} "
                         f"among {sorted(sources.illumination.values()) or 'none given'}")
    denoised = Path(sources.denoised) if use_denoised and sources.denoised else None
    return PlateSource(plate=layout.plate, store=Path(sources.store), layout=layout,
                       focus=pd.read_parquet(sources.focus), brightfield=brightfield,
                       illumination=illumination, denoised=denoised,
                       denoised_layout=read_store_layout(denoised) if denoised else None, platemap=platemap)


def brightfield_planes(source: PlateSource, well: str, site: int, half_width: int) -> np.ndarray:
    """(2 * half_width + 1, Y, X) float32: the in-focus plane and its neighbours (edge planes
    repeated), illumination-corrected."""
    layout, channel = source.layout, source.brightfield
    if channel not in layout.channels:
        raise PlateError(f"plate {source.plate}: no brightfield channel {channel!r} "
                         f"(channels: {layout.channels})")
    planes = layout.planes[channel]
    focus = source.focus_plane(well, site)
    window = [planes[i] for i in focus_window(planes.index(focus), len(planes), half_width)]
    index = layout.channels.index(channel)
    function = source.illumination[channel]
    stack = np.stack([correct_illumination(read_plane(source.store, well, site, index, z), function)
                      for z in window])
    if not np.isfinite(stack).all():
        raise PlateError(f"plate {source.plate} well {well} site {site}: brightfield has NaN or "
                         "infinite pixels")
    return stack


def fluorescence_plane(source: PlateSource, well: str, site: int, channel: str) -> np.ndarray:
    """A fluorescence channel of a site, illumination-corrected (from the denoised store when the
    plate has one for this channel: its values are already corrected)."""
    if source.denoised is not None and channel in source.denoised_layout.channels:
        return np.asarray(read_plane(source.denoised, well, site,
                                     *channel_plane(source.denoised_layout, channel)), np.float32)
    if channel not in source.layout.channels:
        raise PlateError(f"plate {source.plate}: no channel {channel!r} (channels: "
                         f"{source.layout.channels})")
    if channel not in source.illumination:  # its function was not among the paths plate access got
        raise PlateError(f"plate {source.plate}: no illumination function for channel {channel!r} "
                         f"(given: {sorted(source.illumination)})")
    return correct_illumination(read_plane(source.store, well, site, *channel_plane(source.layout, channel)),
                                source.illumination[channel])


def robust_scale(values: np.ndarray, how: str) -> tuple[float, float]:
    """(median, spread) of intensities: spread = q99.5 - median for `plate`, IQR for `fov`."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if how == "fov":
        q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
        spread = q75 - q25
    else:
        median, high = np.quantile(values, [0.5, SPREAD_QUANTILE])
        spread = high - median
    return float(median), float(max(spread, MIN_SPREAD))


def plate_scales(source: PlateSource, sites: Sequence[tuple[str, int]], channels: Sequence[str],
                 how: str = "plate") -> dict[str, tuple[float, float]]:
    """Per channel the plate's (median, spread): for `plate`, of the pooled pixels of `sites` (a
    bounded subsample of each, so memory does not grow with the number of sites); for `fov`, the
    median over `sites` of each field's own (median, IQR), i.e. a typical field's scale."""
    rng = np.random.default_rng(0)
    scales = {}
    for channel in channels:
        if not source.has_channel(channel):
            continue
        planes = (fluorescence_plane(source, w, s, channel).ravel() for w, s in sites)
        if how == "fov":
            pairs = np.array([robust_scale(p, "fov") for p in planes])
            scales[channel] = (float(np.median(pairs[:, 0])), float(np.median(pairs[:, 1])))
        else:
            pooled = np.concatenate([rng.choice(p, min(p.size, 16384), replace=False) for p in planes])
            scales[channel] = robust_scale(pooled, "plate")
    return scales


def sample_items(rng: np.random.Generator, items: list, limit: int) -> list:
    """At most `limit` of `items`, drawn without replacement by `rng`, in their original order (all
    of them, and no draw from `rng`, when there are no more than `limit`)."""
    if len(items) <= limit:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), limit, replace=False))]
