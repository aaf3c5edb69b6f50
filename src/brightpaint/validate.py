"""Cross-file checks of one plate before any pixel is written: the manifest against the plate map,
the channel roles and the image files' headers.

Problems are of three kinds. `error`: always fatal (a shape mismatch, a well the plate map lacks).
`missing` and `unreadable`: fatal by default; with `on_missing: flag` the whole site is left out of
the store and recorded as a QC flag that the plate's report shows, never dropped silently.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import tifffile

from .io import IMAGE_DTYPES, InputError, Problem, read_manifest, read_platemap

SITE_KEY = ["well", "site"]


@dataclass(frozen=True)
class ImageHeader:
    shape: tuple[int, ...] | None
    dtype: str | None
    problem: str | None  # why the file cannot be used, None when it can
    kind: str = "error"


def read_image_header(path: str) -> ImageHeader:
    """Shape and dtype from a TIFF's header, with truncation detected from the strip offsets.

    Reading headers only keeps validation of a 384-well plate (tens of thousands of files) to
    seconds; a file cut short is caught here because its last strip would end past the file's end.
    """
    if not os.path.isfile(path):
        return ImageHeader(None, None, "file not found", "missing")
    size = os.path.getsize(path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                return ImageHeader(None, None, "TIFF has no image", "unreadable")
            page = tif.pages.first
            shape, dtype = tuple(page.shape), np.dtype(page.dtype)
            n_pages = len(tif.pages)
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)]
    except Exception as err:  # tifffile raises many types for damaged files
        return ImageHeader(None, None, f"not a readable TIFF ({type(err).__name__}: {err})",
                           "unreadable")
    if ends and max(ends) > size:
        return ImageHeader(shape, str(dtype), f"truncated TIFF: image data ends at byte "
                                              f"{max(ends)} but the file has {size} bytes",
                           "unreadable")
    if n_pages > 1 or len(shape) != 2:
        return ImageHeader(shape, str(dtype), f"expected one 2-D image, found {n_pages} page(s) "
                                              f"of shape {shape}")
    if dtype not in IMAGE_DTYPES:
        return ImageHeader(shape, str(dtype), f"dtype {dtype} is not one of uint8, uint16, "
                                              "float32")
    return ImageHeader(shape, str(dtype), None)


def check_plate(manifest: pd.DataFrame, platemap: pd.DataFrame, brightfield: str,
                fluorescence: list[str], role: str, threads: int = 1
                ) -> tuple[pd.DataFrame, list[Problem]]:
    """Validate one plate. Returns the manifest with `shape_y`, `shape_x`, `dtype` added, and the
    problems found (all of them, not the first)."""
    source = "manifest"
    problems: list[Problem] = []

    known_wells = set(platemap["well"])
    for well in sorted(set(manifest["well"]) - known_wells):
        problems.append(Problem(source, "well is in the manifest but not in the plate map",
                                well=well))

    required = [brightfield] + (list(fluorescence) if role in ("train", "both") else [])
    problems += _check_site_completeness(manifest, required, source)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        headers = list(pool.map(read_image_header, manifest["file"]))
    manifest = manifest.copy()
    manifest["shape_y"] = [h.shape[0] if h.shape and len(h.shape) == 2 else -1 for h in headers]
    manifest["shape_x"] = [h.shape[1] if h.shape and len(h.shape) == 2 else -1 for h in headers]
    manifest["dtype"] = [h.dtype or "" for h in headers]
    for row, header in zip(manifest.itertuples(), headers, strict=True):
        if header.problem:
            problems.append(Problem(row.path, header.problem, row.well, row.site, row.channel,
                                    row.z, header.kind))

    readable = manifest[[h.problem is None for h in headers]]
    if len(readable):
        shapes = readable.groupby(["shape_y", "shape_x"]).size().sort_values(ascending=False)
        ref_y, ref_x = shapes.index[0]
        for row in readable.itertuples():
            if (row.shape_y, row.shape_x) != (ref_y, ref_x):
                problems.append(Problem(row.path, f"shape ({row.shape_y}, {row.shape_x}) differs "
                                                  f"from the plate's ({ref_y}, {ref_x})",
                                        row.well, row.site, row.channel, row.z))
        for channel, group in readable.groupby("channel"):
            dtypes = group["dtype"].value_counts()
            for row in group[group["dtype"] != dtypes.index[0]].itertuples():
                problems.append(Problem(row.path, f"dtype {row.dtype} differs from channel "
                                                  f"{channel}'s {dtypes.index[0]}",
                                        row.well, row.site, row.channel, row.z))
    return manifest, problems


def _check_site_completeness(manifest: pd.DataFrame, required: list[str],
                             source: str) -> list[Problem]:
    """Every site must carry every required channel, and every channel the same planes everywhere
    (a brightfield stack with a plane missing cannot be compared with its neighbours)."""
    problems = []
    planes = {ch: sorted(set(g["z"])) for ch, g in manifest.groupby("channel")}
    for (well, site), group in manifest.groupby(SITE_KEY):
        present = {ch: sorted(set(g["z"])) for ch, g in group.groupby("channel")}
        for channel in required:
            if channel not in present:
                problems.append(Problem(source, f"required channel {channel} has no image",
                                        well, int(site), channel, kind="missing"))
        for channel, zs in present.items():
            lacking = sorted(set(planes[channel]) - set(zs))
            if lacking:
                problems.append(Problem(source, f"z-stack incomplete: plane(s) {lacking} missing",
                                        well, int(site), channel, kind="missing"))
    for channel in required:
        if channel not in planes:
            problems.append(Problem(source, f"channel {channel} (set in config channels:) appears "
                                            f"in no row; channels found: {sorted(planes)}"))
    sites_per_well = manifest.groupby("well")["site"].apply(lambda s: set(s))
    all_sites = set().union(*sites_per_well) if len(sites_per_well) else set()
    for well, sites in sites_per_well.items():
        for site in sorted(all_sites - sites):
            problems.append(Problem(source, "site missing (other wells have it)", well, int(site),
                                    kind="missing"))
    return problems


def triage(manifest: pd.DataFrame, problems: list[Problem], on_missing: str, what: str
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raise on fatal problems; otherwise split off flagged sites.

    Returns the images that go into the store and a flags table (one row per problem that became a
    QC flag, with well, site, channel, z, file and reason).
    """
    if on_missing not in ("error", "flag"):
        raise ValueError(f"on_missing must be 'error' or 'flag', not {on_missing!r}")
    flaggable = ("missing", "unreadable") if on_missing == "flag" else ()
    fatal = [p for p in problems if p.kind not in flaggable or p.well is None or p.site is None]
    if fatal:
        raise InputError(problems if on_missing == "error" else fatal, what)
    flags = flags_table(problems)
    dropped = set(zip(flags["well"], flags["site"], strict=True))
    keep = [(w, s) not in dropped for w, s in zip(manifest["well"], manifest["site"], strict=True)]
    return manifest[keep].reset_index(drop=True), flags


