"""Image-based profiles with pycytominer: single cells -> wells -> normalised, feature-selected
profiles -> one consensus profile per treatment.

Tables are pandas DataFrames in CellProfiler's convention: a column whose name starts with
`Metadata_` is metadata, every other column is a numeric feature (`Cells_AreaShape_Area`,
`Nuclei_Intensity_MeanIntensity_DNA`, ...). Every step passes its feature list to pycytominer
explicitly (pycytominer would otherwise infer features from the Cells/Nuclei/Cytoplasm prefixes).

Steps (one verb per function, each usable alone):
- `aggregate_wells`: single cells -> one row per (plate, well[, source]) with `Metadata_Object_Count`.
- `annotate_wells`: plate map + screen-sheet row -> `Metadata_perturbation`, `Metadata_dose`,
  `Metadata_control_type`, `Metadata_moa`, `Metadata_target`, `Metadata_batch`,
  `Metadata_cell_type` and `Metadata_treatment` ("<perturbation>@<dose>", negative controls just
  "<perturbation>", e.g. "DMSO"). A profiled well missing from the plate map is an error.
- `normalise_profiles`: per plate (and per stain source when `Metadata_Source` is present) against
  reference wells (default: the negative controls), robust MAD by default.
- `clip_outliers`: per stain source, features whose normalised values are far outside the reference
  spread in more than 1 % of the wells are dropped, the rest clipped (the JUMP recipe's outlier step).
- `select_features`: pycytominer.feature_select (NA-heavy, low-frequency/low-variance, correlated
  and blocklisted features dropped); `feature_columns(result)` is the kept feature list.
- `consensus_profiles`: one profile per treatment (median), keeping the metadata that is constant
  per treatment; pass ("Metadata_treatment", "Metadata_batch") for the per-batch consensus that
  NSCB matching needs.

pycytominer 1.7 note: its operation "variance_threshold" is now a plain minimum-variance filter
(`min_variance`, 1e-6); the classic caret-style filter with `freq_cut` / `unique_cut` (called
"variance_threshold" in pycytominer until 2024) is now "frequency_threshold". Both are in the
default selection here. The BBBC021 reference (tests/test_profiles.py) is reproduced with
operations (frequency_threshold, correlation_threshold, drop_na_columns, blocklist).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pycytominer
from pycytominer.operations import RobustMAD
from scipy.stats import iqr, median_abs_deviation
from sklearn.preprocessing import RobustScaler, StandardScaler

from brightpaint.io import normalise_well

META = "Metadata_"
PLATE, WELL, SITE, SOURCE = "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Source"
OBJECT_NUMBER, OBJECT_COUNT = "Metadata_ObjectNumber", "Metadata_Object_Count"
TREATMENT, PERTURBATION, DOSE = "Metadata_treatment", "Metadata_perturbation", "Metadata_dose"
CONTROL_TYPE, MOA, TARGET = "Metadata_control_type", "Metadata_moa", "Metadata_target"
BATCH, CELL_TYPE = "Metadata_batch", "Metadata_cell_type"
REPLICATE_COUNT = "Metadata_Replicate_Count"
NEGCON_SAMPLES = f"{CONTROL_TYPE} == 'negcon'"
PLATEMAP_FIELDS = ("perturbation", "dose", "control_type", "moa", "target")
PLATE_INFO_FIELDS = ("batch", "cell_type")
# drop_na first: features that normalisation left NaN (no spread in the reference wells) go
# before the frequency and correlation filters look at them.
DEFAULT_SELECTION = ("drop_na_columns", "frequency_threshold", "variance_threshold",
                     "correlation_threshold", "blocklist")
SCALED_METHODS = ("mad_robustize", "robustize", "standardize")
# settings keys of config `profiles:` -> pycytominer.feature_select keyword arguments
_SELECT_KEYWORDS = {"na_cutoff": "na_cutoff", "freq_cut": "freq_cut", "unique_cut": "unique_cut",
                    "correlation_threshold": "corr_threshold", "corr_threshold": "corr_threshold",
                    "corr_method": "corr_method", "min_variance": "min_variance",
                    "outlier_cutoff": "outlier_cutoff", "blocklist": "blocklist"}
REPLICATE_FIELDS = ("perturbation", "dose")
# clip_outliers' limit on |normalised value| (reference-spread units), the JUMP profiling recipe's
OUTLIER_LIMIT = 100.0
PROFILE_DEFAULTS = {"aggregate": "median", "normalise": "mad_robustize", "outlier_limit": OUTLIER_LIMIT,
                    "normalise_samples": NEGCON_SAMPLES, "feature_select": list(DEFAULT_SELECTION),
                    "consensus": "median", "replicate_by": list(REPLICATE_FIELDS),
                    "scale_by": ["cell_type"]}


def metadata_columns(df: pd.DataFrame) -> list[str]:
    """Columns whose name starts with `Metadata_`, in table order."""
    return [c for c in df.columns if str(c).startswith(META)]


def feature_columns(df: pd.DataFrame) -> list[str]:
    """Every column that is not metadata, in table order."""
    return [c for c in df.columns if not str(c).startswith(META)]


def _numeric_features(df: pd.DataFrame, what: str) -> list[str]:
    features = feature_columns(df)
    if not features:
        raise ValueError(f"{what}: the table has no feature columns (every column is Metadata_*)")
    bad = [c for c in features if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise ValueError(f"{what}: feature columns must be numeric; not numeric: {bad[:10]}"
                         + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    return features


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}")


def _metadata_first(df: pd.DataFrame) -> pd.DataFrame:
    return df[metadata_columns(df) + feature_columns(df)]


def aggregate_wells(single_cells: pd.DataFrame, operation: str = "median",
                    strata: Sequence[str] | None = None) -> pd.DataFrame:
    """One profile per well (per stain source when `Metadata_Source` is present) with
    pycytominer.aggregate, plus `Metadata_Object_Count` (objects per well).

    `strata` defaults to (Metadata_Plate, Metadata_Well[, Metadata_Source]); other metadata
    (site, object number) is aggregated away. Rows are sorted by the strata.
    """
    _require(single_cells, [PLATE, WELL], "aggregate_wells")
    if strata is None:
        strata = [c for c in (PLATE, WELL, SOURCE) if c in single_cells.columns]
    strata = list(strata)
    _require(single_cells, strata, "aggregate_wells")
    if single_cells[strata].isna().any().any():
        raise ValueError(f"aggregate_wells: missing values in the grouping columns {strata}")
    features = _numeric_features(single_cells, "aggregate_wells")
    cells = single_cells
    if OBJECT_NUMBER not in cells.columns:  # count rows
        cells = cells.assign(**{OBJECT_NUMBER: 1})
    wells = pycytominer.aggregate(cells, strata=strata, features=features, operation=operation,
                                  compute_object_count=True, object_feature=OBJECT_NUMBER)
    return _metadata_first(wells.sort_values(strata).reset_index(drop=True))


def aggregate_parquet_wells(path: str | Path, operation: str = "median",
                            batch_rows: int = 65536) -> pd.DataFrame:
    """aggregate_wells over a plate's cell table in a parquet file, a batch of rows at a time: memory
    is one batch plus one well's cells, whatever the plate's size. The rows must come grouped by well
    (features_plate writes them sorted by well); a well that comes back after others is an error,
    since aggregating it in two pieces would be wrong."""
    parts, carry, finished = [], None, set()
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        cells = batch.to_pandas()
        if carry is not None:
            cells = pd.concat([carry, cells], ignore_index=True)
        _require(cells, [PLATE, WELL], "aggregate_parquet_wells")
        well = cells[WELL]
        run_starts = well[well != well.shift()]
        split = sorted(set(run_starts[run_starts.duplicated()]) | (set(run_starts) & finished))
        if split:
            raise ValueError(f"{path}: the cells of well(s) {split} are not in one run of rows; the "
                             "table must be grouped by well")
        last = well.iloc[-1]
        complete, carry = cells[well != last], cells[well == last]
        if len(complete):
            finished |= set(complete[WELL])
            parts.append(aggregate_wells(complete, operation))
    if carry is not None and len(carry):
        parts.append(aggregate_wells(carry, operation))
    if not parts:
        return pd.DataFrame(columns=[PLATE, WELL])
    strata = [c for c in (PLATE, WELL, SOURCE) if c in parts[0].columns]
    return _metadata_first(pd.concat(parts, ignore_index=True).sort_values(strata).reset_index(drop=True))


def format_dose(dose) -> str:
    """A dose as a short stable string: 10.0 -> '10', 0.1 -> '0.1', 3e-05 -> '3e-05'."""
    return f"{float(dose):g}"


def check_replicate_by(replicate_by: Sequence[str]) -> None:
    """Config `profiles.replicate_by`: the perturbation, optionally with the dose."""
    if set(replicate_by) - set(REPLICATE_FIELDS) or "perturbation" not in replicate_by:
        raise ValueError(f"profiles.replicate_by: {list(replicate_by)}; a replicate group is the "
                         f"perturbation, optionally with the dose ({list(REPLICATE_FIELDS)})")


def treatment_name(perturbation: str, dose, control_type: str,
                   replicate_by: Sequence[str] = REPLICATE_FIELDS) -> str:
    """The replicate group of a well: '<perturbation>@<dose>'; just the perturbation for negative
    controls, dose-less wells, and when `replicate_by` leaves the dose out (every dose of a compound
    one group: a dose-response plate with one well per compound and dose)."""
    check_replicate_by(replicate_by)
    if "dose" not in replicate_by or control_type == "negcon" or dose is None or pd.isna(dose):
        return str(perturbation)
    return f"{perturbation}@{format_dose(dose)}"


def _blank_to_nan(values: pd.Series) -> pd.Series:
    if values.dtype != object:
        return values
    return values.map(lambda v: np.nan if isinstance(v, str) and not v.strip() else v)


def annotate_wells(wells: pd.DataFrame, platemap: pd.DataFrame,
                   plate_info: Mapping | None = None,
                   plate_fields: Sequence[str] = PLATE_INFO_FIELDS,
                   replicate_by: Sequence[str] = REPLICATE_FIELDS) -> pd.DataFrame:
    """Annotate one plate's well profiles from its plate map and its screen-sheet row.

    `platemap` has columns well, perturbation, dose, control_type, moa, target (wells like A01 or
    A1); `plate_info` is the plate's row of the screen sheet (a dict), whose `plate_fields`
    (batch, cell_type) become constant columns. Adds Metadata_<field> for the plate map fields
    (and Metadata_control_label, the control_type as the plate map wrote it, where read_platemap
    gave it) and plate fields, and `Metadata_treatment`, the replicate group (`treatment_name`
    by `replicate_by`). Empty moa / target become missing values.

    Raises ValueError naming the plate and wells when a profiled well is not in the plate map
    (never a silent drop), when the plate map lists a well twice, or when `plate_info['plate']`
    is not the plate of the profiles. Plate-map wells without profiles are fine (empty wells).
    """
    _require(wells, [PLATE, WELL], "annotate_wells")
    _require(platemap, ["well", *PLATEMAP_FIELDS], "annotate_wells: plate map")
    plates = pd.unique(wells[PLATE])
    if len(plates) != 1:
        raise ValueError(f"annotate_wells annotates one plate at a time; got plates {list(plates)}")
    plate = str(plates[0])
    info = dict(plate_info or {})
    if "plate" in info and str(info["plate"]) != plate:
        raise ValueError(f"annotate_wells: plate_info is for plate {info['plate']!r}, the profiles "
                         f"are of plate {plate!r}")
    taken = [f"{META}{f}" for f in (*PLATEMAP_FIELDS, *plate_fields)] + [TREATMENT]
    check_replicate_by(replicate_by)
    already = [c for c in taken if c in wells.columns]
    if already:
        raise ValueError(f"annotate_wells: plate {plate} is already annotated ({already})")

    pm = platemap.copy()
    pm["_well"] = pm["well"].map(normalise_well)
    bad = pm.loc[pm["_well"].isna(), "well"].tolist()
    if bad:
        raise ValueError(f"annotate_wells: plate {plate}: plate map wells not understood: {bad}")
    counts = pm["_well"].value_counts()
    if (counts > 1).any():
        raise ValueError(f"annotate_wells: plate {plate}: plate map lists well(s) "
                         f"{sorted(counts[counts > 1].index)} more than once")
    keys = wells[WELL].map(normalise_well)
    missing = sorted({str(w) for w, k in zip(wells[WELL], keys, strict=True)
                      if k is None or k not in set(pm["_well"])})
    if missing:
        raise ValueError(f"annotate_wells: plate {plate}: well(s) {', '.join(missing)} have profiles "
                         "but are not in the plate map")

    pm = pm.set_index("_well")
    out = wells.copy()
    for field in (*PLATEMAP_FIELDS, *(["control_label"] if "control_label" in pm.columns else [])):
        out[f"{META}{field}"] = _blank_to_nan(keys.map(pm[field]))
    out[DOSE] = pd.to_numeric(out[DOSE])
    if out[PERTURBATION].isna().any():
        empty = sorted(out.loc[out[PERTURBATION].isna(), WELL].astype(str))
        raise ValueError(f"annotate_wells: plate {plate}: empty perturbation in well(s) {empty}")
    for field in plate_fields:
        if field in info:
            out[f"{META}{field}"] = info[field]
    out[TREATMENT] = [treatment_name(p, d, c, replicate_by) for p, d, c in
                      zip(out[PERTURBATION], out[DOSE], out[CONTROL_TYPE], strict=True)]
    return _metadata_first(out)


def _group_name(by: Sequence[str], key) -> str:
    key = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{c.removeprefix(META)} {k}" for c, k in zip(by, key, strict=True))


def _zero_scale_features(reference: pd.DataFrame, method: str) -> list[str]:
    """Features whose scale in the reference rows is zero (or undefined) for `method`."""
    values = reference.to_numpy(dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if method == "mad_robustize":
            scale = median_abs_deviation(values, axis=0, nan_policy="omit")
        elif method == "standardize":
            scale = np.nanstd(values, axis=0)
        elif method == "robustize":
            scale = iqr(values, axis=0, nan_policy="omit")
        else:
            return []
    scale = np.asarray(scale, dtype=float)
    return [f for f, s in zip(reference.columns, scale, strict=True) if not (np.isfinite(s) and s > 0)]


def _scaler(method: str, epsilon: float):
    """The scaler pycytominer.normalize uses for `method`."""
    if method == "mad_robustize":
        return RobustMAD(epsilon=epsilon)
    return {"standardize": StandardScaler, "robustize": RobustScaler}[method]()


def reference_mask(meta: pd.DataFrame, samples: str, what: str) -> np.ndarray:
    """Which rows of `meta` (metadata columns) are reference rows: those matching the pandas
    condition `samples`, or every row for "all"."""
    if samples == "all":
        return np.ones(len(meta), dtype=bool)
    try:  # on the metadata only: DataFrame.query is quadratic in the number of columns
        chosen = meta.eval(samples)
    except Exception as err:  # pandas raises several types for a bad query
        raise ValueError(f"{what}: samples query {samples!r} failed: {err}") from err
    if not (isinstance(chosen, pd.Series) and chosen.dtype == bool):
        raise ValueError(f"{what}: samples {samples!r} is not a condition on metadata columns")
    return chosen.to_numpy()


def reference_wells_problem(platemap: pd.DataFrame, imaged_wells: Sequence[str],
                            plate_info: Mapping, settings: Mapping | None = None) -> str | None:
    """Why a plate cannot be normalised as config `profiles:` asks, told from its plate map before
    any image is processed, or None: too few imaged wells match `normalise_samples` (the scaling
    methods need 2). A condition on columns that exist only after the features (a feature, the
    stain source) cannot be judged this early: None."""
    s = {**PROFILE_DEFAULTS, **(settings or {})}
    samples, method = s["normalise_samples"], s["normalise"]
    imaged = platemap[platemap["well"].isin(set(imaged_wells))]
    meta = pd.DataFrame({PLATE: str(plate_info.get("plate", "")), WELL: imaged["well"]})
    for name in PLATEMAP_FIELDS:
        meta[f"{META}{name}"] = _blank_to_nan(imaged[name])
    meta[DOSE] = pd.to_numeric(meta[DOSE])
    for name in PLATE_INFO_FIELDS:
        meta[f"{META}{name}"] = plate_info.get(name)
    try:
        chosen = int(reference_mask(meta, samples, "profiles.normalise_samples").sum())
    except ValueError as err:
        if "is not defined" in str(err):  # a column the wells get later
            return None
        return str(err)
    needed = 2 if method in SCALED_METHODS else 1
    if chosen < needed:
        written = (sorted(imaged["control_label"].dropna().astype(str).unique())
                   if "control_label" in imaged.columns else
                   sorted(imaged["control_type"].dropna().astype(str).unique()))
        return (f"{chosen} imaged well(s) match profiles.normalise_samples {samples!r}; "
                f"normalise {method} needs at least {needed} reference wells per plate (the plate "
                f"map's column control_type has {written}: list your vehicle label under config "
                "platemap.control_types.negcon, add negative-control wells, or set "
                "normalise_samples: all)")
    return None


def _location(values: np.ndarray, method: str) -> np.ndarray:
    """The centre a scaling method subtracts: the median (mad_robustize, robustize) or the mean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features stay NaN
        return np.nanmean(values, axis=0) if method == "standardize" else np.nanmedian(values, axis=0)


