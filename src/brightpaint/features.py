"""Single-cell features with CellProfiler 5, from images and label masks (main environment side).

CellProfiler lives in its own environment (`.venv-cellprofiler`: numpy < 2, no pandas, no
brightpaint); this module talks to it through files only:

1. `write_site_inputs` writes one site's channels as uint16 TIFFs (camera-like ADU, clipped to
   0..65535 and rounded; CellProfiler rescales uint16 by 1/65535, so its intensities are ADU/65535)
   and its label images as uint16 TIFFs, and returns the site's LoadData row.
2. `write_loaddata` writes the rows of a batch as one LoadData CSV.
3. `run_cellprofiler` runs the pipeline (`resources/cellprofiler/features.cppipe`, built by
   `cellprofiler_pipeline.py`) headless on the whole batch in one process -- CellProfiler takes
   ~3 s to start, so sites are batched:
       cellprofiler -c -r -p PIPE --data-file CSV -o OUT -i IN -t TMP -L WARNING -e imageio_reader
   (`-e imageio_reader` keeps Bio-Formats, which would try to download Java, out), with OMP /
   OpenBLAS / MKL / numba threads capped.
4. `read_object_tables` turns ExportToSpreadsheet's `Image.csv`, `Nuclei.csv`, `Cells.csv`,
   `Cytoplasm.csv` into one row per cell and one row per site.
5. `extract_features` does all of it for a list of sites and reports the sites it could not use.
   With a tiled pipeline beside the site-by-site one (the workflow's default: SITE_PIPELINE and
   TILED_PIPELINE, the two halves of PIPELINE), the per-object modules that see only the object's
   own pixels run on tiles of several sites (`tile_sites`, `untile_cells`, `join_parts`), because
   CellProfiler's cost is mostly per image set and measurement column, not per pixel.

Tables (see `read_object_tables`):

* cells: `Metadata_Plate, Metadata_Well, Metadata_Site, Metadata_Source, Metadata_ObjectNumber`
  (the label value, shared by nucleus k, cell k and cytoplasm k), position columns moved to
  metadata (`Metadata_<Objects>_AreaShape_Center_X`, ..._BoundingBoxMinimum_X, ...), neighbour
  object numbers as label values in metadata (`Metadata_Cells_Neighbors_FirstClosestObjectNumber_
  Adjacent`, ...), then every feature as CellProfiler names it with the object prefix
  (`Nuclei_AreaShape_Area`, `Cells_Intensity_MeanIntensity_DNA`, `Cytoplasm_Texture_..._3_00_256`).
  Dropped: ImageNumber, ObjectNumber (replaced), `Number_Object_Number`, and `Location_*`
  (`Location_Center_*` repeats AreaShape_Center; CenterMassIntensity / MaxIntensity locations are
  absolute pixel positions, not features). Compartments are joined on (site, label value) with an
  outer join: a cell lacking a compartment (a cell that is all nucleus has no cytoplasm) keeps its
  row with NaN for that compartment's features.
* images: the same site metadata, then `Image_<feature>` for CellProfiler's per-image
  measurements of the kinds `Count_`, `ImageQuality_`, `Granularity_`, `Texture_`, `Intensity_`,
  `Correlation_`, `Threshold_` (file names, MD5s, execution times and the per-image object
  aggregates Mean_/Median_/Min_/Max_/StDev_ are left out).

CellProfiler numbers the objects of a label image 1..n in the order of their label values (its
loader renumbers every label image that way), so ObjectNumber is mapped back to our label value
through the label files the Image table names; the label files must still exist when the tables are
read (they do inside `extract_features`).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile

REPO = Path(__file__).resolve().parents[2]
CELLPROFILER = Path(os.environ.get("BRIGHTPAINT_CELLPROFILER",
                                   REPO / ".venv-cellprofiler" / "bin" / "cellprofiler"))
PIPELINE = REPO / "resources" / "cellprofiler" / "features.cppipe"  # every module, site by site
SITE_PIPELINE = REPO / "resources" / "cellprofiler" / "features_site.cppipe"
TILED_PIPELINE = REPO / "resources" / "cellprofiler" / "features_tiled.cppipe"
# CellProfiler's cost per image set is mostly per measurement column (each goes through its HDF5
# measurement store, ~1.6 ms a call, ~4,400 calls per site), so small sites are tiled into image
# sets of up to this many pixels for the per-object modules that allow it.
TILE_PIXELS = 2048 * 2048
TILE_GAP = 8  # px of background between tiled sites
PIPELINE_BUILDER = Path(__file__).with_name("cellprofiler_pipeline.py")
CHANNELS = ("DNA", "CYTO", "DAMAGE")
OBJECTS = ("Nuclei", "Cells", "Cytoplasm")
SITE_KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Source"]
OBJECT_KEY = "Metadata_ObjectNumber"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
IMAGE_FEATURE_PREFIXES = ("Count_", "ImageQuality_", "Granularity_", "Texture_", "Intensity_",
                          "Correlation_", "Threshold_")
_POSITION = re.compile(r"^AreaShape_(Center|BoundingBoxMinimum|BoundingBoxMaximum)_[XYZ]$")
_NEIGHBOUR_NUMBER = re.compile(r"^Neighbors_(First|Second)ClosestObjectNumber_")
_DROPPED = re.compile(r"^(ImageNumber|ObjectNumber|Number_Object_Number|Location_.*)$")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
ADU_MAX = 65535
TAIL_CHARS = 4000
QC_COLUMNS = ["plate", "well", "site", "source", "status", "reason", "cells"]


class FeatureError(RuntimeError):
    """CellProfiler failed, or its output cannot be read; the message quotes what it said."""


def _site_name(plate: str, well: str, site: int, source: str) -> str:
    return _SAFE.sub("-", f"{plate}_{well}_s{site}_{source}")


def _where(plate: str, well: str, site: int, source: str = "") -> str:
    return f"plate {plate} well {well} site {site}" + (f" ({source})" if source else "")


def write_site_inputs(folder: str | Path, plate: str, well: str, site: int,
                      images: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                      source: str = "") -> dict:
    """Write one site's images (uint16 TIFF, ADU clipped to 0..65535 and rounded) and label images
    (uint16 TIFF, 0 = background) into `folder`; return its LoadData row (`Metadata_Plate`,
    `Metadata_Well`, `Metadata_Site`, `Metadata_Source`, `FileName_<channel>`/`PathName_<channel>`,
    `ObjectsFileName_<objects>`/`ObjectsPathName_<objects>`). Raises ValueError naming the site for
    unusable inputs (not 2-D, shapes differ, non-finite pixels, negative or > 65535 labels)."""
    where = _where(plate, well, site, source)
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
            site = _where(*(row.get(k) for k in SITE_KEYS[:3]))
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


def run_cellprofiler(pipeline: str | Path, loaddata_csv: str | Path, out_dir: str | Path,
                     cellprofiler: str | Path = CELLPROFILER, threads: int = 1,
                     log: str | Path | None = None, timeout: float | None = None,
                     append_log: bool = False) -> Path:
    """Run a pipeline headless on every row of a LoadData CSV, writing its CSVs into `out_dir`.
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
        command = [str(cellprofiler), "-c", "-r", "-p", str(pipeline), "--data-file", str(loaddata_csv),
                   "-o", str(out_dir), "-i", str(loaddata_csv.parent), "-t", temporary,
                   "-L", "WARNING", "-e", "imageio_reader"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                    env=thread_environment(threads), stdin=subprocess.DEVNULL)
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


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, low_memory=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


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
    dtypes = {}
    for name in columns:
        # the pandas dtypes (nullable Int64 included) stored with each shard, from its schema alone
        found = [schemas[p].empty_table().to_pandas()[name].dtype for p in filled if name in schemas[p].names]
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


