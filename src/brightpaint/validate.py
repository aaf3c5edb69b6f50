"""Cross-file checks of one plate before any pixel is written: the manifest against the plate map,
the channel roles and the image files' headers.

Problems are of three kinds. `error`: always fatal (a shape mismatch, a well the plate map lacks).
`missing` and `unreadable`: fatal by default; with `on_missing: flag` the whole site is left out of
the store and recorded as a QC flag that the plate's report shows, never dropped silently.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from .io import IMAGE_DTYPES, InputError, Problem, open_inside, read_manifest, read_platemap

SITE_KEY = ["well", "site"]


@dataclass(frozen=True)
class ImageLimits:
    """Sizes a plate's images may have (config `ingest.max_image_pixels`, `ingest.max_planes`),
    checked on the manifest and the TIFF headers before any pixel is read: one image of a forged
    header could otherwise claim tens of gigabytes, one plane number thousands of planes per site.
    A user with larger images raises them in the config."""

    max_image_pixels: int = 100_000_000
    max_planes: int = 1000
    # a 384-well plate of 9 sites, 5 brightfield planes and 5 stains at 2160 x 2160 x 16 bit holds
    # ~320 GB: the default leaves room for that and stops a manifest that lists far more
    max_plate_bytes: int = 2_000_000_000_000

    @classmethod
    def from_config(cls, ingest: dict) -> ImageLimits:
        return cls(**{key: int(ingest[key]) for key in ("max_image_pixels", "max_planes", "max_plate_bytes")
                      if key in ingest})


@dataclass(frozen=True)
class ImageHeader:
    shape: tuple[int, ...] | None
    dtype: str | None
    problem: str | None  # why the file cannot be used, None when it can
    kind: str = "error"
    # the file as validation saw it: ingest refuses a file whose size or modification time changed
    size: int = -1
    mtime_ns: int = -1


def read_image_header(path: str, max_pixels: int = ImageLimits.max_image_pixels) -> ImageHeader:
    """Shape and dtype from a TIFF's header, with truncation detected from the strip offsets.

    Reading headers only keeps validation of a 384-well plate (tens of thousands of files) to
    seconds; a file cut short is caught here because its last strip would end past the file's end,
    and an image larger than `max_pixels` before anything allocates room for it.
    """
    if not os.path.isfile(path):
        return ImageHeader(None, None, "file not found", "missing")
    stat = os.stat(path)
    size = stat.st_size
    header = _read_header(path, size, max_pixels)
    return replace(header, size=size, mtime_ns=stat.st_mtime_ns)


def _read_header(path: str, size: int, max_pixels: int) -> ImageHeader:
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
    if shape[0] * shape[1] > max_pixels:
        return ImageHeader(shape, str(dtype), f"image of {shape[0]} x {shape[1]} = "
                                              f"{shape[0] * shape[1]} pixels, more than the limit "
                                              f"of {max_pixels} (config ingest.max_image_pixels)")
    if dtype not in IMAGE_DTYPES:
        return ImageHeader(shape, str(dtype), f"dtype {dtype} is not one of uint8, uint16, "
                                              "float32")
    return ImageHeader(shape, str(dtype), None)


def check_plate(manifest: pd.DataFrame, platemap: pd.DataFrame, brightfield: str,
                fluorescence: list[str], role: str, threads: int = 1,
                source: str = "manifest", platemap_source: str = "plate map",
                limits: ImageLimits = ImageLimits()) -> tuple[pd.DataFrame, list[Problem]]:
    """Validate one plate. Returns the manifest with `shape_y`, `shape_x`, `dtype` added, and the
    problems found (all of them, not the first). `source` and `platemap_source` are the files' paths,
    named in the problems with the manifest line (column `line`, from `read_manifest`) concerned."""
    problems: list[Problem] = []
    if "line" not in manifest.columns:  # a table built in code: its row numbers stand in
        manifest = manifest.assign(line=range(2, len(manifest) + 2))
    first_line = manifest.groupby(SITE_KEY)["line"].min().to_dict()

    known_wells = set(platemap["well"])
    for well in sorted(set(manifest["well"]) - known_wells):
        line = int(manifest.loc[manifest["well"] == well, "line"].min())
        problems.append(Problem(source, f"well is in the manifest but not in the plate map "
                                        f"{platemap_source}", well=well, line=line))

    required = [brightfield] + (list(fluorescence) if role in ("train", "both") else [])
    problems += _check_site_completeness(manifest, required, source, first_line)
    problems += _check_planes(manifest, brightfield, limits.max_planes, source)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        headers = list(pool.map(lambda f: read_image_header(f, limits.max_image_pixels),
                                manifest["file"]))
    manifest = manifest.copy()
    manifest["shape_y"] = [h.shape[0] if h.shape and len(h.shape) == 2 else -1 for h in headers]
    manifest["shape_x"] = [h.shape[1] if h.shape and len(h.shape) == 2 else -1 for h in headers]
    manifest["dtype"] = [h.dtype or "" for h in headers]
    manifest["bytes"] = [h.size for h in headers]
    manifest["mtime_ns"] = [h.mtime_ns for h in headers]
    total = sum(h.size for h in headers if h.size > 0)
    if total > limits.max_plate_bytes:
        problems.append(Problem(source, f"the plate's {len(headers)} image files hold {total} bytes, more "
                                        f"than the limit of {limits.max_plate_bytes} "
                                        "(config ingest.max_plate_bytes)"))

    def named_at(row) -> str:
        return f"{source} line {row.line}"

    for row, header in zip(manifest.itertuples(), headers, strict=True):
        if header.problem:
            problems.append(Problem(row.path, header.problem, row.well, row.site, row.channel,
                                    row.z, header.kind, named_at=named_at(row)))

    readable = manifest[[h.problem is None for h in headers]]
    if len(readable):
        shapes = readable.groupby(["shape_y", "shape_x"]).size().sort_values(ascending=False)
        ref_y, ref_x = shapes.index[0]
        for row in readable.itertuples():
            if (row.shape_y, row.shape_x) != (ref_y, ref_x):
                problems.append(Problem(row.path, f"shape ({row.shape_y}, {row.shape_x}) differs "
                                                  f"from the plate's ({ref_y}, {ref_x})",
                                        row.well, row.site, row.channel, row.z,
                                        named_at=named_at(row)))
        for channel, group in readable.groupby("channel"):
            dtypes = group["dtype"].value_counts()
            for row in group[group["dtype"] != dtypes.index[0]].itertuples():
                problems.append(Problem(row.path, f"dtype {row.dtype} differs from channel "
                                                  f"{channel}'s {dtypes.index[0]}",
                                        row.well, row.site, row.channel, row.z,
                                        named_at=named_at(row)))
    return manifest, problems


def _check_planes(manifest: pd.DataFrame, brightfield: str, max_planes: int,
                  source: str) -> list[Problem]:
    """Plane numbers that the store can hold: a stack's planes are 0..n-1 with n <= `max_planes`; a
    single-plane channel sits at a plane of the brightfield stack (its z < the brightfield's plane
    count). The store's z axis is as long as the largest z, so one stray z would make every site's
    array that long."""
    problems = []
    planes = {ch: sorted(set(g["z"])) for ch, g in manifest.groupby("channel")}
    n_brightfield = len(planes.get(brightfield, [0]))
    for channel, zs in planes.items():
        rows = manifest[manifest["channel"] == channel]
        if len(zs) > max_planes:
            problems.append(Problem(source, f"{len(zs)} planes, more than the limit of {max_planes} "
                                            "(config ingest.max_planes)", channel=channel,
                                    line=int(rows["line"].min())))
            continue
        single = len(zs) == 1 and channel != brightfield
        count = n_brightfield if single else len(zs)
        beyond = rows[rows["z"] >= count]
        if len(beyond):
            first = beyond.loc[beyond["line"].idxmin()]
            rule = (f"a single-plane channel must sit at a plane of the brightfield stack "
                    f"(z 0..{count - 1})" if single else
                    f"a stack of {count} planes has z 0..{count - 1}")
            problems.append(Problem(source, f"z {int(first['z'])} is out of range: {rule}",
                                    channel=channel, line=int(first["line"])))
    return problems


def _check_site_completeness(manifest: pd.DataFrame, required: list[str], source: str,
                             first_line: dict | None = None) -> list[Problem]:
    """Every site must carry every required channel, and every channel the same planes everywhere
    (a brightfield stack with a plane missing cannot be compared with its neighbours). Problems of a
    site name the manifest line where the site first appears."""
    first_line = first_line or {}
    problems = []
    planes = {ch: sorted(set(g["z"])) for ch, g in manifest.groupby("channel")}
    for (well, site), group in manifest.groupby(SITE_KEY):
        line = first_line.get((well, site))
        present = {ch: sorted(set(g["z"])) for ch, g in group.groupby("channel")}
        for channel in required:
            if channel not in present:
                problems.append(Problem(source, f"required channel {channel} has no image",
                                        well, int(site), channel, kind="missing", line=line))
        for channel, zs in present.items():
            lacking = sorted(set(planes[channel]) - set(zs))
            if lacking:
                shown = lacking if len(lacking) <= 10 else [*lacking[:10], "..."]
                problems.append(Problem(source, f"z-stack incomplete: plane(s) {shown} missing",
                                        well, int(site), channel, kind="missing", line=line))
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


def triage(manifest: pd.DataFrame, problems: list[Problem], on_missing: str, what: str,
           source: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raise on fatal problems; otherwise split off flagged sites.

    Returns the images that go into the store and a flags table (one row per problem that became a
    QC flag, with well, site, channel, z, file and reason). A plate whose every site would be left
    out is an error (of `source`, the manifest): there would be nothing to ingest.
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
    if not any(keep):
        everything = Problem(source or what, "every site is excluded (ingest.on_missing: flag): no "
                                             f"image is left to ingest; {len(problems)} problem(s), "
                                             "listed below")
        raise InputError([everything, *problems], what)
    return manifest[keep].reset_index(drop=True), flags


FLAG_COLUMNS = ["well", "site", "channel", "z", "file", "kind", "reason"]


def flags_table(problems: list[Problem]) -> pd.DataFrame:
    rows = [{"well": p.well, "site": p.site, "channel": p.channel, "z": p.z, "file": p.file,
             "kind": p.kind, "reason": p.message} for p in problems]
    return pd.DataFrame(rows, columns=FLAG_COLUMNS).astype({"site": "Int64", "z": "Int64"})


def validate_plate(manifest_path: str, platemap_path: str, plate: str, role: str,
                   channels: dict, root: str, on_missing: str = "error", threads: int = 1,
                   limits: ImageLimits = ImageLimits(), profiles: dict | None = None,
                   plate_info: dict | None = None, control_labels: dict | None = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and check one plate's manifest and plate map and every image header; with `profiles`
    (config `profiles:`) and `plate_info` (the plate's sheet row), also that the plate map gives the
    reference wells its profiles will be normalised against, which would otherwise fail only after
    segmentation and features. `control_labels` is config `platemap.control_types`.

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
        platemap = read_platemap(platemap_path, control_labels)
    except InputError as err:
        problems += err.problems
    if problems:
        raise InputError(problems, f"plate {plate}")
    checked, found = check_plate(manifest, platemap, channels["brightfield"],
                                 list(channels.get("fluorescence", [])), role, threads,
                                 source=str(manifest_path), platemap_source=str(platemap_path),
                                 limits=limits)
    if profiles is not None:
        # pycytominer behind it takes seconds to import: only where profiles are asked for
        from .profiles import reference_wells_problem

        problem = reference_wells_problem(platemap, sorted(set(manifest["well"])),
                                          {**(plate_info or {}), "plate": plate}, profiles)
        if problem:
            found.append(Problem(str(platemap_path), problem))
    return triage(checked, found, on_missing, f"plate {plate}", source=str(manifest_path))


def images_stamp(manifest_path: str | Path, plate: str, root: str | Path) -> str:
    """A digest of the files a plate's manifest lists, as they are now: path, size and modification
    time of each (a file that cannot be read as listed counts by its path alone; validation names
    it). With config ingest.rerun_on_image_change it is a param of rule validate_plate, so a
    replaced, grown or touched image reruns the plate. Costs one stat per file when the workflow is
    planned; the manifest's own problems are left to validation."""
    digest = hashlib.sha256()
    try:
        files = sorted(read_manifest(manifest_path, plate=plate, root=root)["file"])
    except InputError:
        return "manifest unreadable"
    for file in files:
        try:
            stat = os.stat(file)
            digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{file}\0missing\n".encode())
    return digest.hexdigest()