def _spread(values: np.ndarray, method: str) -> np.ndarray:
    """The scale a method divides by, as pycytominer's scalers compute it: 1.4826 x MAD
    (mad_robustize), the standard deviation (standardize) or the interquartile range (robustize)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if method == "mad_robustize":
            return median_abs_deviation(values, axis=0, nan_policy="omit", scale="normal")
        if method == "standardize":
            return np.nanstd(values, axis=0)
        return iqr(values, axis=0, nan_policy="omit")


def normalise_profiles(wells: pd.DataFrame, method: str = "mad_robustize",
                       samples: str = NEGCON_SAMPLES, by: Sequence[str] = (PLATE, SOURCE),
                       zero_scale: str = "nan", min_samples: int = 2,
                       mad_robustize_epsilon: float = 1e-18,
                       scale_by: Sequence[str] | None = None) -> pd.DataFrame:
    """Normalise features with pycytominer.normalize separately for each plate (and each stain
    source: the columns of `by` that the table has; `by=()` normalises the whole table at once),
    fitted on the rows matching `samples` (a pandas query, default the negative controls; "all" =
    every row of the group).

    mad_robustize: (x - median) / (1.4826 * MAD) of the reference rows, so the reference has median
    0 and (normal-consistent) MAD 1 per feature.

    A group with no reference row is an error naming the plate; so is one with fewer than
    `min_samples` for the scaling methods (one control well has no spread). A feature without
    spread in a group's reference (MAD / std / IQR 0) cannot be scaled: pycytominer divides by
    epsilon and returns values near 1e18; with `zero_scale="nan"` (default) such features are set
    to NaN in that group instead (a warning names them; drop_na_columns removes them later),
    `zero_scale="keep"` keeps pycytominer's result. The scaling methods use pycytominer's scalers
    (RobustMAD, sklearn StandardScaler / RobustScaler) directly, fitted on the reference rows,
    which is what pycytominer.normalize does; other methods (spherize, inverse_normal) call
    pycytominer.normalize per group. `result.attrs["zero_scale_features"]` maps
    each group to those features. Rows keep the input order.

    `scale_by` (scaling methods only; None: the location groups `by`): the location still comes
    from each `by` group's own reference rows, the scale from the reference rows of every group
    of a `scale_by` group pooled after centring (`scale_by=(SOURCE,)`: one scale per feature for
    the screen). A plate's six control wells give a noisy scale; their median is a good
    location. One reference row per `by` group is then enough to centre it (groups with two or
    more give the scale).
    """
    if zero_scale not in ("nan", "keep"):
        raise ValueError(f"zero_scale must be 'nan' or 'keep', got {zero_scale!r}")
    if scale_by is not None and [c for c in scale_by if c in wells.columns] != \
            [c for c in by if c in wells.columns] and method in SCALED_METHODS:
        return _normalise_pooled_scale(wells, method, samples, by, scale_by, zero_scale)
    by = [c for c in by if c in wells.columns]
    features = _numeric_features(wells, "normalise_profiles")
    meta = metadata_columns(wells)
    zero = {}
    # one float block: column-wise pandas work on a wide, fragmented table is slow
    values = wells[features].to_numpy(dtype=float)
    result = values.copy()
    meta_table = wells[meta].reset_index(drop=True)
    groups = (meta_table.groupby(by, sort=True, dropna=False).indices if by
              else {"all rows": np.arange(len(wells))})
    for key, rows in groups.items():
        name = _group_name(by, key) if by else key
        group_meta = meta_table.iloc[rows]
        reference = rows[reference_mask(group_meta, samples, f"normalise_profiles: {name}")]
        if len(reference) == 0:
            raise ValueError(f"normalise_profiles: {name}: no rows match samples={samples!r} (no "
                             "reference wells to normalise against; use samples='all' or add "
                             "control wells)")
        if method in SCALED_METHODS and len(reference) < min_samples:
            raise ValueError(f"normalise_profiles: {name}: only {len(reference)} row(s) match "
                             f"samples={samples!r}; {method} needs at least {min_samples}")
        if method in SCALED_METHODS:
            # pycytominer.normalize's own scalers fitted on the reference rows (what normalize
            # does after its samples query, which takes seconds on a wide table)
            scaler = _scaler(method, mad_robustize_epsilon).fit(
                pd.DataFrame(values[reference], columns=features))
            result[rows] = np.asarray(scaler.transform(pd.DataFrame(values[rows], columns=features)),
                                      dtype=float)
        else:
            normalised = pycytominer.normalize(wells.iloc[rows], features=features,
                                               meta_features=meta, samples=samples, method=method)
            result[rows] = normalised[features].to_numpy(dtype=float)
        flat = _zero_scale_features(pd.DataFrame(values[reference], columns=features), method)
        if flat:
            zero[name] = flat
            if zero_scale == "nan":
                result[np.ix_(rows, [features.index(f) for f in flat])] = np.nan
    return _normalised_table(wells, meta, features, result, zero,
                             "set to NaN" if zero_scale == "nan" else "kept (scaled by epsilon)")


def _normalised_table(wells: pd.DataFrame, meta: list[str], features: list[str], result: np.ndarray,
                      zero: dict[str, list[str]], action: str) -> pd.DataFrame:
    """The normalised values as a table in the input's column order, warning about (and recording in
    attrs["zero_scale_features"]) the features each group could not scale."""
    out = pd.concat([wells[meta], pd.DataFrame(result, index=wells.index, columns=features)],
                    axis=1)[list(wells.columns)]
    if zero:
        summary = "; ".join(f"{k}: {len(v)} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                            for k, v in zero.items())
        warnings.warn(f"normalise_profiles: features without spread in the reference wells, "
                      f"{action}: {summary}", stacklevel=3)
    out.attrs["zero_scale_features"] = zero
    return out


def _normalise_pooled_scale(wells: pd.DataFrame, method: str, samples: str, by: Sequence[str],
                            scale_by: Sequence[str], zero_scale: str) -> pd.DataFrame:
    """normalise_profiles with the location of each `by` group and the scale of each `scale_by`
    group (its reference rows pooled after centring)."""
    features = _numeric_features(wells, "normalise_profiles")
    meta = metadata_columns(wells)
    values = wells[features].to_numpy(dtype=float)
    meta_table = wells[meta].reset_index(drop=True)
    centred = np.full_like(values, np.nan)
    is_reference = np.zeros(len(wells), dtype=bool)
    by = [c for c in by if c in wells.columns]
    groups = meta_table.groupby(by, sort=True, dropna=False).indices if by else {(): np.arange(len(wells))}
    for key, rows in groups.items():
        name = _group_name(by, key) if by else "all rows"
        reference = rows[reference_mask(meta_table.iloc[rows], samples, f"normalise_profiles: {name}")]
        if len(reference) == 0:
            raise ValueError(f"normalise_profiles: {name}: no rows match samples={samples!r} (no "
                             "reference wells to centre on; use samples='all' or add control wells)")
        centred[rows] = values[rows] - _location(values[reference], method)
        # one reference row is its own centre: no spread to pool (it still centres its group)
        is_reference[reference] = len(reference) >= 2
    scale_by = [c for c in scale_by if c in wells.columns]
    scale_groups = (meta_table.groupby(scale_by, sort=True, dropna=False).indices if scale_by
                    else {(): np.arange(len(wells))})
    result, zero = np.full_like(values, np.nan), {}
    for key, rows in scale_groups.items():
        name = _group_name(scale_by, key) if scale_by else "all rows"
        reference = rows[is_reference[rows]]
        if len(reference) < 2:
            raise ValueError(f"normalise_profiles: {name}: no plate (`by` group) has 2 or more rows "
                             f"matching samples={samples!r}; {method} needs them to scale")
        scale = np.asarray(_spread(centred[reference], method), dtype=float)
        flat = ~(np.isfinite(scale) & (scale > 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            result[rows] = centred[rows] / np.where(flat, np.nan, scale)
        if flat.any():
            zero[name] = [f for f, z in zip(features, flat, strict=True) if z]
            if zero_scale == "keep":
                result[np.ix_(rows, np.flatnonzero(flat))] = centred[np.ix_(rows, np.flatnonzero(flat))]
    return _normalised_table(wells, meta, features, result, zero,
                             "set to NaN" if zero_scale == "nan" else "kept centred, unscaled")


def clip_outliers(profiles: pd.DataFrame, limit: float | None = OUTLIER_LIMIT) -> pd.DataFrame:
    """Normalised profiles with their heavy tails tamed, per stain source (`Metadata_Source`; the
    whole table without it): a feature whose |value| exceeds `limit` in more than 1 % of the rows
    (99th percentile) is set to NaN there (drop_na_columns removes it), every other value is
    clipped to [-limit, limit]. None or 0: the table unchanged. On a table of fewer than 100 rows the
    99th percentile lies between the two largest values, so one row far over the limit can drop a
    feature there (a plate's own profiles); the screen's profiles, over every plate, are the ones
    that 1 % describes.

    Why: a feature that hardly varies in the reference wells (a granularity scale of a smooth
    stain, a count that is nearly always 0) gets a MAD near 0 and normalised values of 1e3-1e4,
    and then one or two such features decide every cosine similarity. On the demo the virtual
    profiles' replicate mAP moved between 0.59 and 0.78 from a float-level change upstream, with
    granularity features at |z| ~ 1e4; with this step it was 0.81-0.83 (docs/features.md). The
    rule and the limit 100 are the JUMP profiling recipe's (drop features whose 99th percentile of
    |z| exceeds 100, clip the rest). On BBBC021 it drops 1 feature and clips 112 values, and the
    screen's NSC goes from 0.903 to 0.893 (1 of 103 treatments; published 0.82): the price on a
    screen without the problem is small. `result.attrs["outliers"]` says, per source, which features
    were dropped and how many values clipped."""
    if not limit:
        return profiles
    if limit < 0:
        raise ValueError(f"clip_outliers: limit must be > 0 (or 0 / None: off), got {limit}")
    features = _numeric_features(profiles, "clip_outliers")
    out = profiles.copy()
    report = {}
    sources = out[SOURCE].astype(str) if SOURCE in out.columns else pd.Series("all", index=out.index)
    columns = [out.columns.get_loc(f) for f in features]
    for source in sorted(sources.unique()):
        rows = np.flatnonzero((sources == source).to_numpy())
        values = out.iloc[rows, columns].to_numpy(dtype=float, copy=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN feature stays NaN
            tail = np.nanquantile(np.abs(values), 0.99, axis=0)
        drop = tail > limit
        clipped = int(np.sum(np.abs(values[:, ~drop]) > limit))
        values[:, drop] = np.nan
        out.iloc[rows, columns] = np.clip(values, -limit, limit)
        report[source] = {"dropped": [f for f, d in zip(features, drop, strict=True) if d],
                          "values_clipped": clipped}
    out.attrs = {**profiles.attrs, "outliers": report}
    return out


def outlier_summary(profiles: pd.DataFrame) -> str:
    """One line per source of what `clip_outliers` did to `profiles` (for the rule's log)."""
    report = profiles.attrs.get("outliers", {})
    return "; ".join(f"{source}: {len(r['dropped'])} feature(s) dropped (99th percentile of |value| "
                     f"over the limit{': ' + ', '.join(r['dropped'][:3]) if r['dropped'] else ''}"
                     f"{', ...' if len(r['dropped']) > 3 else ''}), {r['values_clipped']} value(s) "
                     "clipped" for source, r in report.items()) or "outlier clipping off"


def select_features(profiles: pd.DataFrame, operations: Sequence[str] = DEFAULT_SELECTION,
                    samples: str = "all", **thresholds) -> pd.DataFrame:
    """pycytominer.feature_select over every feature column; returns the table with the dropped
    features removed (metadata kept), so `feature_columns(result)` is the kept feature list.

    `thresholds` go to pycytominer (na_cutoff=0.05, freq_cut=0.05, unique_cut=0.01,
    corr_threshold=0.9, corr_method='pearson', min_variance=1e-6, blocklist=..., its defaults in
    brackets); the operations run in the order given, each on the features the previous left.
    """
    features = _numeric_features(profiles, "select_features")
    selected = pycytominer.feature_select(profiles, features=features, samples=samples,
                                          operation=list(operations), **thresholds)
    if not feature_columns(selected):
        raise ValueError(f"select_features: every feature was dropped by {list(operations)}")
    return selected


def select_features_by_source(profiles: pd.DataFrame, operations: Sequence[str] = DEFAULT_SELECTION,
                              samples: str = "all", **thresholds) -> pd.DataFrame:
    """`select_features` for each stain source (Metadata_Source) apart, so that one source's
    profiles never decide which features another's keep: otherwise the real profiles' features,
    and every score of them, would move with the virtual-staining model. Returns the rows in their
    order with the union of the kept features, NaN in a source's rows for a feature kept only for
    another (`source_profiles` takes a source's rows and its own features)."""
    if SOURCE not in profiles.columns or profiles[SOURCE].nunique() < 2:
        return select_features(profiles, operations, samples, **thresholds)
    parts = [select_features(group, operations, samples, **thresholds)
             for _, group in profiles.groupby(SOURCE, sort=True)]
    kept = set().union(*(feature_columns(part) for part in parts))
    columns = metadata_columns(profiles) + [c for c in feature_columns(profiles) if c in kept]
    return pd.concat(parts).reindex(index=profiles.index, columns=columns)


def source_profiles(profiles: pd.DataFrame, source: str | None) -> pd.DataFrame:
    """The rows of one stain source (every row for None) without the feature columns that are
    empty in them (those `select_features_by_source` kept for another source only)."""
    rows = profiles
    if source is not None and SOURCE in profiles.columns:
        rows = profiles[profiles[SOURCE] == source]
    empty = [c for c in feature_columns(rows) if rows[c].isna().all()]
    return rows.drop(columns=empty)


def selection_thresholds(settings: Mapping) -> dict:
    """pycytominer.feature_select keyword arguments from the config `profiles:` settings."""
    return {_SELECT_KEYWORDS[k]: v for k, v in settings.items() if k in _SELECT_KEYWORDS}


def consensus_profiles(profiles: pd.DataFrame, replicate_columns: Sequence[str] = (TREATMENT,),
                       operation: str = "median", by_source: bool = True,
                       where_constant: Sequence[str] = (BATCH, CELL_TYPE, PLATE)) -> pd.DataFrame:
    """One profile per group of `replicate_columns` (and stain source when `by_source` and the
    table has `Metadata_Source`) with pycytominer.consensus.

    Metadata: a column that is constant within every group is kept (perturbation, dose,
    control_type, moa, target of a treatment); a column of `where_constant` that varies within
    some groups is kept with a missing value there (at screen level a treatment seen in two
    batches gets no batch); other varying columns (well, site) are dropped. Adds
    `Metadata_Replicate_Count` (rows per group) and sums `Metadata_Object_Count`.

    NSCB matching needs per-batch treatment profiles:
    `consensus_profiles(wells, (Metadata_treatment, Metadata_batch))`.
    """
    keys = list(replicate_columns)
    _require(profiles, keys, "consensus_profiles")
    if by_source and SOURCE in profiles.columns and SOURCE not in keys:
        keys.append(SOURCE)
    features = _numeric_features(profiles, "consensus_profiles")
    consensus = pycytominer.consensus(profiles, replicate_columns=keys, operation=operation,
                                      features=features)
    groups = profiles.groupby(keys, sort=True, dropna=False)
    others = [c for c in metadata_columns(profiles) if c not in keys and c != OBJECT_COUNT]
    meta = groups.size().rename(REPLICATE_COUNT).to_frame()
    if OBJECT_COUNT in profiles.columns:
        meta[OBJECT_COUNT] = groups[OBJECT_COUNT].sum()
    if others:
        distinct = groups[others].nunique(dropna=False)
        first = groups[others].first()
        for column in others:
            constant = distinct[column] <= 1
            if constant.all():
                meta[column] = first[column]
            elif column in where_constant:
                meta[column] = first[column].where(constant)
    meta = meta.reset_index()
    out = consensus.merge(meta, on=keys, how="left", validate="one_to_one")
    return _metadata_first(out.sort_values(keys).reset_index(drop=True))


def missing_wells(wells: pd.DataFrame, platemap: pd.DataFrame) -> dict[str, list[str]]:
    """Plate-map wells without a profile, per stain source: wells where no cell was measured (every
    site `no_objects` or `skipped`; features/sites.csv says why). They are left out of normalisation
    and matching, so the workflow logs them and the report shows them."""
    sources = sorted(wells[SOURCE].unique()) if SOURCE in wells.columns else [""]
    missing = {}
    for source in sources:
        present = set(wells[WELL] if not source else wells.loc[wells[SOURCE] == source, WELL])
        absent = sorted(set(platemap["well"]) - present)
        if absent:
            missing[source] = absent
    return missing


def plate_profiles(cells: pd.DataFrame, platemap: pd.DataFrame, plate_info: Mapping,
                   settings: Mapping | None = None) -> dict[str, pd.DataFrame]:
    """A plate's profiles at every level: wells (aggregated + annotated), normalised (per plate and
    stain source, then `clip_outliers`), selected (`select_features_by_source`: each stain source
    its own features) and consensus (per treatment and source).
    `settings` is config `profiles:` (keys aggregate, normalise, normalise_samples, outlier_limit,
    feature_select, na_cutoff, freq_cut, unique_cut, correlation_threshold, consensus)."""
    s = {**PROFILE_DEFAULTS, **(settings or {})}
    if not len(cells) or not feature_columns(cells):
        return profiles_from_wells(cells.iloc[:0], platemap, plate_info, settings)
    return profiles_from_wells(aggregate_wells(cells, s["aggregate"]), platemap, plate_info, settings)


def profiles_from_wells(wells: pd.DataFrame, platemap: pd.DataFrame, plate_info: Mapping,
                        settings: Mapping | None = None) -> dict[str, pd.DataFrame]:
    """plate_profiles from the plate's aggregated wells (aggregate_wells or aggregate_parquet_wells)."""
    s = {**PROFILE_DEFAULTS, **(settings or {})}
    if not len(wells) or not feature_columns(wells):
        raise ValueError(f"plate {plate_info.get('plate', '?')}: no cell was measured (see its "
                         "features/sites.csv for each site's status): no profiles can be made")
    wells = annotate_wells(wells, platemap, plate_info, replicate_by=s["replicate_by"])
    normalised = clip_outliers(normalise_profiles(wells, s["normalise"], s["normalise_samples"]),
                               s["outlier_limit"])
    selected = select_features_by_source(normalised, s["feature_select"], **selection_thresholds(s))
    consensus = consensus_profiles(selected, operation=s["consensus"])
    return {"wells": wells, "normalised": normalised, "selected": selected, "consensus": consensus}


def screen_scale_columns(scale_by: Sequence[str]) -> tuple[str, ...] | None:
    """normalise_profiles' `scale_by` for config `profiles.scale_by` (plate-sheet fields): the
    stain source and those fields; None (each plate its own scale) when they include the plate."""
    if "plate" in scale_by:
        return None
    unknown = sorted(set(scale_by) - set(PLATE_INFO_FIELDS))
    if unknown:
        raise ValueError(f"profiles.scale_by: {unknown} are not plate-sheet fields "
                         f"{['plate', *PLATE_INFO_FIELDS]}")
    return (SOURCE, *(f"{META}{f}" for f in scale_by))


def screen_profiles(wells: Sequence[pd.DataFrame], settings: Mapping | None = None
                    ) -> dict[str, pd.DataFrame]:
    """The screen's normalised and feature-selected well profiles and per-treatment consensus from
    every plate's annotated well profiles (features missing on some plates become NaN and fall to
    drop_na_columns).

    Each plate (and stain source) is centred on its own reference wells; the scale of each feature
    comes from the reference wells of every plate of a `scale_by` group pooled (default: the
    plates of one cell type; ["plate"]: each plate's own, as its plate profiles), then
    `clip_outliers` per stain source over the whole screen. On BBBC021 (55
    plates of 6 DMSO wells, one cell line) NSC 1-NN accuracy is 0.78 with each plate's own scale
    and 0.90 with the pooled one (the published figure: 0.82); tests/test_match.py."""
    s = {**PROFILE_DEFAULTS, **(settings or {})}
    if not wells:
        raise ValueError("screen_profiles: no plates")
    table = _metadata_first(pd.concat(list(wells), ignore_index=True))
    normalised = clip_outliers(normalise_profiles(table, s["normalise"], s["normalise_samples"],
                                                  scale_by=screen_scale_columns(s["scale_by"])),
                               s["outlier_limit"])
    selected = select_features_by_source(normalised, s["feature_select"], **selection_thresholds(s))
    consensus = consensus_profiles(selected, operation=s["consensus"])
    return {"normalised": normalised, "selected": selected, "consensus": consensus}
