"""Running CellProfiler headless: a site's input TIFFs, the batch's LoadData CSV, the run itself
(threads capped, its output logged, failures raised as FeatureError)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tifffile

from ..allocator import allocator_tunables
from .schema import ADU_MAX, SITE_KEYS, FeatureError, site_where

REPO = Path(__file__).resolve().parents[3]
CELLPROFILER = Path(os.environ.get("BRIGHTPAINT_CELLPROFILER",
                                   REPO / ".venv-cellprofiler" / "bin" / "cellprofiler"))
# the project's CellProfiler modules (MeasureGranularitySpectrum), which the built pipelines use
PLUGINS = Path(__file__).resolve().with_name("cellprofiler_plugins")
# CellProfiler's command line with its measurements buffered in memory (run by CellProfiler's python)
BUFFERED_LAUNCHER = Path(__file__).resolve().with_name("cellprofiler_measurements.py")
PIP_SH_EXEC = "'''exec' "  # second line of pip's /bin/sh entry point: '''exec' PYTHON "$0" "$@"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
TAIL_CHARS = 4000


def _site_name(plate: str, well: str, site: int, source: str) -> str:
    return _SAFE.sub("-", f"{plate}_{well}_s{site}_{source}")


def write_site_inputs(folder: str | Path, plate: str, well: str, site: int,
                      images: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                      source: str = "") -> dict:
    """Write one site's images (uint16 TIFF, ADU clipped to 0..65535 and rounded) and label images
    (uint16 TIFF, 0 = background) into `folder`; return its LoadData row (`Metadata_Plate`,
    `Metadata_Well`, `Metadata_Site`, `Metadata_Source`, `FileName_<channel>`/`PathName_<channel>`,
    `ObjectsFileName_<objects>`/`ObjectsPathName_<objects>`). Raises ValueError naming the site for
    unusable inputs (not 2-D, shapes differ, non-finite pixels, negative or > 65535 labels)."""
    where = site_where(plate, well, site, source)
    if not images:
        raise ValueError(f"{where}: no images")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    stem = _site_name(plate, well, site, source)
    shape = None
    row = {"Metadata_Plate": str(plate), "Metadata_Well": str(well), "Metadata_Site": int(site),
           "Metadata_Source": str(source)}
    arrays = {}
    for kind, items in (("image", images), ("labels", labels)):
        for name, array in items.items():
            array = np.asarray(array)
            if array.ndim != 2 or 0 in array.shape:
                raise ValueError(f"{where}: {kind} {name!r} must be a non-empty 2-D array, got "
                                 f"shape {array.shape}")
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                raise ValueError(f"{where}: {kind} {name!r} has shape {array.shape}, not {shape} "
                                 "like the others")
            if kind == "image":
                if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
                    raise ValueError(f"{where}: image {name!r} has non-finite or non-numeric pixels")
                arrays[("image", name)] = np.rint(np.clip(array, 0, ADU_MAX)).astype(np.uint16)
            else:
                if not np.issubdtype(array.dtype, np.integer):
                    raise ValueError(f"{where}: labels {name!r} must be integers, got {array.dtype}")
                if array.min() < 0 or array.max() > ADU_MAX:
                    raise ValueError(f"{where}: labels {name!r} must lie in 0..{ADU_MAX}, got "
                                     f"{array.min()}..{array.max()}")
                arrays[("labels", name)] = array.astype(np.uint16)
    for (kind, name), array in arrays.items():
        file_name = f"{stem}_{_SAFE.sub('-', name)}{'_labels' if kind == 'labels' else ''}.tif"
        tifffile.imwrite(folder / file_name, array)
        prefix = "" if kind == "image" else "Objects"
        row[f"{prefix}FileName_{name}"] = file_name
        row[f"{prefix}PathName_{name}"] = str(folder)
    return row


def write_loaddata(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Write LoadData rows (from `write_site_inputs`) as one CSV; all rows need the same columns."""
    if not rows:
        raise ValueError("no LoadData rows to write")
    columns = list(rows[0])
    for row in rows[1:]:
        if set(row) != set(columns):
            site = site_where(*(row.get(k) for k in SITE_KEYS[:3]))
            raise ValueError(f"LoadData rows differ in columns: {sorted(set(row) ^ set(columns))} "
                             f"({site})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def thread_environment(threads: int = 1) -> dict[str, str]:
    """This process's environment with every numerical library capped at `threads` threads."""
    return {**os.environ, **{name: str(int(threads)) for name in THREAD_VARIABLES}}


def cellprofiler_environment(threads: int = 1) -> dict[str, str]:
    """`thread_environment(threads)` with glibc's allocator tunables (`allocator.allocator_tunables`:
    at 2160 px, CellProfiler took a quarter less CPU time with them)."""
    env = thread_environment(threads)
    env["GLIBC_TUNABLES"] = allocator_tunables(env.get("GLIBC_TUNABLES", ""))
    return env


def run_cellprofiler(pipeline: str | Path, loaddata_csv: str | Path, out_dir: str | Path,
                     cellprofiler: str | Path = CELLPROFILER, threads: int = 1,
                     log: str | Path | None = None, timeout: float | None = None,
                     append_log: bool = False, buffered: bool = True) -> Path:
    """Run a pipeline headless on every row of a LoadData CSV, writing its CSVs into `out_dir`,
    with CellProfiler's measurements buffered in memory (`cellprofiler_command`) unless `buffered`
    is False.
    CellProfiler's output goes to `log` (if given; added to its end with `append_log`); a non-zero
    exit, a timeout, or a missing executable raises FeatureError quoting the end of that output."""
    pipeline, loaddata_csv = Path(pipeline).resolve(), Path(loaddata_csv).resolve()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, what in ((pipeline, "pipeline"), (loaddata_csv, "LoadData CSV")):
        if not path.is_file():
            raise FeatureError(f"CellProfiler {what} {path} does not exist")
    if not Path(cellprofiler).is_file():
        raise FeatureError(f"CellProfiler executable {cellprofiler} does not exist (build the "
                           "environment .venv-cellprofiler, see envs/)")
    (out_dir / "Image.csv").unlink(missing_ok=True)  # so that a stale one is never read as this run's
    with tempfile.TemporaryDirectory(prefix="cellprofiler-", dir=out_dir) as temporary:
        start = cellprofiler_command(cellprofiler) if buffered else [str(cellprofiler)]
        command = [*start, "-c", "-r", "-p", str(pipeline),
                   "--data-file", str(loaddata_csv),
                   "-o", str(out_dir), "-i", str(loaddata_csv.parent), "-t", temporary,
                   "--plugins-directory", str(PLUGINS), "-L", "WARNING", "-e", "imageio_reader"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                    env=cellprofiler_environment(threads), stdin=subprocess.DEVNULL)
            output, code = result.stdout + result.stderr, result.returncode
        except subprocess.TimeoutExpired as error:
            output = _text(error.stdout) + _text(error.stderr)
            code = f"a timeout after {timeout} s"
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a" if append_log else "w") as handle:
            handle.write(" ".join(command) + "\n" + output)
    if code != 0:
        raise FeatureError(f"CellProfiler failed ({code if isinstance(code, str) else f'exit {code}'}) "
                           f"on {loaddata_csv}:\n...{output[-TAIL_CHARS:]}")
    if not (out_dir / "Image.csv").is_file():
        raise FeatureError(f"CellProfiler wrote no Image.csv into {out_dir}:\n...{output[-TAIL_CHARS:]}")
    return out_dir


def cellprofiler_command(cellprofiler: str | Path) -> list[str]:
    """How to start CellProfiler: its executable's own Python interpreter running
    `cellprofiler_measurements.py` (the same command line, measurements buffered in memory) when the
    executable is a Python entry-point script (a pip or conda install), else the executable itself."""
    try:
        with open(cellprofiler, "rb") as handle:
            head = [handle.readline(4096).decode(errors="replace") for _ in range(2)]
    except OSError:
        return [str(cellprofiler)]
    words = head[0][2:].split() if head[0].startswith("#!") else []
    if words == ["/bin/sh"] and head[1].startswith(PIP_SH_EXEC):
        # pip's entry point when the interpreter's path is too long for a #! line
        words = head[1].split()[1:2]
    if len(words) == 1 and "python" in Path(words[0]).name and Path(words[0]).is_file():
        return [words[0], str(BUFFERED_LAUNCHER)]
    return [str(cellprofiler)]


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
