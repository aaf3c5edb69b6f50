"""The input contract (DESIGN.md section 3): screen sheet, image manifest, LoadData CSV, plate map.

Readers return tidy pandas tables and never guess silently: every problem found in a user's files is
collected as a `Problem` that names the file, well, site, channel and z it concerns, and all of them are
raised together in one `InputError`, so a user fixes a sheet in one go instead of one error per run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

SHEET_COLUMNS = ["plate", "manifest", "platemap", "batch", "cell_type", "role"]
MANIFEST_COLUMNS = ["plate", "well", "site", "channel", "z", "path"]
PLATEMAP_COLUMNS = ["well", "perturbation", "dose", "control_type", "moa", "target"]
ROLES = ("train", "apply", "both")
CONTROL_TYPES = ("negcon", "poscon", "trt")
IMAGE_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32"))
PLATE_ROWS = "ABCDEFGHIJKLMNOP"  # a 384-well plate: rows A-P, columns 1-24
PLATE_COLUMNS = 24
NON_IMAGE_SUFFIXES = (".npy", ".mat")

_WELL = re.compile(r"^([A-Pa-p])0*([1-9][0-9]?)$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a user's input, located as precisely as the input allows."""

    file: str
    message: str
    well: str | None = None
    site: int | None = None
    channel: str | None = None
    z: int | None = None
    kind: str = "error"

    def __str__(self) -> str:
        where = [self.file]
        if self.well is not None:
            where.append(f"well {self.well}")
        if self.site is not None:
            where.append(f"site {self.site}")
        if self.channel is not None:
            where.append(f"channel {self.channel}")
        if self.z is not None:
            where.append(f"z {self.z}")
        return f"{', '.join(where)}: {self.message}"


class InputError(ValueError):
    """Everything wrong with an input, listed at once."""

    def __init__(self, problems: list[Problem], what: str = "input"):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) in {what}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def normalise_well(well: str) -> str | None:
    """'a1', 'A1', 'A01' -> 'A01'; None when the text is not a 384-well plate well."""
    match = _WELL.match(str(well).strip())
    if not match or int(match.group(2)) > PLATE_COLUMNS:
        return None
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def well_row_column(well: str) -> tuple[str, str]:
    """'B07' -> ('B', '07'): the row and column names used in the OME-Zarr plate."""
    return well[0], well[1:]


def _read_table(path: Path, sep: str, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError([Problem(str(path), f"{what} not found")], what)
    try:
        # Read everything as text: ids like plate '001' or well 'A01' must not become numbers.
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, comment=None)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise InputError([Problem(str(path), f"cannot parse {what}: {err}")], what) from err


def _missing_columns(df: pd.DataFrame, required: list[str], path: Path) -> list[Problem]:
    missing = [c for c in required if c not in df.columns]
    if not missing:
        return []
    return [Problem(str(path), f"missing column(s) {missing}; found {list(df.columns)}")]


def resolve_inside(base: Path, relative: str, root: Path) -> Path | None:
    """The absolute path of `relative` (relative to `base`), or None if it leaves `root`.

    Paths are resolved (symlinks and '..' followed) before the check so that a sheet cannot reach
    files outside the screen folder by either route.
    """
    return real_path_inside(base / relative, root)


def real_path_inside(path: str | Path, root: str | Path) -> Path | None:
    """The real path of `path` (symlinks and '..' resolved now), or None if it lies outside `root`."""
    real = Path(path).resolve()
    try:
        real.relative_to(Path(root).resolve())
    except ValueError:
        return None
    return real


