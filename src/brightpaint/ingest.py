"""TIFFs -> one OME-Zarr HCS store per plate (plate / row / column / field, TCZYX, zarr v3, NGFF 0.5).

Work is split by shards of wells: each shard streams its sites (one site's planes in memory per
worker thread) into a store of its own; `assemble_plate_store` then links the shards' wells into the
plate store (hard links, no copy) and writes the plate metadata. Every store is written beside its
final path and renamed when complete.

Channels with fewer planes than the brightfield stack (single-plane fluorescence) are written at the
z their manifest gives; their other planes are never written, cost no disk (zarr skips chunks equal
to the fill value) and are listed in the `brightpaint` attributes (`planes`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import zarr

from .atomic import atomic_path, link_tree
from .io import InputError, Problem, open_inside, real_path_inside, well_row_column

AXES = [
    {"name": "t", "type": "time"},
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space"},
    {"name": "y", "type": "space"},
    {"name": "x", "type": "space"},
]
CHANNEL_COLOURS = {"brightfield": "FFFFFF", "nuclei": "0000FF", "cell": "00FF00"}
OTHER_COLOURS = ["FF0000", "FF00FF", "FFFF00", "00FFFF"]
QC_COLUMNS = ["well", "site", "channel", "z", "file", "min", "max", "mean", "std",
              "saturated_fraction", "zero_fraction", "nonfinite_fraction", "flag"]


@dataclass(frozen=True)
class StoreLayout:
    """What every field image of a plate looks like: channel order, planes, shape, dtype."""

    plate: str
    channels: list[str]
    planes: dict[str, list[int]]
    n_z: int
    shape: tuple[int, int]
    dtype: str
    source_dtypes: dict[str, str]
    roles: dict[str, str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> StoreLayout:
        data = json.loads(text)
        data["shape"] = tuple(data["shape"])
        return cls(**data)


def plan_layout(images: pd.DataFrame, plate: str, channel_roles: dict) -> StoreLayout:
    """Channel order: brightfield, then the configured fluorescence channels, then any other channel
    the manifest has (kept, never dropped). The store's dtype holds every channel's values."""
    brightfield = channel_roles["brightfield"]
    present = sorted(set(images["channel"]))
    ordered = [brightfield] + [c for c in channel_roles.get("fluorescence", []) if c != brightfield]
    channels = [c for c in ordered if c in present] + [c for c in present if c not in ordered]
    planes = {c: sorted(int(z) for z in set(images.loc[images["channel"] == c, "z"]))
              for c in channels}
    source_dtypes = {c: images.loc[images["channel"] == c, "dtype"].iloc[0] for c in channels}
    dtype = np.result_type(*[np.dtype(d) for d in source_dtypes.values()])
    shape = (int(images["shape_y"].iloc[0]), int(images["shape_x"].iloc[0]))
    roles = {}
    for role in ("brightfield", "nuclei", "cell"):
        if channel_roles.get(role) in channels:
            roles[channel_roles[role]] = role
    return StoreLayout(plate=plate, channels=channels, planes=planes,
                       n_z=max(max(z) for z in planes.values()) + 1, shape=shape, dtype=str(dtype),
                       source_dtypes=source_dtypes, roles=roles)


def shard_wells(wells: list[str], n_shards: int, shard: int) -> list[str]:
    """The wells of shard `shard` (0-based) of `n_shards`: contiguous runs of the sorted wells, so a
    shard's sites sit together in the plate and shards differ in size by at most one well."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    ordered = sorted(set(wells))
    return [ordered[i] for i in np.array_split(np.arange(len(ordered)), n_shards)[shard]]


def field_path(site: int) -> str:
    """Field group name of a site: sites count from 1, OME-Zarr fields from 0; the mapping stays
    fixed even when a site is flagged and left out."""
    return str(int(site) - 1)


def image_stats(pixels: np.ndarray) -> dict:
    """Per-image QC numbers. Saturation is counted at the dtype's maximum for integer images."""
    saturated = (np.mean(pixels == np.iinfo(pixels.dtype).max)
                 if np.issubdtype(pixels.dtype, np.integer) else 0.0)
    data = pixels.astype(np.float64, copy=False)
    finite = np.isfinite(data)
    if not finite.all():  # float images only: the numbers describe the finite pixels
        data = data[finite] if finite.any() else np.zeros(1)
    return {"min": float(data.min()), "max": float(data.max()), "mean": float(data.mean()),
            "std": float(data.std()), "saturated_fraction": float(saturated),
            "zero_fraction": float(np.mean(pixels == 0)), "nonfinite_fraction": float(1 - finite.mean())}


