"""Compare two workflow runs' results, file by file: are the outputs the same?

    python bench/compare_runs.py BEFORE/results AFTER/results [--rtol 1e-6] [--atol 1e-6] [--out F.json]

Every table (parquet, csv, tsv), array (npy, zarr arrays), JSON document and other file under the two
results folders is compared: `identical` (same bytes, or for stores and tables the same values),
`equal` (numbers within rtol/atol, the largest difference reported), `different` (with where), or
present in one run only. What differs between any two runs of the same code is left out and said
so: logs, benchmarks, run times (columns and keys named like seconds / time / host / commit),
rendered HTML and PNG figures (compared by their source tables instead), and model files whose
bytes carry their own metadata (their weights are compared as arrays where they are safetensors).
The JSON (stdout and --out) lists every file with its status and a summary by stage folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from report_json import emit

SKIPPED_FOLDERS = {"logs", "benchmarks", "shards"}
SKIPPED_SUFFIXES = {".html", ".png", ".log", ".pt", ".pth"}
# run-to-run noise in otherwise equal tables and documents: durations, hosts, commits, paths (a
# run's absolute image paths), dates
VOLATILE = re.compile(r"(^|_)(seconds|time|duration|elapsed|host|hostname|commit|created|date|when|"
                      r"started|finished|path|paths|file|runtime|cpu|rss|memory)($|_)", re.I)


def volatile(name: str) -> bool:
    return bool(VOLATILE.search(str(name)))


def compare_arrays(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> tuple[str, str]:
    if a.shape != b.shape:
        return "different", f"shape {a.shape} vs {b.shape}"
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        same_nan = np.array_equal(np.isnan(a64), np.isnan(b64))
        if same_nan and np.array_equal(a64, b64, equal_nan=True):
            return "identical", ""
        finite = np.isfinite(a64) & np.isfinite(b64)
        diff = np.abs(a64[finite] - b64[finite])
        worst = float(diff.max()) if diff.size else 0.0
        ok = same_nan and np.allclose(a64[finite], b64[finite], rtol=rtol, atol=atol)
        return ("equal" if ok else "different"), f"max |diff| {worst:.3g}"
    if np.array_equal(a, b):
        return "identical", ""
    return "different", f"{int(np.sum(a != b))} of {a.size} values differ"


def compare_tables(a: pd.DataFrame, b: pd.DataFrame, rtol: float, atol: float) -> tuple[str, str]:
    a = a[[c for c in a.columns if not volatile(c)]]
    b = b[[c for c in b.columns if not volatile(c)]]
    if list(a.columns) != list(b.columns):
        return "different", f"columns differ: {sorted(set(a.columns) ^ set(b.columns))[:8]}"
    if len(a) != len(b):
        return "different", f"{len(a)} vs {len(b)} rows"
    worst, status, where = 0.0, "identical", ""
    for column in a.columns:
        x, y = a[column].reset_index(drop=True), b[column].reset_index(drop=True)
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            result, detail = compare_arrays(x.to_numpy(np.float64), y.to_numpy(np.float64), rtol, atol)
            if result == "different":
                return "different", f"column {column}: {detail}"
            if result == "equal":
                status = "equal"
                value = float(detail.split()[-1])
                if value >= worst:
                    worst, where = value, f"column {column}: {detail}"
        elif not x.astype(str).equals(y.astype(str)):
            differ = int((x.astype(str) != y.astype(str)).sum())
            return "different", f"column {column}: {differ} values differ"
    return status, where


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", keep_default_na=False)


def strip_volatile(value):
    if isinstance(value, dict):
        return {k: strip_volatile(v) for k, v in value.items() if not volatile(k)}
    if isinstance(value, list):
        return [strip_volatile(v) for v in value]
    return value


def compare_json(a, b, rtol: float, atol: float, where: str = "") -> tuple[str, str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return "different", f"{where or '/'}: keys {sorted(set(a) ^ set(b))[:8]}"
        status, detail = "identical", ""
        for key in a:
            result = compare_json(a[key], b[key], rtol, atol, f"{where}/{key}")
            if result[0] == "different":
                return result
            if result[0] == "equal":
                status, detail = result
        return status, detail
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return "different", f"{where}: {len(a)} vs {len(b)} items"
        status, detail = "identical", ""
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            result = compare_json(x, y, rtol, atol, f"{where}[{i}]")
            if result[0] == "different":
                return result
            if result[0] == "equal":
                status, detail = result
        return status, detail
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        if a == b:
            return "identical", ""
        ok = bool(np.isclose(a, b, rtol=rtol, atol=atol))
        return ("equal" if ok else "different"), f"{where}: {a} vs {b}"
    return ("identical", "") if a == b else ("different", f"{where}: {str(a)[:60]} vs {str(b)[:60]}")


def zarr_arrays(store: Path) -> dict[str, zarr.Array]:
    root = zarr.open_group(store, mode="r")
    return {path: array for path, array in root.arrays()} | {
        f"{group_path}/{path}": array
        for group_path, group in root.groups()
        for path, array in _walk(group)}


def _walk(group: zarr.Group):
    for path, array in group.arrays():
        yield path, array
    for name, child in group.groups():
        for path, array in _walk(child):
            yield f"{name}/{path}", array


def compare_store(a: Path, b: Path, rtol: float, atol: float) -> tuple[str, str]:
    arrays_a, arrays_b = zarr_arrays(a), zarr_arrays(b)
    if set(arrays_a) != set(arrays_b):
        return "different", f"arrays {sorted(set(arrays_a) ^ set(arrays_b))[:6]}"
    status, detail = "identical", ""
    for name in sorted(arrays_a):
        result = compare_arrays(arrays_a[name][...], arrays_b[name][...], rtol, atol)
        if result[0] == "different":
            return "different", f"{name}: {result[1]}"
        if result[0] == "equal":
            status, detail = "equal", f"{name}: {result[1]}"
    return status, detail


def compare_file(a: Path, b: Path, rtol: float, atol: float) -> tuple[str, str]:
    if a.read_bytes() == b.read_bytes():
        return "identical", ""
    if a.suffix in {".parquet", ".csv", ".tsv"}:
        return compare_tables(read_table(a), read_table(b), rtol, atol)
    if a.suffix == ".npy":
        return compare_arrays(np.load(a), np.load(b), rtol, atol)
    if a.suffix == ".json":
        return compare_json(strip_volatile(json.loads(a.read_text())),
                            strip_volatile(json.loads(b.read_text())), rtol, atol)
    if a.suffix == ".safetensors":
        from safetensors.numpy import load_file  # only for model files

        x, y = load_file(a), load_file(b)
        if set(x) != set(y):
            return "different", "tensor names differ"
        results = [compare_arrays(x[k], y[k], rtol, atol) for k in sorted(x)]
        bad = [r for r in results if r[0] == "different"]
        return bad[0] if bad else (("equal", "weights within tolerance")
                                   if any(r[0] == "equal" for r in results) else ("identical", "weights"))
    return "different", "bytes differ"


def entries(root: Path) -> dict[str, Path]:
    """Relative path -> path of every compared entry: files, and zarr stores as one entry each."""
    found: dict[str, Path] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        for path in sorted(folder.iterdir()):
            if path.name in SKIPPED_FOLDERS or path.name.startswith("."):
                continue
            if path.is_dir():
                if path.suffix == ".zarr":
                    found[str(path.relative_to(root))] = path
                else:
                    stack.append(path)
            elif path.suffix not in SKIPPED_SUFFIXES:
                found[str(path.relative_to(root))] = path
    return found


def compare_runs(before: Path, after: Path, rtol: float, atol: float) -> dict:
    a, b = entries(before), entries(after)
    files = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            status, detail = "only_before", ""
        elif name not in a:
            status, detail = "only_after", ""
        elif a[name].is_dir():
            status, detail = compare_store(a[name], b[name], rtol, atol)
        else:
            try:
                status, detail = compare_file(a[name], b[name], rtol, atol)
            except Exception as err:  # a file one run cannot read is a difference, not a crash
                status, detail = "different", f"unreadable: {err}"
        files.append({"file": name, "status": status, "detail": detail})
    table = pd.DataFrame(files)
    table["stage"] = table["file"].map(stage_of)
    summary = table.groupby(["stage", "status"]).size().unstack(fill_value=0)
    return {"before": str(before), "after": str(after), "rtol": rtol, "atol": atol,
            "skipped": sorted(SKIPPED_FOLDERS | SKIPPED_SUFFIXES),
            "counts": table["status"].value_counts().to_dict(),
            "by_stage": {stage: row.to_dict() for stage, row in summary.iterrows()},
            "files": files}


def stage_of(name: str) -> str:
    parts = Path(name).parts
    if parts[0] == "plates" and len(parts) > 2:
        return parts[2] if len(parts) > 3 else Path(parts[2]).stem
    return parts[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = compare_runs(args.before, args.after, args.rtol, args.atol)
    emit(report, args.out)
    return 0 if not report["counts"].get("different") else 1


if __name__ == "__main__":
    sys.exit(main())
