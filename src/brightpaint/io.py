"""The input contract (DESIGN.md section 3): screen sheet, image manifest, LoadData CSV, plate map.

Readers return tidy pandas tables and never guess silently: every problem found in a user's files is
collected as a `Problem` that names the file, well, site, channel and z it concerns, and all of them are
raised together in one `InputError`, so a user fixes a sheet in one go instead of one error per run.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from .errors import UserError

SHEET_COLUMNS = ["plate", "manifest", "platemap", "batch", "cell_type", "role"]
# optional sheet columns and the value every plate gets when the sheet has no such column: one
# batch (NSCB matching then says it needs two), one cell type
SHEET_DEFAULTS = {"batch": "unspecified", "cell_type": "unspecified"}
MANIFEST_COLUMNS = ["plate", "well", "site", "channel", "z", "path"]
PLATEMAP_COLUMNS = ["well", "perturbation", "dose", "control_type", "moa", "target"]
# optional plate-map columns, empty in every well when absent: a screen without doses (a treatment
# is then its perturbation), without MoA or target annotations (matching says it has none)
PLATEMAP_OPTIONAL = ("dose", "moa", "target")
ROLES = ("train", "apply", "both")
CONTROL_TYPES = ("negcon", "poscon", "trt")
# control_type values as a plate map may write them, per type (config `platemap.control_types`);
# the readers turn them into the types and keep the written value as `control_label`
DEFAULT_CONTROL_LABELS = {t: [t] for t in CONTROL_TYPES}
IMAGE_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32"))
PLATE_ROWS = "ABCDEFGHIJKLMNOP"  # a 384-well plate: rows A-P, columns 1-24
PLATE_COLUMNS = 24
NON_IMAGE_SUFFIXES = (".npy", ".mat")

_WELL = re.compile(r"^([A-Pa-p])0*([1-9][0-9]?)$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a user's input, located as precisely as the input allows: the file and
    its line, or, for an image, the manifest row that names it (`named_at`)."""

    file: str
    message: str
    well: str | None = None
    site: int | None = None
    channel: str | None = None
    z: int | None = None
    kind: str = "error"
    line: int | None = None
    named_at: str | None = None

    def __str__(self) -> str:
        where = [self.file + (f" (line {self.line})" if self.line is not None else "")
                 + (f" (named at {self.named_at})" if self.named_at else "")]
        if self.well is not None:
            where.append(f"well {self.well}")
        if self.site is not None:
            where.append(f"site {self.site}")
        if self.channel is not None:
            where.append(f"channel {self.channel}")
        if self.z is not None:
            where.append(f"z {self.z}")
        return f"{', '.join(where)}: {self.message}"


class InputError(UserError):
    """Everything wrong with an input, listed at once."""

    def __init__(self, problems: list[Problem], what: str = "input"):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) in {what}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


# Plate ids and channel names become file and folder names (results/plates/<plate>/illum/<channel>.npy):
# one rule for both keeps every such path inside its folder. A first character that is a letter, digit
# or underscore rules out '.', '..', hidden names and names an argument parser reads as an option.
NAME_MAX_LENGTH = 64
NAME_RULE = (f"1 to {NAME_MAX_LENGTH} letters, digits, _ . -, starting with a letter, digit or _")
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{NAME_MAX_LENGTH - 1}}}")


