"""Segmentation of a plate: its inputs (real and virtual stains), diameters calibrated once per plate,
and shards of sites written as OME-Zarr labels with one table row per site and input."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from ..atomic import atomic_path, link_tree
from ..inference import resolve_device
from ..ingest import field_path, read_plane, read_store_layout
from ..io import well_row_column
from ..labels import label_name, write_field_labels
from ..layout import PlateSources
from ..plate import VIRTUAL_PREFIX, PlateSource, fluorescence_plane, open_plate_source
from .objects import OBJECTS
from .run import Segmenter, site_quality
from .settings import SegmentSettings
from .weights import load_cellpose_model

SITE_COLUMNS = ["well", "site", "source", "status", "reason", "objects", "nuclei_found", "cells_found",
                "cells_without_nucleus", "nuclei_without_cell", "border_objects", "seconds"]
SiteReader = Callable[[str, int], tuple[np.ndarray, np.ndarray]]


def plate_readers(source, virtual_store: str | Path, nuclei: str, cell: str) -> dict[str, SiteReader]:
    """(nuclei image, cell-body image) readers per input of a plate: `real` (illumination-corrected
    stains, when the plate has both channels) and `virtual` (its VS_ channels)."""
    readers: dict[str, SiteReader] = {}
    if source.has_channel(nuclei) and source.has_channel(cell):
        readers["real"] = lambda well, site: (fluorescence_plane(source, well, site, nuclei),
                                              fluorescence_plane(source, well, site, cell))
    layout = read_store_layout(virtual_store)
    names = [VIRTUAL_PREFIX + nuclei, VIRTUAL_PREFIX + cell]
    if all(n in layout.channels for n in names):
        indices = [layout.channels.index(n) for n in names]
        readers["virtual"] = lambda well, site: tuple(
            np.asarray(read_plane(virtual_store, well, site, i, 0), np.float32) for i in indices)
    return readers


@dataclass
class PlateSegmentation:
    """What a segmentation job of a plate works with (rules segment_calibrate and segment_shard)."""

    device: object  # torch.device
    settings: SegmentSettings
    source: PlateSource
    readers: dict[str, SiteReader]  # plate_readers
    models: tuple  # (nuclei, cells) Cellpose models


def open_plate_segmentation(sources: PlateSources, virtual_store: str | Path, params) -> PlateSegmentation:
    """The device (logged), the checked settings, the plate, its input readers and the two Cellpose
    models, from the segmentation rules' params (workflow/rules/common.smk SEGMENT_PARAMS: attributes
    brightfield, nuclei, cell, nuclei_weights, cell_weights, settings, device)."""
    device = resolve_device(params.device, what="segmentation")
    source = open_plate_source(sources, params.brightfield)
    return PlateSegmentation(device, SegmentSettings.from_config(params.settings), source,
                             plate_readers(source, virtual_store, params.nuclei, params.cell),
                             tuple(load_cellpose_model(path, device)
                                   for path in (params.nuclei_weights, params.cell_weights)))


def calibrate_plate(models: tuple, settings: SegmentSettings, readers: dict[str, SiteReader],
                    sites: Sequence[tuple[str, int]], seed: int = 0) -> dict[str, dict]:
    """Diameters per input of a plate, from up to `settings.diameter_sites` usable sample sites (or
    the configured ones): {source: {'nuclei_diameter', 'cell_diameter', 'sites'}}."""
    rng = np.random.default_rng(seed)
    chosen = [sites[i] for i in sorted(rng.permutation(len(sites))[:settings.diameter_sites])]
    result = {}
    for name, read in readers.items():
        sample = []
        for well, site in chosen:
            images = read(well, site)
            if not site_quality(images[0]) and not site_quality(images[1]):
                sample.append(images)
        segmenter = Segmenter(*models, settings).calibrate(sample)
        result[name] = {"nuclei_diameter": segmenter.nuclei_diameter,
                        "cell_diameter": segmenter.cell_diameter,
                        "sites": [f"{w}/{s}" for w, s in chosen], "sample_sites": len(sample)}
    return result


def _site_row(well, site, source, status, reason, counts=None, seconds=0.0) -> dict:
    counts = counts or {}
    return {"well": well, "site": int(site), "source": source, "status": status, "reason": reason,
            **{k: int(counts.get(k, 0)) for k in SITE_COLUMNS[5:-1]}, "seconds": seconds}


def segment_shard(segmenters: dict[str, Segmenter], readers: dict[str, SiteReader],
                  sites: Sequence[tuple[str, int]], virtual_store: str | Path, out: str | Path, *,
                  skip: dict[str, dict[tuple[str, int], str]] | None = None, sites_per_batch: int = 8
                  ) -> pd.DataFrame:
    """Segment `sites` with every input's Segmenter and write a shard labels store at `out` (field
    images hard-linked from `virtual_store`, labels added; see `labels`). Sites go through Cellpose
    `sites_per_batch` at a time. A site whose input is blank, saturated or listed in `skip[source]`
    (with the reason) gets empty labels and status `skipped`; a site where nothing is found gets status
    `no_objects`. Returns one row per site and input (SITE_COLUMNS)."""
    # at call time: ome_zarr takes ~0.6 s to import (see ingest.write_sites)
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_well_metadata

    skip = skip or {}
    rows = []
    by_well: dict[str, list[int]] = {}
    for well, site in sites:
        by_well.setdefault(well, []).append(int(site))
    with atomic_path(out) as partial:
        root = zarr.open_group(partial, mode="w", zarr_format=3)
        fields = {}
        for well, well_sites in sorted(by_well.items()):
            row, column = well_row_column(well)
            well_group = root.require_group(row).require_group(column)
            write_well_metadata(well_group, [{"path": field_path(s)} for s in sorted(well_sites)],
                                fmt=FormatV05())
            for site in sorted(well_sites):
                link_tree(Path(virtual_store) / row / column / field_path(site),
                          Path(partial) / row / column / field_path(site))
                fields[(well, site)] = zarr.open_group(str(Path(partial) / row / column / field_path(site)),
                                                       mode="r+")
        ordered = sorted(fields)
        for name, read in readers.items():
            segmenter = segmenters[name]
            for start in range(0, len(ordered), sites_per_batch):
                batch, images = [], []
                began = time.perf_counter()
                for well, site in ordered[start:start + sites_per_batch]:
                    empty = np.zeros(2, np.int32)
                    reason = skip.get(name, {}).get((well, site), "")
                    if not reason:
                        pair = read(well, site)
                        reason = "; ".join(f"{what}: {why}" for what, why in
                                           zip(("nuclei channel", "cell channel"), map(site_quality, pair),
                                               strict=True) if why)
                    if reason:
                        shape = read_shape(fields[(well, site)])
                        empty = np.zeros(shape, np.uint32)
                        write_field_labels(fields[(well, site)],
                                           {label_name(o, name): empty for o in OBJECTS})
                        rows.append(_site_row(well, site, name, "skipped", reason))
                        continue
                    batch.append((well, site))
                    images.append(pair)
                results = segmenter.segment(images)
                seconds = (time.perf_counter() - began) / max(len(batch), 1)
                for (well, site), objects in zip(batch, results, strict=True):
                    write_field_labels(fields[(well, site)], {
                        label_name("nuclei", name): objects.nuclei, label_name("cells", name): objects.cells,
                        label_name("cytoplasm", name): objects.cytoplasm})
                    status = "ok" if objects.counts["objects"] else "no_objects"
                    reason = "" if objects.counts["objects"] else "no cell with a nucleus found"
                    rows.append(_site_row(well, site, name, status, reason, objects.counts, seconds))
    return pd.DataFrame(rows, columns=SITE_COLUMNS).sort_values(["source", "well", "site"],
                                                                ignore_index=True)


def read_shape(field: zarr.Group) -> tuple[int, int]:
    return tuple(field["0"].shape[-2:])


def unusable_sites(stain_sites: pd.DataFrame) -> dict[str, dict[tuple[str, int], str]]:
    """Sites virtual staining skipped (their virtual channels are zeros), with its reason, to be
    skipped by segmentation of the virtual input."""
    bad = stain_sites[stain_sites["status"] != "ok"]
    return {"virtual": {(w, int(s)): f"no virtual stains: {r}"
                        for w, s, r in zip(bad["well"], bad["site"], bad["reason"], strict=True)}}