def open_inside(path: str | Path, root: str | Path) -> tuple[BinaryIO | None, Path]:
    """Open `path` for binary reading only if its real path lies inside `root`.

    Returns (handle, real path), or (None, the outside real path) without opening. The path is
    resolved at the call, so a file replaced since an earlier check (by a symlink to a file
    elsewhere, say) is caught; where the system shows what a descriptor opened (Linux
    /proc/self/fd), the opened file is checked too, so a swap between the check and the open is
    caught as well.
    """
    real = real_path_inside(path, root)
    if real is None:
        return None, Path(path).resolve()
    handle = open(real, "rb")  # returned open: the caller closes it
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{handle.fileno()}"))
    except OSError:  # no /proc: the check before the open is all there is
        opened = real
    if real_path_inside(opened, root) is None:
        handle.close()
        return None, opened
    return handle, real


def read_screen_sheet(path: str | Path) -> pd.DataFrame:
    """Read `plates.tsv`; manifest and platemap come back as absolute paths inside the screen folder.

    Checks: exact columns, one row per plate id, role in {train, apply, both}, referenced files exist
    and lie inside the sheet's folder.
    """
    path = Path(path)
    df = _read_table(path, "\t", "screen sheet")
    problems = _missing_columns(df, SHEET_COLUMNS, path)
    if problems:
        raise InputError(problems, "screen sheet")
    root = path.parent.resolve()
    df = df[SHEET_COLUMNS].apply(lambda col: col.str.strip())
    for plate, count in df["plate"].value_counts().items():
        if count > 1:
            problems.append(Problem(str(path), f"plate id {plate!r} appears {count} times"))
    for i, row in df.iterrows():
        line = f"{path} (line {i + 2}, plate {row['plate']!r})"
        if not row["plate"] or not re.fullmatch(r"[A-Za-z0-9_.-]+", row["plate"]):
            problems.append(Problem(line, "plate id must be non-empty letters, digits, _ . -"))
        if row["role"] not in ROLES:
            problems.append(Problem(line, f"role {row['role']!r} is not one of {ROLES}"))
        for column in ("manifest", "platemap"):
            resolved = resolve_inside(root, row[column], root)
            if resolved is None:
                problems.append(Problem(line, f"{column} path {row[column]!r} leaves the screen "
                                              f"folder {root}"))
            elif not resolved.is_file():
                problems.append(Problem(line, f"{column} file {resolved} not found"))
            else:
                df.loc[i, column] = str(resolved)
    if problems:
        raise InputError(problems, "screen sheet")
    return df.reset_index(drop=True)


def is_loaddata(df: pd.DataFrame) -> bool:
    return any(c.startswith("FileName_") for c in df.columns)