_IMAGES_SETTING = ("Select the images to measure:", "Select images to measure:")
_OBJECTS_SETTING = ("Select object sets to measure:", "Select objects to measure:")


def pipeline_names(pipeline: str | Path) -> tuple[list[str], list[str]]:
    """(channels, objects) a saved feature pipeline measures: the images of its first measurement
    module that names images, and every object set any module measures (in order of appearance)."""
    channels, objects, module = [], [], None
    for line in Path(pipeline).read_text().splitlines():
        if line and not line[0].isspace() and ":[" in line:
            module = line.split(":", 1)[0]
            continue
        setting = line.strip()
        if not (module or "").startswith("Measure"):
            continue
        if not channels and setting.startswith(_IMAGES_SETTING):
            channels = [n for n in setting.split(":", 1)[1].split(", ") if n]
        elif setting.startswith(_OBJECTS_SETTING):
            objects += [n for n in setting.split(":", 1)[1].split(", ") if n and n not in objects]
    if not channels:
        raise FeatureError(f"{pipeline}: no measurement module names images: not a feature pipeline")
    return channels, objects


def write_pipeline(path: str | Path, channels: Sequence[str] = CHANNELS,
                   objects: Sequence[str] = OBJECTS, python: str | Path | None = None,
                   part: str = "all") -> Path:
    """Build the feature pipeline (`part`: all, site or tiled; see cellprofiler_pipeline.py) with
    CellProfiler's API (cellprofiler_pipeline.py under the CellProfiler environment's Python) and
    save it at `path`."""
    python = Path(python) if python is not None else Path(CELLPROFILER).with_name("python")
    command = [str(python), str(PIPELINE_BUILDER), str(path), "--channels", *channels,
               "--objects", *objects, "--part", part]
    result = subprocess.run(command, capture_output=True, text=True, env=thread_environment(1))
    if result.returncode != 0:
        output = result.stdout + result.stderr
        raise FeatureError(f"building the pipeline failed:\n...{output[-TAIL_CHARS:]}")
    return Path(path)