def name_problem(name: object, what: str) -> str | None:
    """Why `name` (a plate id or channel name, `what` says which) cannot name a file, or None."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return None
    shown = name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "..."
    return f"{what} {shown!r} is not a valid name: {NAME_RULE}"


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
    """A delimited text table, every field as text (ids like plate '001' or well 'A01' must not become
    numbers), indexed by each row's line number in the file, so that problems name the right line
    after blank lines or quoted line breaks. Blank lines are skipped; a row with more or fewer fields
    than the header (a delimiter at the end of a line, say) is a problem naming its line."""
    if not path.is_file():
        raise InputError([Problem(str(path), f"{what} not found")], what)
    problems, rows, lines = [], [], []
    miscounted: dict[int, list[int]] = {}  # number of fields -> lines with that many (not the header's)
    header: list[str] | None = None
    header_line = 1
    try:
        # utf-8-sig: spreadsheet programs often write a byte-order mark first
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=sep)
            start = 1
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                if header is None:
                    header, header_line = [name.strip() for name in fields], line
                    continue
                if len(fields) != len(header):
                    miscounted.setdefault(len(fields), []).append(line)
                    continue
                rows.append(fields)
                lines.append(line)
    except (UnicodeDecodeError, csv.Error) as err:
        where = {"line": start} if header is not None else {}
        raise InputError([Problem(str(path), f"cannot parse {what}: {err}", **where)], what) from err
    if header is None:
        raise InputError([Problem(str(path), f"{what} is empty (no header line)")], what)
    for count, bad in sorted(miscounted.items()):
        # one problem per kind: a delimiter at the end of every line must not give 30,000 problems
        extra = " (a delimiter at the end of the line?)" if count > len(header) else ""
        more = f"; so do {len(bad) - 1} more row(s), the last at line {bad[-1]}" if len(bad) > 1 else ""
        problems.append(Problem(str(path), f"{count} fields, the header has {len(header)}{extra}"
                                           f"{more}", line=bad[0]))
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        problems.append(Problem(str(path), f"column(s) {duplicated} appear more than once",
                                line=header_line))
    if problems:
        raise InputError(problems, what)
    return pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"), dtype=str)


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
    problems = _missing_columns(df, [c for c in SHEET_COLUMNS if c not in SHEET_DEFAULTS], path)
    if problems:
        raise InputError(problems, "screen sheet")
    for column, value in SHEET_DEFAULTS.items():
        if column not in df.columns:
            df[column] = value
    root = path.parent.resolve()
    df = df[SHEET_COLUMNS].apply(lambda col: col.str.strip())
    if df.empty:
        raise InputError([Problem(str(path), "no plate: the sheet has a header but no plate rows")],
                         "screen sheet")
    for plate, count in df["plate"].value_counts().items():
        if count > 1:
            lines = [int(i) for i in df.index[df["plate"] == plate]]
            problems.append(Problem(str(path), f"plate id {plate!r} appears {count} times (lines "
                                               f"{', '.join(map(str, lines))})"))
    for line, row in df.iterrows():
        where = {"file": str(path), "line": int(line)}
        bad_id = name_problem(row["plate"], "plate id")
        if bad_id:
            problems.append(Problem(message=bad_id, **where))
        if row["role"] not in ROLES:
            problems.append(Problem(message=f"plate {row['plate']!r}: role {row['role']!r} is not "
                                            f"one of {ROLES}", **where))
        for column in ("manifest", "platemap"):
            bad_path = path_text_problem(row[column])
            resolved = None if bad_path else resolve_inside(root, row[column], root)
            if bad_path:
                problems.append(Problem(message=f"plate {row['plate']!r}: {column} {bad_path}",
                                        **where))
            elif resolved is None:
                problems.append(Problem(message=f"plate {row['plate']!r}: {column} path "
                                                f"{row[column]!r} leaves the screen folder {root}",
                                        **where))
            elif not resolved.is_file():
                problems.append(Problem(message=f"plate {row['plate']!r}: {column} file {resolved} "
                                                "not found", **where))
            else:
                df.loc[line, column] = str(resolved)
    if problems:
        raise InputError(problems, "screen sheet")
    return df.reset_index(drop=True)


def path_text_problem(text: str) -> str | None:
    """Why a path written in a table cannot be a file name at all (before it is resolved), or None."""
    if not text:
        return "path is empty"
    if "\x00" in text:
        return "path contains a NUL character"
    if len(text) > 4096:
        return f"path is {len(text)} characters long (at most 4096)"
    return None


def is_loaddata(df: pd.DataFrame) -> bool:
    return any(c.startswith("FileName_") for c in df.columns)


def loaddata_to_manifest(df: pd.DataFrame, source: Path) -> pd.DataFrame:
    """Convert a CellProfiler LoadData table (FileName_X / PathName_X per channel X) to a manifest.

    Metadata_Plate, Metadata_Well and Metadata_Site name the site; an optional Metadata_Z (or
    Metadata_Plane) gives the z index of brightfield planes stored one row per plane. PathName may be
    absolute or relative to the CSV; the manifest's paths are relative to the CSV's folder. Each
    manifest row keeps the index (the line number, from `_read_table`) of the LoadData row it came from.
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
    rows, lines = [], []
    for line, row in df.iterrows():
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
            lines.append(line)
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS, index=pd.Index(lines, name="line"))


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
    if df.empty:
        raise InputError([Problem(str(path), "no image rows (the manifest has a header only)")],
                         "image manifest")
    root = Path(root).resolve() if root is not None else path.parent.resolve()
    base = path.parent.resolve()
    files, wells, sites, zs = [], [], [], []
    for line, row in df.iterrows():
        where = {"file": str(path), "line": int(line)}
        well = normalise_well(row["well"])
        if well is None:
            problems.append(Problem(message=f"well {row['well']!r} is not a 384-well plate well "
                                            "(A01..P24)", **where))
        site = _as_int(row["site"], minimum=1)
        if site is None:
            problems.append(Problem(message=f"site {_shown(row['site'])} is not an integer from 1 "
                                            f"to {MAX_INDEX}", well=well, **where))
        z = _as_int(row["z"], minimum=0)
        if z is None:
            problems.append(Problem(message=f"z {_shown(row['z'])} is not an integer from 0 to "
                                            f"{MAX_INDEX}", well=well, site=site, **where))
        bad_channel = name_problem(row["channel"], "channel")
        if bad_channel:
            problems.append(Problem(message=bad_channel, well=well, site=site, **where))
        bad_plate = name_problem(row["plate"], "plate id")
        if bad_plate and plate is None:  # with the sheet's id given, any other id is named below
            problems.append(Problem(message=bad_plate, **where))
        bad_path = path_text_problem(row["path"])
        resolved = None if bad_path else resolve_inside(base, row["path"], root)
        if bad_path:
            problems.append(Problem(message=bad_path, well=well, site=site, z=z, **where))
        elif resolved is None:
            problems.append(Problem(message=f"path {row['path']!r} leaves the screen folder {root}",
                                    well=well, site=site, channel=row["channel"], z=z, **where))
        files.append(str(resolved) if resolved else "")
        wells.append(well)
        sites.append(site)
        zs.append(z)
    df["well"], df["site"], df["z"], df["file"] = wells, sites, zs, files
    if plate is not None:
        for other, rows in df[df["plate"] != plate].groupby("plate"):
            problems.append(Problem(str(path), f"plate id {_shown(other)} on {len(rows)} row(s) "
                                               f"(first: line {int(rows.index[0])}); the screen "
                                               f"sheet expects only {plate!r}"))
    if not problems:
        key = ["plate", "well", "site", "channel", "z"]
        for _, dup in df[df.duplicated(key, keep=False)].groupby(key):
            first = dup.iloc[0]
            problems.append(Problem(str(path), f"{len(dup)} rows for the same image (lines "
                                               f"{', '.join(str(int(i)) for i in dup.index)}): "
                                               f"{list(dup['path'])}", well=first["well"],
                                    site=int(first["site"]), channel=first["channel"],
                                    z=int(first["z"])))
    if problems:
        raise InputError(problems, "image manifest")
    df["site"] = df["site"].astype(int)
    df["z"] = df["z"].astype(int)
    # the manifest line of every image travels with it: later problems (headers, pixels) name it
    df["line"] = [int(i) for i in df.index]
    return df.sort_values(["well", "site", "channel", "z"]).reset_index(drop=True)


