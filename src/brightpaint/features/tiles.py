"""Several sites laid side by side as one image set (CellProfiler's cost is mostly per image set
and measurement column, not per pixel), and the cells measured on such tiles back to their sites."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .schema import OBJECT_KEY, SITE_KEYS, FeatureError, SiteKey

# CellProfiler's cost per image set is mostly per measurement column (each goes through its HDF5
# measurement store, ~1.6 ms a call, ~4,400 calls per site), so small sites are tiled into image
# sets of up to this many pixels for the per-object modules that allow it.
TILE_PIXELS = 2048 * 2048
TILE_GAP = 8  # px of background between tiled sites
SiteInputs = tuple[SiteKey, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


def top_label(labels: Mapping[str, np.ndarray]) -> int:
    """The largest label value of a site's label images (0 without objects)."""
    return max((int(np.max(label)) for label in labels.values() if np.size(label)), default=0)


def tile_area(images: Mapping[str, np.ndarray], gap: int = TILE_GAP) -> int:
    """The pixels a site takes in a tile, its gap included."""
    height, width = np.shape(next(iter(images.values())))
    return (height + gap) * (width + gap)


def tile_sites(sites: Sequence[SiteInputs], gap: int = TILE_GAP
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], pd.DataFrame]:
    """Lay sites ((key, images, labels) as `extract_features` reads them) side by side in a
    near-square grid, row by row, `gap` px of background between them, as one set of images and
    label images. A site's label values are shifted by the largest label of the sites before it
    (the same shift in every compartment, so nucleus, cell and cytoplasm k stay one cell).
    Returns (images, labels, placements): placements has one row per site, SITE_KEYS then `y0`,
    `x0` (its top-left corner in the tile), `offset` (the shift) and `top` (its largest label)."""
    if not sites:
        raise ValueError("no sites to tile")
    columns = int(np.ceil(np.sqrt(len(sites))))
    cell_h = max(np.asarray(next(iter(images.values()))).shape[0] for _, images, _ in sites) + gap
    cell_w = max(np.asarray(next(iter(images.values()))).shape[1] for _, images, _ in sites) + gap
    rows = -(-len(sites) // columns)
    shape = (rows * cell_h - gap, columns * cell_w - gap)
    channels, objects = list(sites[0][1]), list(sites[0][2])
    tiled_images = {c: np.zeros(shape, np.float32) for c in channels}
    tiled_labels = {o: np.zeros(shape, np.int64) for o in objects}
    placements, offset = [], 0
    for i, (key, images, labels) in enumerate(sites):
        y0, x0 = (i // columns) * cell_h, (i % columns) * cell_w
        top = top_label(labels)
        for name in channels:
            image = np.asarray(images[name])
            tiled_images[name][y0:y0 + image.shape[0], x0:x0 + image.shape[1]] = image
        for name in objects:
            label = np.asarray(labels[name]).astype(np.int64)
            tiled_labels[name][y0:y0 + label.shape[0], x0:x0 + label.shape[1]] = np.where(
                label > 0, label + offset, 0)
        placements.append(dict(zip(SITE_KEYS, key, strict=True), y0=y0, x0=x0, offset=offset, top=top))
        offset += top
    return tiled_images, tiled_labels, pd.DataFrame(placements)


_TILED_POSITION = re.compile(
    r"^Metadata_\w+_AreaShape_(Center|BoundingBoxMinimum|BoundingBoxMaximum)_([XY])$")


def untile_cells(cells: pd.DataFrame, placements: pd.DataFrame) -> pd.DataFrame:
    """Per-cell rows measured on tiles (`read_object_tables` of a tiled run, `Metadata_Site` = the
    tile number) back to their sites: site keys, label values and positions relative to the site.
    `placements` is `tile_sites`' table with a `tile` column."""
    out = cells.copy()
    for key in SITE_KEYS:
        out[key] = out[key].astype(object)
    placed = np.zeros(len(out), bool)
    positions = {c: _TILED_POSITION.match(c).group(2) for c in out.columns if _TILED_POSITION.match(c)}
    tiles, labels = out["Metadata_Site"].to_numpy(int), out[OBJECT_KEY].to_numpy(np.int64)
    for row in placements.itertuples(index=False):
        rows = (tiles == row.tile) & (labels > row.offset) & (labels <= row.offset + row.top)
        if not rows.any():
            continue
        placed |= rows
        for key in SITE_KEYS:
            out.loc[rows, key] = getattr(row, key)
        out.loc[rows, OBJECT_KEY] = labels[rows] - row.offset
        for column, axis in positions.items():
            out.loc[rows, column] = out.loc[rows, column] - (row.x0 if axis == "X" else row.y0)
    if not placed.all():
        raise FeatureError(f"{int((~placed).sum())} objects measured on tiles belong to no tiled site")
    out["Metadata_Site"] = out["Metadata_Site"].astype(int)
    out[OBJECT_KEY] = out[OBJECT_KEY].astype(np.int64)
    return out.sort_values([*SITE_KEYS, OBJECT_KEY], kind="stable").reset_index(drop=True)


def join_parts(site_cells: pd.DataFrame, tiled_cells: pd.DataFrame) -> pd.DataFrame:
    """The per-cell tables of the site-by-site and the tiled run as one: joined on site and label
    value, metadata columns first. The two pipelines must not measure the same feature."""
    keys = [*SITE_KEYS, OBJECT_KEY]
    shared = (set(site_cells.columns) & set(tiled_cells.columns)) - set(keys)
    if shared:
        raise FeatureError(f"the site and the tiled pipeline both measure {sorted(shared)[:5]} "
                           f"({len(shared)} columns): with a whole pipeline of your own as "
                           "features.pipeline, set features.tiled_pipeline to ''")
    cells = tiled_cells.merge(site_cells, on=keys, how="outer")
    metadata = [c for c in cells.columns if c.startswith("Metadata_") and c not in keys]
    rest = [c for c in cells.columns if not c.startswith("Metadata_")]
    return (cells[[*keys, *metadata, *rest]].sort_values(keys, kind="stable")
            .reset_index(drop=True))
