"""Features of a batch of sites, and the workflow's side of it: which of a plate's sites to
measure, and readers of a plate's real and virtual stains and label images."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..ingest import read_plane, read_store_layout
from ..labels import label_name
from ..labels import read_labels as read_label_image
from ..plate import VIRTUAL_PREFIX, PlateSource, fluorescence_plane
from .pipelines import PIPELINE, pipeline_names
from .runner import CELLPROFILER, run_cellprofiler, write_loaddata, write_site_inputs
from .schema import ADU_MAX, OBJECT_KEY, OBJECTS, SITE_KEYS, SiteKey, site_where
from .tables import read_object_tables, write_concatenated
from .tiles import TILE_PIXELS, join_parts, tile_area, tile_sites, top_label, untile_cells

# pixels per CellProfiler run in write_features: a job's memory grows with its batch (CellProfiler's
# buffered measurements; a full batch of 64 1080 px site images of ~300 cells peaked at 1.23 GB), not
# with its shard, and CellProfiler's start is paid once per batch (docs/performance.md)
BATCH_MEGAPIXELS = 75.0  # 64 site images of 1080 px, 16 of 2160 px (real and virtual stains: two)
QC_COLUMNS = ["plate", "well", "site", "source", "status", "reason", "cells"]


def _qc(plate, well, site, source, status: str, reason: str, cells: int = 0) -> dict:
    return dict(zip(QC_COLUMNS, [str(plate), str(well), int(site), str(source), status, reason,
                                 int(cells)], strict=True))


def extract_features(sites: Iterable[tuple[str, str, int, str]],
                     read_images: Callable[[str, str, int, str], Mapping[str, np.ndarray]],
                     read_labels: Callable[[str, str, int, str], Mapping[str, np.ndarray]],
                     pipeline: str | Path = PIPELINE, work_dir: str | Path | None = None, *,
                     tiled_pipeline: str | Path | None = None, tile_pixels: int = TILE_PIXELS,
                     cellprofiler: str | Path = CELLPROFILER, threads: int = 1,
                     log: str | Path | None = None, timeout: float | None = None,
                     append_log: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Features of a batch of sites with one CellProfiler run (two with a tiled pipeline): returns
    (cells, images, qc).

    `sites` are (plate, well, site, source) tuples; `read_images(plate, well, site, source)` gives
    {channel: 2-D ADU array} and `read_labels(...)` {objects: 2-D int label image}, with the
    pipelines' channel and object names (extra entries are ignored). A site whose inputs cannot be
    read or used is skipped (qc status `skipped`, with the reason); a site whose label images hold
    no object is measured (its image features are kept) but yields no cells (status `no_objects`);
    every other site has status `ok` and its number of cells. qc has one row per listed site:
    plate, well, site, source, status, reason, cells.

    `pipeline` runs site by site. A `tiled_pipeline` (e.g. SITE_PIPELINE with TILED_PIPELINE, the
    two halves of PIPELINE) runs on tiles of up to `tile_pixels` pixels holding several sites side
    by side (`tile_sites`; a larger site is a tile of its own): CellProfiler's per-image-set cost
    is then paid once per tile. Its per-cell results are mapped back to the sites and joined to
    the site-by-site ones. Only modules whose per-object results depend on the object's own pixels
    alone belong in a tiled pipeline; tests/test_features.py checks the shipped halves against the
    whole pipeline. With CellProfiler 5's buffered measurement store, tiling no longer pays on the
    sites measured (bench/feature_tiling.py: 1.1-1.4x the whole pipeline's CPU from 256 to 1080
    px sites), so the workflow runs the whole pipeline unless asked. Inputs and outputs go into
    `work_dir` (a new temporary folder if None); removing it is the caller's business.
    CellProfiler failing on the batch raises FeatureError. CellProfiler's output goes to `log`
    (added to its end with `append_log`)."""
    channels, objects = pipeline_names(pipeline)
    if tiled_pipeline is not None:
        tiled_channels, tiled_objects = pipeline_names(tiled_pipeline)
        channels += [c for c in tiled_channels if c not in channels]
        objects += [o for o in tiled_objects if o not in objects]
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="features-"))
    inputs, out_dir = work / "inputs", work / "cellprofiler"
    rows, qc, seen, empty = [], [], set(), set()
    tile_rows, placements, pending = [], [], []
    in_tile = {"area": 0, "top": 0}  # pixels and label values the pending tile holds

    def write_tile() -> None:
        tile = len(tile_rows) + 1
        images, labels, placed = tile_sites(pending)
        tile_rows.append(write_site_inputs(work / "tiles", "", f"tile{tile}", tile, images, labels,
                                           source="tile"))
        placements.append(placed.assign(tile=tile))
        pending.clear()
        in_tile.update(area=0, top=0)

    for plate, well, site, source in sites:
        key = (str(plate), str(well), int(site), str(source))
        where = site_where(*key)
        if key in seen:
            qc.append(_qc(*key, "skipped", f"{where}: listed twice"))
            continue
        seen.add(key)
        try:
            images, labels = read_images(*key), read_labels(*key)
            missing = ([f"channel {c!r}" for c in channels if c not in images]
                       + [f"objects {o!r}" for o in objects if o not in labels])
            if missing:
                raise ValueError(f"{where}: no {', '.join(missing)}")
            images, labels = {c: images[c] for c in channels}, {o: labels[o] for o in objects}
            row = write_site_inputs(inputs, *key[:3], images, labels, source=key[3])
        except Exception as error:  # noqa: BLE001 -- any unreadable site is reported, not fatal
            reason = str(error) if where in str(error) else f"{where}: {type(error).__name__}: {error}"
            qc.append(_qc(*key, "skipped", reason))
            continue
        if objects and all(not np.any(np.asarray(labels[o])) for o in objects):
            empty.add(key)
        rows.append(row)
        if tiled_pipeline is not None:
            area, top = tile_area(images), top_label(labels)
            if pending and (in_tile["area"] + area > tile_pixels or in_tile["top"] + top > ADU_MAX):
                write_tile()
            pending.append((key, images, labels))
            in_tile["area"] += area
            in_tile["top"] += top
    if pending:
        write_tile()
    if not rows:
        return (pd.DataFrame(columns=[*SITE_KEYS, OBJECT_KEY]), pd.DataFrame(columns=SITE_KEYS),
                pd.DataFrame(qc, columns=QC_COLUMNS))
    log = log if log is not None else work / "cellprofiler.log"
    loaddata = write_loaddata(rows, inputs / "loaddata.csv")
    run_cellprofiler(pipeline, loaddata, out_dir, cellprofiler=cellprofiler, threads=threads,
                     log=log, timeout=timeout, append_log=append_log)
    cells, images = read_object_tables(out_dir, loaddata, objects)
    if tiled_pipeline is not None:
        tiled_loaddata = write_loaddata(tile_rows, work / "tiles" / "loaddata.csv")
        run_cellprofiler(tiled_pipeline, tiled_loaddata, work / "cellprofiler-tiled",
                         cellprofiler=cellprofiler, threads=threads, log=log, timeout=timeout,
                         append_log=True)
        tiled, _ = read_object_tables(work / "cellprofiler-tiled", tiled_loaddata, objects)
        cells = join_parts(cells, untile_cells(tiled, pd.concat(placements, ignore_index=True)))
    counts = cells.groupby(SITE_KEYS).size().to_dict() if len(cells) else {}
    for row in rows:
        key = tuple(row[k] for k in SITE_KEYS)
        n = int(counts.get(key, 0))
        if n == 0:
            why = "label images hold no objects" if key in empty else "CellProfiler found no objects"
            qc.append(_qc(*key, "no_objects", f"{site_where(*key)}: {why}"))
        else:
            qc.append(_qc(*key, "ok", "", n))
    qc = pd.DataFrame(qc, columns=QC_COLUMNS).sort_values(QC_COLUMNS[:4], kind="stable")
    return cells, images, qc.reset_index(drop=True)