# Sites and z are stored as 32-bit integers downstream; a larger number is a typing error.
MAX_INDEX = 2**31 - 1


def _as_int(text: str, minimum: int, maximum: int = MAX_INDEX) -> int | None:
    """An integer written as digits (or digits and '.0': spreadsheets write 1.0), within bounds."""
    if not re.fullmatch(r"[0-9]{1,12}(\.0*)?", text):
        return None
    value = int(text.split(".")[0])
    return value if minimum <= value <= maximum else None


def _shown(text: str, limit: int = 40) -> str:
    """A field as a message shows it: quoted, cut short when long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def control_label_problem(control_labels: dict) -> str | None:
    """Why a `platemap.control_types` mapping cannot be used, or None."""
    unknown = sorted(set(control_labels) - set(CONTROL_TYPES))
    if unknown:
        return f"platemap.control_types: {unknown} are not control types {CONTROL_TYPES}"
    seen: dict[str, str] = {}
    for kind, labels in control_labels.items():
        for label in labels:
            if str(label) in seen and seen[str(label)] != kind:
                return (f"platemap.control_types: {str(label)!r} is listed under both "
                        f"{seen[str(label)]} and {kind}")
            seen[str(label)] = kind
    return None


def read_platemap(path: str | Path, control_labels: dict | None = None) -> pd.DataFrame:
    """Read a plate map: one row per well, control_type one of `control_labels`' values, numeric dose.

    `control_labels` maps each control type (negcon, poscon, trt) to the control_type values the
    plate maps write for it (config `platemap.control_types`, e.g. negcon: [ctl_vehicle]); the
    table comes back with the type in `control_type` and the written value in `control_label`.
    A value listed under no type is an error naming the well (a typo is never a treatment).

    dose, moa and target are optional columns (empty when absent). moa and target may be empty
    (controls, unannotated compounds); dose may be empty for controls, never for treated wells of a
    plate map that has doses, and is a finite number where given.
    """
    path = Path(path)
    labels = {**DEFAULT_CONTROL_LABELS, **(control_labels or {})}
    bad_labels = control_label_problem(labels)
    if bad_labels:
        raise UserError(bad_labels)
    kind_of = {str(label): kind for kind, names in labels.items() for label in names}
    df = _read_table(path, ",", "plate map")
    has_dose = "dose" in df.columns
    problems = _missing_columns(df, [c for c in PLATEMAP_COLUMNS if c not in PLATEMAP_OPTIONAL], path)
    if problems:
        raise InputError(problems, "plate map")
    for column in PLATEMAP_OPTIONAL:
        if column not in df.columns:
            df[column] = ""
    df = df[PLATEMAP_COLUMNS].apply(lambda col: col.str.strip())
    if df.empty:
        raise InputError([Problem(str(path), "no wells (the plate map has a header only)")],
                         "plate map")
    doses = []
    for line, row in df.iterrows():
        where = {"file": str(path), "line": int(line)}
        well = normalise_well(row["well"])
        if well is None:
            problems.append(Problem(message=f"well {_shown(row['well'])} is not a 384-well plate "
                                            "well", **where))
        df.loc[line, "well"] = well
        kind = kind_of.get(row["control_type"])
        if kind is None:
            named = "; ".join(f"{k}: {v}" for k, v in labels.items())
            problems.append(Problem(message=f"control_type {_shown(row['control_type'])} is none of "
                                            f"the labels in config platemap.control_types ({named}); "
                                            "add it under its type", well=well, **where))
        dose, bad_dose = _dose(row["dose"], kind if has_dose else None)
        doses.append(dose)
        if bad_dose:
            problems.append(Problem(message=bad_dose, well=well, **where))
        if not row["perturbation"]:
            problems.append(Problem(message="empty perturbation (use e.g. DMSO for controls)",
                                    well=well, **where))
    for well, rows in df.groupby("well"):
        if well and len(rows) > 1:
            problems.append(Problem(str(path), f"well listed {len(rows)} times (lines "
                                               f"{', '.join(str(int(i)) for i in rows.index)})",
                                    well=well))
    if problems:
        raise InputError(problems, "plate map")
    df["dose"] = doses
    df["control_label"] = df["control_type"]
    df["control_type"] = df["control_type"].map(kind_of)
    return df.sort_values("well").reset_index(drop=True)


def _dose(text: str, control_type: str | None) -> tuple[float, str | None]:
    """(the dose, why it cannot be used or None): a finite number; empty only on control wells (and
    on every well of a plate map without doses: control_type None)."""
    if not text:
        if control_type == "trt":
            return np.nan, "empty dose on a treated (trt) well"
        return np.nan, None
    try:
        dose = float(text)
    except ValueError:
        return np.nan, f"dose {_shown(text)} is not a number"
    if not np.isfinite(dose):
        return np.nan, f"dose {_shown(text)} is not a finite number"
    return dose, None


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
        raise UserError(f"pattern {pattern!r} must contain {{well}} and {{channel}}")
    if plate is None and "plate" not in regex.groupindex:
        raise UserError("give plate= or a {plate} placeholder in the pattern")
    if plate is not None and name_problem(plate, "plate id"):
        raise UserError(name_problem(plate, "plate id"))
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"folder {folder} not found (or not a folder)")
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
        raise UserError(f"no file in {folder} matches {pattern!r}")
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
                raise UserError(f"unknown placeholder {part} in pattern {pattern!r}; "
                                 f"use {sorted(_PLACEHOLDERS)}")
            out.append(_PLACEHOLDERS[name])
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))