def image_flag(stats: dict, saturation_limit: float) -> str:
    reasons = []
    if stats.get("nonfinite_fraction", 0) > 0:
        reasons.append(f"NaN or infinite: {100 * stats['nonfinite_fraction']:.2f}% of pixels")
    if stats["std"] == 0:
        reasons.append(f"blank image (constant value {stats['min']:g})")
    if stats["saturated_fraction"] > saturation_limit:
        reasons.append(f"saturated: {100 * stats['saturated_fraction']:.2f}% of pixels at the "
                       "dtype maximum")
    return "; ".join(reasons)


def _omero(layout: StoreLayout, ranges: dict[str, tuple[float, float]]) -> dict:
    """Viewer channel settings: colour by role, contrast window = the site's value range."""
    others = iter(OTHER_COLOURS * 4)
    channels = []
    top = float(np.iinfo(layout.dtype).max) if np.issubdtype(layout.dtype, np.integer) else 1.0
    for name in layout.channels:
        role = layout.roles.get(name)
        colour = CHANNEL_COLOURS.get(role) or next(others)
        start, end = ranges.get(name, (0.0, top))
        channels.append({"label": name, "color": colour, "active": True,
                         "window": {"min": 0.0, "max": top, "start": start, "end": end}})
    return {"channels": channels}


def _manifest_line(image) -> str | None:
    """Where the manifest lists an image of validate_plate's table (its `line` column)."""
    line = getattr(image, "line", None)
    return f"manifest line {int(line)}" if line is not None and not pd.isna(line) else None


def _image_problem(image, message: str) -> Problem:
    return Problem(image.file, message, image.well, int(image.site), image.channel, int(image.z),
                   named_at=_manifest_line(image))


def _left_screen_folder(image, real: Path, root: str | Path) -> Problem:
    """The problem of a validated image whose real path now lies outside the screen folder."""
    return _image_problem(image, f"its real path {real} leaves the screen folder "
                                 f"{Path(root).resolve()} (manifest path {image.path!r}): the file was "
                                 "replaced after validation; nothing was read from it")


def check_inside_screen_folder(images: pd.DataFrame, root: str | Path, plate: str) -> None:
    """Raise InputError naming every image of `images` (validate_plate's table) whose real path,
    resolved now, no longer lies inside the screen folder `root` that validation checked."""
    problems = [_left_screen_folder(image, Path(image.file).resolve(), root)
                for image in images.itertuples() if real_path_inside(image.file, root) is None]
    if problems:
        raise InputError(problems, f"plate {plate}")


def changed_since_validation(image, opened: os.stat_result) -> str:
    """Why an image is not the file validation checked ("" when it is): its size or modification time
    differs from those validation recorded (columns `bytes`, `mtime_ns` of validate_plate's table).
    Ingest reads only what was validated; a file replaced since then reruns the plate's validation
    (`--forcerun` its images table, or config ingest.rerun_on_image_change)."""
    if getattr(image, "bytes", -1) < 0 or getattr(image, "mtime_ns", -1) < 0:
        return ""  # a table from before stamps were recorded
    if (opened.st_size, opened.st_mtime_ns) == (image.bytes, image.mtime_ns):
        return ""
    return (f"changed since validation (size {image.bytes} -> {opened.st_size} bytes, modified "
            f"{image.mtime_ns} -> {opened.st_mtime_ns} ns since the epoch): rerun the plate from its "
            "validation (snakemake --forcerun results/plates/<plate>/ingest/images.parquet); nothing "
            "was stored from it")


def read_site_tiffs(array: zarr.Array, layout: StoreLayout, site_images: pd.DataFrame,
                    saturation_limit: float, root: str | Path
                    ) -> tuple[list[dict], dict[str, tuple[float, float]]]:
    """Read one site's TIFFs into the field's TCZYX array; return QC rows and value ranges. Each
    file is opened only if its real path still lies inside the screen folder `root` (InputError
    otherwise)."""
    rows = []
    ranges: dict[str, tuple[float, float]] = {}
    for image in site_images.itertuples():
        try:
            handle, real = open_inside(image.file, root)
            if handle is not None:
                with handle:
                    opened = os.fstat(handle.fileno())
                    pixels = tifffile.imread(handle)
        except Exception as err:  # tifffile and its codecs raise many types for damaged data
            raise InputError([_image_problem(image, f"cannot decode image data "
                                                    f"({type(err).__name__}: {err})")],
                             f"plate {layout.plate}") from err
        if handle is None:
            raise InputError([_left_screen_folder(image, real, root)], f"plate {layout.plate}")
        changed = changed_since_validation(image, opened)
        if changed:
            raise InputError([_image_problem(image, changed)], f"plate {layout.plate}")
        if pixels.shape != layout.shape:
            raise InputError([_image_problem(image, f"shape {pixels.shape} differs from the plate's "
                                                    f"{layout.shape} (changed since validation)")],
                             f"plate {layout.plate}")
        array[0, layout.channels.index(image.channel), image.z] = pixels.astype(layout.dtype,
                                                                                copy=False)
        stats = image_stats(pixels)
        low, high = ranges.get(image.channel, (stats["min"], stats["max"]))
        ranges[image.channel] = (min(low, stats["min"]), max(high, stats["max"]))
        rows.append({"well": image.well, "site": int(image.site), "channel": image.channel,
                     "z": int(image.z), "file": image.file, **stats,
                     "flag": image_flag(stats, saturation_limit)})
    return rows, ranges