def loaddata_to_manifest(df: pd.DataFrame, source: Path) -> pd.DataFrame:
    """Convert a CellProfiler LoadData table (FileName_X / PathName_X per channel X) to a manifest.

    Metadata_Plate, Metadata_Well and Metadata_Site name the site; an optional Metadata_Z (or
    Metadata_Plane) gives the z index of brightfield planes stored one row per plane. PathName may be
    absolute or relative to the CSV; the manifest's paths are relative to the CSV's folder.
    """
    problems = _missing_columns(df, ["Metadata_Plate", "Metadata_Well", "Metadata_Site"], source)
    # LoadData CSVs also list illumination functions (FileName_IllumDNA = ...npy); those are not images.
    channels = [c[len("FileName_"):] for c in df.columns if c.startswith("FileName_")
                and not df[c].str.lower().str.endswith(NON_IMAGE_SUFFIXES).all()]
    for channel in channels:
        if f"PathName_{channel}" not in df.columns:
            problems.append(Problem(str(source), f"FileName_{channel} has no PathName_{channel}"))
    if problems:
        raise InputError(problems, "LoadData CSV")
    z_column = next((c for c in ("Metadata_Z", "Metadata_Plane") if c in df.columns), None)
    base = source.parent.resolve()
    rows = []
    for _, row in df.iterrows():
        for channel in channels:
            name = row[f"FileName_{channel}"]
            if not name:  # LoadData leaves a channel empty where a site lacks it
                continue
            folder = Path(row[f"PathName_{channel}"] or ".")
            full = folder / name if folder.is_absolute() else base / folder / name
            try:
                relative = Path(full).resolve().relative_to(base)
            except ValueError:
                relative = Path(full)  # outside: kept as is, validation reports it
            rows.append({"plate": row["Metadata_Plate"], "well": row["Metadata_Well"],
                         "site": row["Metadata_Site"], "channel": channel,
                         "z": row[z_column] if z_column else "0", "path": str(relative)})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def read_manifest(path: str | Path, plate: str | None = None,
                  root: str | Path | None = None) -> pd.DataFrame:
    """Read a plate's image manifest (long CSV, or a CellProfiler LoadData CSV).

    Returns the contract's columns with well normalised ('A1' -> 'A01'), site and z as int, and an
    extra column `file` with the absolute path. Checks: columns, well names, integer site >= 1 and
    z >= 0, one plate id matching the sheet, no duplicated (well, site, channel, z), paths inside
    `root` (the screen folder; default: the manifest's folder). File existence and image content are
    checked by `check_images`, which reads every header.
    """
    path = Path(path)
    df = _read_table(path, ",", "image manifest")
    if is_loaddata(df):
        df = loaddata_to_manifest(df, path)
    problems = _missing_columns(df, MANIFEST_COLUMNS, path)
    if problems:
        raise InputError(problems, "image manifest")
    df = df[MANIFEST_COLUMNS].apply(lambda col: col.astype(str).str.strip())
    root = Path(root).resolve() if root is not None else path.parent.resolve()
    base = path.parent.resolve()
    files, wells, sites, zs = [], [], [], []
    for i, row in df.iterrows():
        line = f"{path} (line {i + 2})"
        well = normalise_well(row["well"])
        if well is None:
            problems.append(Problem(line, f"well {row['well']!r} is not a 384-well plate well "
                                          "(A01..P24)"))
        site = _as_int(row["site"], minimum=1)
        if site is None:
            problems.append(Problem(line, f"site {row['site']!r} is not an integer >= 1",
                                    well=well))
        z = _as_int(row["z"], minimum=0)
        if z is None:
            problems.append(Problem(line, f"z {row['z']!r} is not an integer >= 0", well=well,
                                    site=site, channel=row["channel"]))
        if not row["channel"]:
            problems.append(Problem(line, "empty channel name", well=well, site=site))
        resolved = resolve_inside(base, row["path"], root)
        if resolved is None:
            problems.append(Problem(line, f"path {row['path']!r} leaves the screen folder {root}",
                                    well=well, site=site, channel=row["channel"], z=z))
        files.append(str(resolved) if resolved else "")
        wells.append(well)
        sites.append(site)
        zs.append(z)
    df["well"], df["site"], df["z"], df["file"] = wells, sites, zs, files
    plates = sorted(set(df["plate"]))
    if plate is not None and plates != [plate]:
        problems.append(Problem(str(path), f"manifest lists plate(s) {plates}; the screen sheet "
                                           f"expects only {plate!r}"))
    if not problems:
        key = ["plate", "well", "site", "channel", "z"]
        for _, dup in df[df.duplicated(key, keep=False)].groupby(key):
            first = dup.iloc[0]
            problems.append(Problem(str(path), f"{len(dup)} rows for the same image: "
                                               f"{list(dup['path'])}", well=first["well"],
                                    site=int(first["site"]), channel=first["channel"],
                                    z=int(first["z"])))
    if problems:
        raise InputError(problems, "image manifest")
    df["site"] = df["site"].astype(int)
    df["z"] = df["z"].astype(int)
    return df.sort_values(["well", "site", "channel", "z"]).reset_index(drop=True)


def _as_int(text: str, minimum: int) -> int | None:
    try:
        value = int(float(text)) if re.fullmatch(r"\d+(\.0*)?", text) else int(text)
    except ValueError:
        return None
    return value if value >= minimum else None