FLAG_COLUMNS = ["well", "site", "channel", "z", "file", "kind", "reason"]


def flags_table(problems: list[Problem]) -> pd.DataFrame:
    rows = [{"well": p.well, "site": p.site, "channel": p.channel, "z": p.z, "file": p.file,
             "kind": p.kind, "reason": p.message} for p in problems]
    return pd.DataFrame(rows, columns=FLAG_COLUMNS).astype({"site": "Int64", "z": "Int64"})


def validate_plate(manifest_path: str, platemap_path: str, plate: str, role: str,
                   channels: dict, root: str, on_missing: str = "error", threads: int = 1
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and check one plate's manifest and plate map and every image header.

    Returns (images that go into the store, QC flags). Raises `InputError` listing every fatal
    problem of the plate at once.
    """
    problems: list[Problem] = []
    manifest = platemap = None
    try:
        manifest = read_manifest(manifest_path, plate=plate, root=root)
    except InputError as err:
        problems += err.problems
    try:
        platemap = read_platemap(platemap_path)
    except InputError as err:
        problems += err.problems
    if problems:
        raise InputError(problems, f"plate {plate}")
    checked, found = check_plate(manifest, platemap, channels["brightfield"],
                                 list(channels.get("fluorescence", [])), role, threads)
    return triage(checked, found, on_missing, f"plate {plate}")