SiteWriter = Callable[[zarr.Array, str, int], tuple[list[dict], dict[str, tuple[float, float]]]]


def write_sites(out: str | Path, sites: list[tuple[str, int]], layout: StoreLayout,
                fill_site: SiteWriter, threads: int = 1) -> list[dict]:
    """Write a store of row/column/field groups (no plate metadata: `assemble_plate_store` adds it)
    for `sites`, one TCZYX level-0 array per field filled by `fill_site(array, well, site)`, which
    returns table rows and per-channel value ranges (for the viewer's contrast). Memory: one site
    per thread. The store appears at `out` only when complete."""
    # at call time: ome_zarr (with dask and pydantic models) takes ~0.6 s to import and only the
    # jobs that write a store's metadata need it (most jobs only read stores)
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata, write_well_metadata

    by_well: dict[str, list[int]] = {}
    for well, site in sites:
        by_well.setdefault(well, []).append(int(site))
    with atomic_path(out) as partial:
        root = zarr.open_group(partial, mode="w", zarr_format=3)
        jobs = []
        for well, well_sites in sorted(by_well.items()):
            row, column = well_row_column(well)
            well_group = root.require_group(row).require_group(column)
            well_sites = sorted(set(well_sites))
            write_well_metadata(well_group, [{"path": field_path(s)} for s in well_sites],
                                fmt=FormatV05())
            jobs += [(well_group.create_group(field_path(s)), well, s) for s in well_sites]

        def write_field(job):
            field, well, site = job
            array = field.create_array(
                "0", shape=(1, len(layout.channels), layout.n_z, *layout.shape), dtype=layout.dtype,
                chunks=(1, 1, 1, *layout.shape), fill_value=0,
                dimension_names=[a["name"] for a in AXES])
            rows, ranges = fill_site(array, well, site)
            write_multiscales_metadata(
                field, datasets=[{"path": "0", "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0, 1.0]}]}],
                fmt=FormatV05(), axes=AXES, name=field.name.strip("/"),
                metadata={"omero": _omero(layout, ranges)})
            return rows

        with ThreadPoolExecutor(max(1, threads)) as pool:
            results = list(pool.map(write_field, jobs))
    return [row for site_rows in results for row in site_rows]


def write_shard_store(images: pd.DataFrame, wells: list[str], layout: StoreLayout,
                      out: str | Path, threads: int = 1,
                      saturation_limit: float = 0.01, *, root: str | Path) -> pd.DataFrame:
    """Stream the TIFFs of the sites of `wells` into a zarr store at `out`. Returns the per-image
    QC table. `root` is the screen folder validate_plate checked the paths against: every image's
    real path is checked again, before any store is written and once more as the file is opened,
    and one that has left it raises InputError (no store is left behind)."""
    selected = images[images["well"].isin(wells)]
    check_inside_screen_folder(selected, root, layout.plate)
    groups = {key: group for key, group in selected.groupby(["well", "site"])}
    rows = write_sites(out, list(groups), layout,
                       lambda array, well, site: read_site_tiffs(array, layout, groups[(well, site)],
                                                                 saturation_limit, root), threads)
    return pd.DataFrame(rows, columns=QC_COLUMNS)


def assemble_plate_store(shard_stores: list[str | Path], out: str | Path, layout: StoreLayout,
                         provenance: dict | None = None) -> None:
    """Link every shard's wells into the plate store at `out` and write the HCS plate metadata."""
    # at call time: ome_zarr (with dask and pydantic models) takes ~0.6 s to import (see write_sites)
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_plate_metadata

    with atomic_path(out) as partial:
        root = zarr.open_group(partial, mode="w", zarr_format=3)
        wells = []
        field_count = 0
        for shard in map(Path, shard_stores):
            for row_dir in sorted(p for p in shard.iterdir() if p.is_dir()):
                row_group = root.require_group(row_dir.name)
                for column_dir in sorted(p for p in row_dir.iterdir() if p.is_dir()):
                    link_tree(column_dir, partial / row_group.path / column_dir.name)
                    wells.append((row_dir.name, column_dir.name))
                    field_count = max(field_count, sum(p.is_dir() for p in column_dir.iterdir()))
        rows = sorted({r for r, _ in wells})
        columns = sorted({c for _, c in wells})
        write_plate_metadata(root, rows=rows, columns=columns,
                             wells=[f"{r}/{c}" for r, c in sorted(wells)], fmt=FormatV05(),
                             field_count=field_count, name=layout.plate)
        attrs = dict(root.attrs)
        attrs["brightpaint"] = {"layout": json.loads(layout.to_json()), **(provenance or {})}
        root.attrs.update(attrs)


def stored_sites(store: str | Path, wells: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """(well, site) of every field in an assembled plate store, read from its OME metadata, in plate
    order; `wells` limits the answer (a well absent from the store has no sites: every site of it was
    left out at ingest)."""
    root = zarr.open_group(str(store), mode="r")
    if wells is None:
        wells = [entry["path"].replace("/", "") for entry in root.attrs["ome"]["plate"]["wells"]]
    sites = []
    for well in sorted(set(wells)):
        row, column = well_row_column(well)
        try:
            group = root[f"{row}/{column}"]
        except KeyError:
            continue
        sites += [(well, int(image["path"]) + 1) for image in group.attrs["ome"]["well"]["images"]]
    return sites


def channel_plane(layout: StoreLayout, channel: str, z: int | None = None) -> tuple[int, int]:
    """(channel index, z) of a channel's plane in the store's TCZYX arrays."""
    if channel not in layout.channels:
        raise ValueError(f"channel {channel!r} is not in plate {layout.plate} (channels: "
                         f"{layout.channels})")
    planes = layout.planes[channel]
    if z is None:
        if len(planes) != 1:
            raise ValueError(f"channel {channel} has {len(planes)} planes; say which z to use")
        z = planes[0]
    elif z not in planes:
        raise ValueError(f"channel {channel} has no plane z={z} (planes: {planes})")
    return layout.channels.index(channel), z


def read_store_layout(store: str | Path) -> StoreLayout:
    """The layout that `assemble_plate_store` recorded in a store's `brightpaint` attributes."""
    attrs = zarr.open_group(str(store), mode="r").attrs["brightpaint"]
    return StoreLayout.from_json(json.dumps(attrs["layout"]))


def read_plane(store: str | Path, well: str, site: int, channel_index: int, z: int) -> np.ndarray:
    """One (y, x) plane of a site, read without loading the rest of the field."""
    row, column = well_row_column(well)
    array = zarr.open_array(Path(store) / row / column / field_path(site) / "0", mode="r")
    return array[0, channel_index, z]


def read_field(store: str | Path, well: str, site: int) -> np.ndarray:
    """The TCZYX array of one site, as numpy (for tests and small tools; stages stream planes)."""
    row, column = well_row_column(well)
    return zarr.open_array(Path(store) / row / column / field_path(site) / "0", mode="r")[:]


def site_qc_table(qc: pd.DataFrame, flags: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """One row per site: how many images went in, and every flag (validation and pixel QC) with
    its reason. Sites that were left out appear with status `excluded`."""
    rows = []
    image_flags = qc[qc["flag"] != ""]
    for (well, site), group in images.groupby(["well", "site"]):
        part = image_flags[(image_flags["well"] == well) & (image_flags["site"] == site)]
        reasons = [f"{r.channel} z{r.z}: {r.flag}" for r in part.itertuples()]
        rows.append({"well": well, "site": int(site), "n_images": len(group),
                     "status": "flagged" if reasons else "ok", "reasons": " | ".join(reasons)})
    for (well, site), part in flags.groupby(["well", "site"]):
        reasons = [_located(r.channel, r.z, f"{r.reason} ({r.file})") for r in part.itertuples()]
        rows.append({"well": well, "site": int(site), "n_images": 0, "status": "excluded",
                     "reasons": " | ".join(reasons)})
    table = pd.DataFrame(rows, columns=["well", "site", "n_images", "status", "reasons"])
    return table.sort_values(["well", "site"]).reset_index(drop=True)


def _located(channel, z, text: str) -> str:
    where = [str(channel)] if not pd.isna(channel) else []
    where += [f"z{int(z)}"] if not pd.isna(z) else []
    return f"{' '.join(where)}: {text}" if where else text
