"""CellProfiler's per-object CSVs into one row per cell and one row per site (see the package
docstring), and the tables of several runs (shards) stacked, in memory or parquet file by file."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile

from .schema import OBJECT_KEY, OBJECTS, SITE_KEYS, FeatureError

IMAGE_FEATURE_PREFIXES = ("Count_", "ImageQuality_", "Granularity_", "Texture_", "Intensity_",
                          "Correlation_", "Threshold_")
_POSITION = re.compile(r"^AreaShape_(Center|BoundingBoxMinimum|BoundingBoxMaximum)_[XYZ]$")
_NEIGHBOUR_NUMBER = re.compile(r"^Neighbors_(First|Second)ClosestObjectNumber_")
_DROPPED = re.compile(r"^(ImageNumber|ObjectNumber|Number_Object_Number|Location_.*)$")


# CellProfiler's bookkeeping columns, read as text. A file's MD5 digest such as
# "94e80911345122afdc..." starts like a float with an 11-digit exponent, and pandas' C parser
# (2.3.3) crashes the process on such a token while it tries numbers (a segfault, pandas-dev/pandas
# #63089; it killed a demo features job); a plate "001" must stay "001".
_TEXT_COLUMNS = re.compile(r"^(Metadata|FileName|PathName|URL|MD5Digest|ObjectsFileName|ObjectsPathName|"
                           r"ObjectsURL)_")


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        header = pd.read_csv(path, nrows=0, dtype=str).columns
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    return pd.read_csv(path, low_memory=False, dtype={c: str for c in header if _TEXT_COLUMNS.match(c)})


def _site_metadata(image: pd.DataFrame) -> pd.DataFrame:
    meta = image[["ImageNumber", *SITE_KEYS]].copy()
    for key in ("Metadata_Plate", "Metadata_Well", "Metadata_Source"):
        meta[key] = meta[key].fillna("").astype(str)
    meta["Metadata_Site"] = meta["Metadata_Site"].astype(int)
    return meta


def _label_values(image: pd.DataFrame, objects: str) -> dict[int, np.ndarray]:
    """ImageNumber -> the sorted non-zero label values of that site's `objects` image: CellProfiler's
    object k is the k-th of them."""
    values = {}
    for row in image[["ImageNumber", f"ObjectsPathName_{objects}",
                      f"ObjectsFileName_{objects}"]].itertuples(index=False):
        path = Path(row[1]) / row[2]
        if not path.is_file():
            raise FeatureError(f"label image {path} (ImageNumber {row[0]}, {objects}) is gone: "
                               "CellProfiler's object numbers cannot be mapped to label values")
        present = np.unique(tifffile.imread(path))
        values[int(row[0])] = present[present > 0].astype(np.int64)
    return values


def _to_labels(image_numbers: pd.Series, numbers: pd.Series,
               values: dict[int, np.ndarray]) -> pd.Series:
    """CellProfiler object numbers (1..n per image, 0/NaN = none) -> label values (NaN = none)."""
    out = np.full(len(numbers), np.nan)
    numbers = pd.to_numeric(numbers, errors="coerce").to_numpy()
    for i, (image_number, number) in enumerate(zip(image_numbers.to_numpy(), numbers, strict=True)):
        table = values.get(int(image_number))
        if table is not None and np.isfinite(number) and 1 <= number <= len(table):
            out[i] = table[int(number) - 1]
    return pd.Series(out, index=image_numbers.index)


def _object_table(out_dir: Path, objects: str, image: pd.DataFrame) -> pd.DataFrame | None:
    path = out_dir / f"{objects}.csv"
    if not path.is_file():
        return None
    table = _read_csv(path)
    if table.empty:
        return pd.DataFrame({"ImageNumber": pd.Series(dtype=np.int64),
                             OBJECT_KEY: pd.Series(dtype=np.int64)})
    values = _label_values(image, objects)
    labels = _to_labels(table["ImageNumber"], table["ObjectNumber"], values)
    if labels.isna().any():
        raise FeatureError(f"{path}: {int(labels.isna().sum())} object numbers beyond the label "
                           "images' objects (were the label files changed after the run?)")
    out = {"ImageNumber": table["ImageNumber"].astype(int), OBJECT_KEY: labels.astype(np.int64)}
    for column in table.columns:
        if _DROPPED.match(column):
            continue
        if _POSITION.match(column):
            out[f"Metadata_{objects}_{column}"] = table[column]
        elif _NEIGHBOUR_NUMBER.match(column):
            out[f"Metadata_{objects}_{column}"] = _to_labels(table["ImageNumber"], table[column],
                                                             values).astype("Int64")
        else:
            out[f"{objects}_{column}"] = table[column]
    return pd.DataFrame(out)


def read_object_tables(out_dir: str | Path, loaddata: str | Path | None = None,
                       objects: Sequence[str] = OBJECTS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ExportToSpreadsheet's CSVs in `out_dir` into (cells, images): one row per cell (its
    compartments joined on site and label value) and one row per site (see the module docstring).
    With the run's `loaddata` CSV, site metadata and label files come from it (row i = ImageNumber
    i, metadata kept as text: CellProfiler turns a plate "001" into 1); else from Image.csv."""
    out_dir = Path(out_dir)
    image = _read_csv(out_dir / "Image.csv") if (out_dir / "Image.csv").is_file() else None
    if image is None:
        raise FeatureError(f"{out_dir}: no Image.csv (did CellProfiler run?)")
    if image.empty:
        return (pd.DataFrame(columns=[*SITE_KEYS, OBJECT_KEY]), pd.DataFrame(columns=SITE_KEYS))
    if loaddata is not None:
        rows = pd.read_csv(loaddata, dtype=str, keep_default_na=False)
        if len(rows) != len(image):
            raise FeatureError(f"{loaddata} has {len(rows)} rows but {out_dir / 'Image.csv'} "
                               f"{len(image)} images")
        rows.insert(0, "ImageNumber", np.arange(1, len(rows) + 1))
        image = image.drop(columns=[c for c in rows.columns if c != "ImageNumber"], errors="ignore")
        image = image.merge(rows, on="ImageNumber", how="left")
    missing = [key for key in ["ImageNumber", *SITE_KEYS] if key not in image.columns]
    if missing:
        raise FeatureError(f"{out_dir / 'Image.csv'}: no column(s) {missing}")
    meta = _site_metadata(image)
    features = [c for c in image.columns if c.startswith(IMAGE_FEATURE_PREFIXES)]
    images = pd.concat([meta, image[features].add_prefix("Image_")], axis=1)

    cells = None
    for name in objects:
        table = _object_table(out_dir, name, image)
        if table is None:
            continue
        cells = table if cells is None else cells.merge(table, on=["ImageNumber", OBJECT_KEY],
                                                        how="outer")
    if cells is None:
        cells = pd.DataFrame(columns=["ImageNumber", OBJECT_KEY])
    cells = meta.merge(cells, on="ImageNumber", how="inner")
    cells[OBJECT_KEY] = cells[OBJECT_KEY].astype(np.int64)
    metadata = [c for c in cells.columns if c.startswith("Metadata_") and c not in SITE_KEYS
                and c != OBJECT_KEY]
    rest = [c for c in cells.columns if not c.startswith("Metadata_") and c != "ImageNumber"]
    cells = (cells[[*SITE_KEYS, OBJECT_KEY, *metadata, *rest]]
             .sort_values([*SITE_KEYS, OBJECT_KEY], kind="stable").reset_index(drop=True))
    images = images.drop(columns="ImageNumber").sort_values(SITE_KEYS, kind="stable")
    return cells, images.reset_index(drop=True)