PIXEL_FLAG_COLUMNS = ["well", "site", "channel", "z", "file", "flag"]


def sample_pixel_flags(images: pd.DataFrame, root: str | Path, n: int, seed: int = 0,
                       saturation_limit: float = 0.01) -> pd.DataFrame:
    """Read the pixels of up to `n` of a plate's accepted images (a seeded draw) and flag those that
    ingest would flag: saturated, blank, NaN / infinite (`ingest.image_flag`). Before a run, so a
    wrong exposure shows before hours of work; ingest still checks every image. One row per flagged
    image: well, site, channel, z, file, flag. Files are opened only inside the screen folder."""
    from .ingest import image_flag, image_stats  # zarr behind ingest: only where pixels are asked for

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"pixels: the number of images to read must be an integer >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    picked = images.iloc[np.sort(rng.choice(len(images), min(n, len(images)), replace=False))]
    rows = []
    for image in picked.itertuples():
        handle, real = open_inside(image.file, root)
        if handle is None:
            raise InputError([Problem(str(image.file), f"resolves to {real}, outside the screen "
                                                       f"folder {root}")], "pixel check")
        with handle:
            pixels = tifffile.imread(handle)
        flag = image_flag(image_stats(pixels), saturation_limit)
        if flag:
            rows.append({"well": image.well, "site": int(image.site), "channel": image.channel,
                         "z": int(image.z), "file": str(image.file), "flag": flag})
    return pd.DataFrame(rows, columns=PIXEL_FLAG_COLUMNS)