SiteKey = tuple[str, str, int, str]
SiteInputs = tuple[SiteKey, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


def _top_label(labels: Mapping[str, np.ndarray]) -> int:
    return max((int(np.max(label)) for label in labels.values() if np.size(label)), default=0)


def _tile_area(images: Mapping[str, np.ndarray], gap: int = TILE_GAP) -> int:
    height, width = np.shape(next(iter(images.values())))
    return (height + gap) * (width + gap)


def tile_sites(sites: Sequence[SiteInputs], gap: int = TILE_GAP
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], pd.DataFrame]:
    """Lay sites ((key, images, labels) as `extract_features` reads them) side by side in a
    near-square grid, row by row, `gap` px of background between them, as one set of images and
    label images. A site's label values are shifted by the largest label of the sites before it
    (the same shift in every compartment, so nucleus, cell and cytoplasm k stay one cell).
    Returns (images, labels, placements): placements has one row per site, SITE_KEYS then `y0`,
    `x0` (its top-left corner in the tile), `offset` (the shift) and `top` (its largest label)."""
    if not sites:
        raise ValueError("no sites to tile")
    columns = int(np.ceil(np.sqrt(len(sites))))
    cell_h = max(np.asarray(next(iter(images.values()))).shape[0] for _, images, _ in sites) + gap
    cell_w = max(np.asarray(next(iter(images.values()))).shape[1] for _, images, _ in sites) + gap
    rows = -(-len(sites) // columns)
    shape = (rows * cell_h - gap, columns * cell_w - gap)
    channels, objects = list(sites[0][1]), list(sites[0][2])
    tiled_images = {c: np.zeros(shape, np.float32) for c in channels}
    tiled_labels = {o: np.zeros(shape, np.int64) for o in objects}
    placements, offset = [], 0
    for i, (key, images, labels) in enumerate(sites):
        y0, x0 = (i // columns) * cell_h, (i % columns) * cell_w
        top = _top_label(labels)
        for name in channels:
            image = np.asarray(images[name])
            tiled_images[name][y0:y0 + image.shape[0], x0:x0 + image.shape[1]] = image
        for name in objects:
            label = np.asarray(labels[name]).astype(np.int64)
            tiled_labels[name][y0:y0 + label.shape[0], x0:x0 + label.shape[1]] = np.where(
                label > 0, label + offset, 0)
        placements.append(dict(zip(SITE_KEYS, key, strict=True), y0=y0, x0=x0, offset=offset, top=top))
        offset += top
    return tiled_images, tiled_labels, pd.DataFrame(placements)


_TILED_POSITION = re.compile(
    r"^Metadata_\w+_AreaShape_(Center|BoundingBoxMinimum|BoundingBoxMaximum)_([XY])$")


def untile_cells(cells: pd.DataFrame, placements: pd.DataFrame) -> pd.DataFrame:
    """Per-cell rows measured on tiles (`read_object_tables` of a tiled run, `Metadata_Site` = the
    tile number) back to their sites: site keys, label values and positions relative to the site.
    `placements` is `tile_sites`' table with a `tile` column."""
    out = cells.copy()
    for key in SITE_KEYS:
        out[key] = out[key].astype(object)
    placed = np.zeros(len(out), bool)
    positions = {c: _TILED_POSITION.match(c).group(2) for c in out.columns if _TILED_POSITION.match(c)}
    tiles, labels = out["Metadata_Site"].to_numpy(int), out[OBJECT_KEY].to_numpy(np.int64)
    for row in placements.itertuples(index=False):
        rows = (tiles == row.tile) & (labels > row.offset) & (labels <= row.offset + row.top)
        if not rows.any():
            continue
        placed |= rows
        for key in SITE_KEYS:
            out.loc[rows, key] = getattr(row, key)
        out.loc[rows, OBJECT_KEY] = labels[rows] - row.offset
        for column, axis in positions.items():
            out.loc[rows, column] = out.loc[rows, column] - (row.x0 if axis == "X" else row.y0)
    if not placed.all():
        raise FeatureError(f"{int((~placed).sum())} objects measured on tiles belong to no tiled site")
    out["Metadata_Site"] = out["Metadata_Site"].astype(int)
    out[OBJECT_KEY] = out[OBJECT_KEY].astype(np.int64)
    return out.sort_values([*SITE_KEYS, OBJECT_KEY], kind="stable").reset_index(drop=True)


def join_parts(site_cells: pd.DataFrame, tiled_cells: pd.DataFrame) -> pd.DataFrame:
    """The per-cell tables of the site-by-site and the tiled run as one: joined on site and label
    value, metadata columns first. The two pipelines must not measure the same feature."""
    keys = [*SITE_KEYS, OBJECT_KEY]
    shared = (set(site_cells.columns) & set(tiled_cells.columns)) - set(keys)
    if shared:
        raise FeatureError(f"the site and the tiled pipeline both measure {sorted(shared)[:5]} "
                           f"({len(shared)} columns): with a whole pipeline of your own as "
                           "features.pipeline, set features.tiled_pipeline to ''")
    cells = tiled_cells.merge(site_cells, on=keys, how="outer")
    metadata = [c for c in cells.columns if c.startswith("Metadata_") and c not in keys]
    rest = [c for c in cells.columns if not c.startswith("Metadata_")]
    return (cells[[*keys, *metadata, *rest]].sort_values(keys, kind="stable")
            .reset_index(drop=True))


def _qc(plate, well, site, source, status: str, reason: str, cells: int = 0) -> dict:
    return dict(zip(QC_COLUMNS, [str(plate), str(well), int(site), str(source), status, reason,
                                 int(cells)], strict=True))


def extract_features(sites: Iterable[tuple[str, str, int, str]],
                     read_images: Callable[[str, str, int, str], Mapping[str, np.ndarray]],
                     read_labels: Callable[[str, str, int, str], Mapping[str, np.ndarray]],
                     pipeline: str | Path = PIPELINE, work_dir: str | Path | None = None, *,
                     tiled_pipeline: str | Path | None = None, tile_pixels: int = TILE_PIXELS,
                     cellprofiler: str | Path = CELLPROFILER, threads: int = 1,
                     log: str | Path | None = None, timeout: float | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
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
    whole pipeline. Inputs and outputs go into `work_dir` (a new temporary folder if None); removing
    it is the caller's business. CellProfiler failing on the batch raises FeatureError."""
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
        where = _where(*key)
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
            area, top = _tile_area(images), _top_label(labels)
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
                     log=log, timeout=timeout)
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
            qc.append(_qc(*key, "no_objects", f"{_where(*key)}: {why}"))
        else:
            qc.append(_qc(*key, "ok", "", n))
    qc = pd.DataFrame(qc, columns=QC_COLUMNS).sort_values(QC_COLUMNS[:4], kind="stable")
    return cells, images, qc.reset_index(drop=True)


def plate_site_readers(source, virtual_store: str | Path, labels_store: str | Path
                       ) -> tuple[Callable[..., dict[str, np.ndarray]], Callable[..., dict[str, np.ndarray]]]:
    """`extract_features`'s readers for a workflow plate: images of source `real` are the plate's
    illumination-corrected (and, where denoised, denoised) stains, those of `virtual` its virtual
    stains (VS_<channel>, returned under the plain channel name so both sources go through the same
    pipeline and get the same feature names); labels are the segmentation's nuclei / cells /
    cytoplasm of that source, under CellProfiler's object names."""
    from .ingest import read_plane, read_store_layout
    from .labels import label_name, read_labels
    from .stain import VIRTUAL_PREFIX, fluorescence_plane

    virtual_channels = read_store_layout(virtual_store).channels

    def read_images(plate: str, well: str, site: int, kind: str) -> dict[str, np.ndarray]:
        if kind == "real":
            return {c: fluorescence_plane(source, well, site, c) for c in source.layout.channels
                    if c != source.brightfield}
        if kind == "virtual":
            return {name.removeprefix(VIRTUAL_PREFIX): np.asarray(read_plane(virtual_store, well, site, i, 0),
                                                                  np.float32)
                    for i, name in enumerate(virtual_channels) if name.startswith(VIRTUAL_PREFIX)}
        raise ValueError(f"{_where(plate, well, site)}: unknown stain source {kind!r}")

    def read_object_labels(plate: str, well: str, site: int, kind: str) -> dict[str, np.ndarray]:
        return {objects: read_labels(labels_store, well, site, label_name(objects.lower(), kind))
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
            skipped.append(_qc(*key, "skipped", f"{_where(*key)}: not segmented: {row.reason}"))
        else:
            measure.append(key)
    return measure, pd.DataFrame(skipped, columns=QC_COLUMNS)