def read_platemap(path: str | Path) -> pd.DataFrame:
    """Read a plate map: one row per well, control_type in {negcon, poscon, trt}, numeric dose.

    moa and target may be empty (controls, unannotated compounds); dose may be empty for controls.
    """
    path = Path(path)
    df = _read_table(path, ",", "plate map")
    problems = _missing_columns(df, PLATEMAP_COLUMNS, path)
    if problems:
        raise InputError(problems, "plate map")
    df = df[PLATEMAP_COLUMNS].apply(lambda col: col.str.strip())
    doses = []
    for i, row in df.iterrows():
        line = f"{path} (line {i + 2})"
        well = normalise_well(row["well"])
        if well is None:
            problems.append(Problem(line, f"well {row['well']!r} is not a 384-well plate well"))
        df.loc[i, "well"] = well
        if row["control_type"] not in CONTROL_TYPES:
            problems.append(Problem(line, f"control_type {row['control_type']!r} is not one of "
                                          f"{CONTROL_TYPES}", well=well))
        try:
            doses.append(float(row["dose"]) if row["dose"] else np.nan)
        except ValueError:
            problems.append(Problem(line, f"dose {row['dose']!r} is not a number", well=well))
            doses.append(np.nan)
        if not row["perturbation"]:
            problems.append(Problem(line, "empty perturbation (use e.g. DMSO for controls)",
                                    well=well))
    for well, count in df["well"].value_counts().items():
        if well and count > 1:
            problems.append(Problem(str(path), f"well listed {count} times", well=well))
    if problems:
        raise InputError(problems, "plate map")
    df["dose"] = doses
    return df.sort_values("well").reset_index(drop=True)


def manifest_from_folder(folder: str | Path, pattern: str, plate: str | None = None,
                         site_offset: int = 0, z_default: int = 0) -> pd.DataFrame:
    """Build a manifest from the files in `folder` whose names match `pattern`.

    `pattern` is a file name with placeholders: {plate}, {well}, {site}, {channel}, {z} and `*`
    for anything else, e.g. '{well}_s{site}_{channel}_z{z}.tif' or 'AS_*_{well}f{site}d{channel}.TIF'.
    `site_offset` is added to the parsed site (1 for instruments that count fields from 0). Files that
    do not match are ignored (they are often thumbnails or metadata); the caller sees how many matched.
    Paths in the result are relative to `folder`, so the manifest is meant to be saved there.
    """
    regex = pattern_to_regex(pattern)
    if "well" not in regex.groupindex or "channel" not in regex.groupindex:
        raise ValueError(f"pattern {pattern!r} must contain {{well}} and {{channel}}")
    if plate is None and "plate" not in regex.groupindex:
        raise ValueError("give plate= or a {plate} placeholder in the pattern")
    folder = Path(folder)
    rows = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        match = regex.fullmatch(relative) or regex.fullmatch(file.name)
        if not match:
            continue
        groups = match.groupdict()
        site = int(groups["site"]) + site_offset if groups.get("site") else 1
        rows.append({"plate": groups.get("plate") or plate, "well": normalise_well(groups["well"])
                     or groups["well"], "site": site, "channel": groups["channel"],
                     "z": int(groups["z"]) if groups.get("z") else z_default, "path": relative})
    if not rows:
        raise ValueError(f"no file in {folder} matches {pattern!r}")
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


_PLACEHOLDERS = {
    "plate": r"(?P<plate>[A-Za-z0-9_.-]+?)",
    "well": r"(?P<well>[A-Pa-p]\d{1,2})",
    "site": r"(?P<site>\d+)",
    "channel": r"(?P<channel>[A-Za-z0-9]+?)",
    "z": r"(?P<z>\d+)",
}


def pattern_to_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z]+\}|\*)", pattern)
    out = []
    for part in parts:
        if part == "*":
            out.append(".*?")
        elif part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            if name not in _PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {part} in pattern {pattern!r}; "
                                 f"use {sorted(_PLACEHOLDERS)}")
            out.append(_PLACEHOLDERS[name])
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))