def batch_sites(site_shape: Sequence[int], batch_megapixels: float = BATCH_MEGAPIXELS) -> int:
    """Sites of `site_shape` (height, width) per CellProfiler run: as many as `batch_megapixels`
    hold, at least one. Bounding the batch by pixels, not sites, keeps a job's memory the same for
    small and large sites (cells per site grow with its pixels at one magnification)."""
    if batch_megapixels <= 0:
        raise ValueError(f"batch_megapixels: must be > 0, got {batch_megapixels!r}")
    return max(1, int(batch_megapixels * 1e6 // (int(site_shape[0]) * int(site_shape[1]))))


SITES_PER_BATCH = batch_sites((1080, 1080))


def site_batches(sites: Iterable[SiteKey], sites_per_batch: int) -> list[list[SiteKey]]:
    """`sites` sorted by plate, well, site and source (the feature tables' row order) and cut into
    batches of whole wells of up to `sites_per_batch` sites (a larger well is a batch of its own), so
    a well's cells stay one run of rows and a site listed twice stays in one batch."""
    if sites_per_batch < 1:
        raise ValueError(f"sites_per_batch: must be >= 1, got {sites_per_batch!r}")
    ordered = sorted(sites, key=lambda key: (str(key[0]), str(key[1]), int(key[2]), str(key[3])))
    batches, batch = [], []
    for _, well in itertools.groupby(ordered, key=lambda key: (str(key[0]), str(key[1]))):
        well = list(well)
        if batch and len(batch) + len(well) > sites_per_batch:
            batches.append(batch)
            batch = []
        batch += well
    return batches + ([batch] if batch else [])


def write_features(sites: Iterable[SiteKey], read_images: Callable[..., Mapping[str, np.ndarray]],
                   read_labels: Callable[..., Mapping[str, np.ndarray]], cells_path: str | Path,
                   images_path: str | Path, pipeline: str | Path = PIPELINE,
                   work_dir: str | Path | None = None, *, sites_per_batch: int = SITES_PER_BATCH,
                   log: str | Path | None = None, **options) -> pd.DataFrame:
    """`extract_features` on any number of sites in bounded memory and disk: the sites are measured
    in batches (`site_batches`), one CellProfiler run (two with a tiled pipeline) per batch; each
    batch's cell and image tables go to parquet and its inputs are removed, then the batches are
    streamed into `cells_path` and `images_path` (`write_concatenated`: one batch in memory). The
    tables are those one `extract_features` call on all sites gives. Returns the qc of every site.
    `options` are extract_features' (tiled_pipeline, tile_pixels, cellprofiler, threads, timeout);
    every batch's CellProfiler output goes to the end of `log`."""
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="features-"))
    parts, qcs = {"cells": [], "images": []}, []
    for number, batch in enumerate(site_batches(sites, sites_per_batch)):
        batch_dir = work / f"batch{number}"
        cells, images, qc = extract_features(batch, read_images, read_labels, pipeline, batch_dir,
                                             log=log if log is not None else work / "cellprofiler.log",
                                             append_log=number > 0, **options)
        for name, table in (("cells", cells), ("images", images)):
            parts[name].append(work / f"{name}{number}.parquet")
            table.to_parquet(parts[name][-1], index=False)
        qcs.append(qc)
        del cells, images
        shutil.rmtree(batch_dir)
    for name, path in (("cells", cells_path), ("images", images_path)):
        if parts[name]:
            write_concatenated(parts[name], path)
        else:  # no site listed: the tables extract_features gives for no site
            keys = [*SITE_KEYS, OBJECT_KEY] if name == "cells" else SITE_KEYS
            pd.DataFrame(columns=keys).to_parquet(path, index=False)
    qc = pd.concat(qcs, ignore_index=True) if qcs else pd.DataFrame(columns=QC_COLUMNS)
    return qc.sort_values(QC_COLUMNS[:4], kind="stable").reset_index(drop=True)