def concat_tables(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Stack cell or image tables of several runs (shards): columns in order of first appearance
    (a run with no cells has only the key columns), rows sorted by site (and object)."""
    tables = [t for t in tables if t is not None]
    if not tables:
        return pd.DataFrame(columns=SITE_KEYS)
    columns = list(dict.fromkeys(c for t in tables for c in t.columns))
    filled = [t for t in tables if len(t)]
    if not filled:
        return pd.DataFrame(columns=columns)
    table = pd.concat(filled, ignore_index=True)[columns] if len(filled) > 1 else filled[0].reindex(
        columns=columns)
    keys = [k for k in [*SITE_KEYS, OBJECT_KEY] if k in table.columns]
    return table.sort_values(keys, kind="stable").reset_index(drop=True) if keys else table


def write_concatenated(paths: Sequence[str | Path], out: str | Path, row_group_rows: int = 65536) -> int:
    """concat_tables for parquet files, written as it reads: one file in memory at a time, so a plate's
    whole cell table is never held. The files must be the shards of one plate in shard order
    (contiguous runs of the sorted wells), which makes the output sorted like concat_tables'; columns
    and dtypes are the ones pd.concat would give. Returns the number of rows written."""
    schemas = {p: pq.read_schema(p) for p in paths}
    filled = [p for p in paths if pq.ParquetFile(p).metadata.num_rows]
    columns = list(dict.fromkeys(name for schema in schemas.values() for name in schema.names)) or SITE_KEYS
    # the pandas dtypes (nullable Int64 included) stored with each shard, from its schema alone (one
    # conversion per shard: per column, ~1,000 columns made it the plate step's main cost)
    empty = {p: schemas[p].empty_table().to_pandas() for p in filled}
    dtypes = {}
    for name in columns:
        found = [empty[p][name].dtype for p in filled if name in schemas[p].names]
        if found and all(d == found[0] for d in found):
            dtype = found[0]
        elif found and all(isinstance(d, np.dtype) and d.kind in "iuf" for d in found):
            dtype = np.result_type(*found)  # int64 in one shard, float64 in another: float64
        else:
            dtype = np.dtype(object)
        if len(found) < len(filled) and isinstance(dtype, np.dtype) and dtype.kind in "iub":
            dtype = np.dtype(np.float64)  # NaN where a shard lacks the column, as in pandas
        dtypes[name] = dtype
    # arrow types of object columns: a shard whose values are all None stores type null
    unified = pa.unify_schemas([schemas[p].remove_metadata() for p in filled], promote_options="permissive"
                               ) if filled else None
    keys = [k for k in [*SITE_KEYS, OBJECT_KEY] if k in columns]
    writer, written = None, 0
    try:
        for path in filled:
            table = pd.read_parquet(path).reindex(columns=columns).astype(dtypes)
            table = table.sort_values(keys, kind="stable") if keys else table
            arrow = pa.Table.from_pandas(table, preserve_index=False)
            if writer is None:
                schema = arrow.schema
                for i, field in enumerate(schema):
                    if pa.types.is_null(field.type) and field.name in unified.names:
                        schema = schema.set(i, pa.field(field.name, unified.field(field.name).type))
                writer = pq.ParquetWriter(out, schema)
            writer.write_table(arrow.cast(writer.schema), row_group_size=row_group_rows)
            written += len(table)
        if writer is None:  # no shard has a row: the columns only
            pd.DataFrame(columns=columns).to_parquet(out, index=False)
    finally:
        if writer is not None:
            writer.close()
    return written