def plate_site_readers(source: PlateSource, virtual_store: str | Path, labels_store: str | Path
                       ) -> tuple[Callable[..., dict[str, np.ndarray]], Callable[..., dict[str, np.ndarray]]]:
    """`extract_features`'s readers for a workflow plate: images of source `real` are the plate's
    illumination-corrected (and, where denoised, denoised) stains, those of `virtual` its virtual
    stains (VS_<channel>, returned under the plain channel name so both sources go through the same
    pipeline and get the same feature names); labels are the segmentation's nuclei / cells /
    cytoplasm of that source, under CellProfiler's object names."""
    virtual_channels = read_store_layout(virtual_store).channels

    def read_images(plate: str, well: str, site: int, kind: str) -> dict[str, np.ndarray]:
        if kind == "real":
            return {c: fluorescence_plane(source, well, site, c) for c in source.layout.channels
                    if c != source.brightfield}
        if kind == "virtual":
            return {name.removeprefix(VIRTUAL_PREFIX): np.asarray(read_plane(virtual_store, well, site, i, 0),
                                                                  np.float32)
                    for i, name in enumerate(virtual_channels) if name.startswith(VIRTUAL_PREFIX)}
        raise ValueError(f"{site_where(plate, well, site)}: unknown stain source {kind!r}")

    def read_object_labels(plate: str, well: str, site: int, kind: str) -> dict[str, np.ndarray]:
        return {objects: read_label_image(labels_store, well, site, label_name(objects.lower(), kind))
                for objects in OBJECTS}

    return read_images, read_object_labels


def measurable_sites(plate: str, segment_sites: pd.DataFrame, wells: Iterable[str],
                     sources: Sequence[str]) -> tuple[list[SiteKey], pd.DataFrame]:
    """Split the segmentation's site table (one row per well, site and source) of `wells` and
    `sources` into the sites to measure (segmented: status ok or no_objects) and the qc rows of
    those segmentation skipped (status `skipped`, its reason carried over)."""
    wells = set(wells)
    rows = segment_sites[segment_sites["well"].isin(wells) & segment_sites["source"].isin(sources)]
    measure, skipped = [], []
    for row in rows.sort_values(["source", "well", "site"]).itertuples(index=False):
        key = (str(plate), str(row.well), int(row.site), str(row.source))
        if row.status == "skipped":
            skipped.append(_qc(*key, "skipped", f"{site_where(*key)}: not segmented: {row.reason}"))
        else:
            measure.append(key)
    return measure, pd.DataFrame(skipped, columns=QC_COLUMNS)
