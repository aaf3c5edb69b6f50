"""Matching and evaluation of profiles: kNN MoA / target matching (NSC, NSCB, top-k), target
distances, copairs mAP (replicate retrieval, MoA consistency), percent replicating, and the level-3
comparison of CellProfiler features measured on real and on virtual stains.

Conventions (profiles.py): `Metadata_*` columns are metadata, every other column a feature;
treatment profiles carry Metadata_treatment, Metadata_perturbation (the compound),
Metadata_control_type, Metadata_moa, Metadata_target, Metadata_batch.

kNN matching rules (Ljosa et al. 2013):
- NSC, not-same-compound: a query's candidates exclude every profile of its own compound (other
  doses too), `exclude=("Metadata_perturbation",)`, over one consensus profile per treatment.
- NSCB, not-same-compound-or-batch: candidates also exclude the query's batch,
  `exclude=("Metadata_perturbation", "Metadata_batch")`, over per-(treatment, batch) profiles.
- Queries and candidates are the labelled non-control profiles: controls (negcon / poscon) and
  profiles without a label are left out by default.
- A query none of whose candidates shares its label cannot be matched under the rule (e.g. a MoA
  with one compound under NSC); it is reported (`has_positive` False) and excluded from accuracy
  and top-k rates, whose `n` counts the queries that remain.
- Labels with several values separated by "|" (targets like "HDAC1|HDAC2") match when they share
  any value.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from copairs.map import average_precision, mean_average_precision, multilabel
from copairs.matching import UnpairedException
from scipy import stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.preprocessing import MultiLabelBinarizer

from brightpaint.profiles import (
    BATCH,
    CONTROL_TYPE,
    MOA,
    PERTURBATION,
    PLATE,
    SOURCE,
    TARGET,
    TREATMENT,
    WELL,
    consensus_profiles,
    feature_columns,
    source_profiles,
)

METRICS = ("cosine", "pearson")
# feature groups that describe a cell's shape and neighbourhood, which brightfield shows too, unlike
# its stains' intensities, textures and granularity
SHAPE_GROUPS = ("AreaShape", "Neighbors")
SHAPE_ONLY = "real, shape features only"
CONTROLS = ("negcon", "poscon")
LABEL_SEPARATOR = "|"
_COPAIRS_DISTANCE = {"cosine": "cosine", "pearson": "correlation"}
MATCH_DEFAULTS = {"metrics": list(METRICS), "top_k": [1, 3, 5], "null_size": 1000,
                  "top_features": 20, "seed": 0, "virtual_feature_min_r": 0.5}


# --------------------------------------------------------------------------- similarity


def similarity(X: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Pairwise similarity of the rows of X: cosine, or pearson (cosine of the row-centred rows).
    A row with zero norm (after centring) has similarity 0 to every row, itself included."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"similarity: need a 2-D array (profiles x features), got {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("similarity: profiles contain NaN or infinite values (select features "
                         "first, drop_na_columns)")
    if metric == "pearson":
        X = X - X.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(X, axis=1)
    unit = np.divide(X, norms[:, None], out=np.zeros_like(X), where=norms[:, None] > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def _features(profiles: pd.DataFrame, features: Sequence[str] | None) -> list[str]:
    features = list(features) if features is not None else feature_columns(profiles)
    if not features:
        raise ValueError("no feature columns")
    return features


def _missing(values: pd.Series) -> pd.Series:
    return values.isna() | values.astype(str).str.strip().isin(["", "nan", "None"])


def _pool(profiles: pd.DataFrame, label: str | None, controls: Sequence[str]) -> pd.DataFrame:
    """Labelled, non-control rows."""
    keep = pd.Series(True, index=profiles.index)
    if controls and CONTROL_TYPE in profiles.columns:
        keep &= ~profiles[CONTROL_TYPE].isin(list(controls))
    if label is not None:
        if label not in profiles.columns:
            raise ValueError(f"no column {label!r} in the profiles")
        keep &= ~_missing(profiles[label])
    return profiles[keep].reset_index(drop=True)


def label_values(label) -> list[str]:
    """The values of a (multi-)label: 'HDAC1|HDAC2' -> ['HDAC1', 'HDAC2'], sorted, blanks dropped;
    the one rule by which every metric here says two profiles share a label (any value)."""
    return sorted({t.strip() for t in str(label).split(LABEL_SEPARATOR) if t.strip()})


def _label_match(labels: pd.Series) -> np.ndarray:
    """n x n: rows share at least one label value ('|'-separated values)."""
    tokens = [frozenset(label_values(v)) for v in labels]
    vocabulary = {t: i for i, t in enumerate(sorted(set().union(*tokens)))} if tokens else {}
    onehot = np.zeros((len(tokens), max(len(vocabulary), 1)), dtype=np.int32)
    for i, ts in enumerate(tokens):
        for t in ts:
            onehot[i, vocabulary[t]] = 1
    return (onehot @ onehot.T) > 0


def _same(values: pd.Series) -> np.ndarray:
    """n x n: equal and not missing."""
    codes, _ = pd.factorize(values)  # missing -> -1
    return (codes[:, None] == codes[None, :]) & (codes[:, None] >= 0)


def _eligible(pool: pd.DataFrame, exclude: Sequence[str]) -> np.ndarray:
    allowed = ~np.eye(len(pool), dtype=bool)
    for column in exclude:
        if column not in pool.columns:
            raise ValueError(f"exclude column {column!r} is not in the profiles")
        allowed &= ~_same(pool[column])
    return allowed


def _ids(pool: pd.DataFrame, id_columns: Sequence[str]) -> list[str]:
    columns = [c for c in id_columns if c in pool.columns] or [None]
    if columns == [None]:
        return [str(i) for i in range(len(pool))]
    return [" / ".join(str(v) for v in row if not pd.isna(v))
            for row in pool[columns].itertuples(index=False)]


# --------------------------------------------------------------------------- kNN matching


def nearest_neighbours(profiles: pd.DataFrame, label: str = MOA,
                       exclude: Sequence[str] = (PERTURBATION,), metric: str = "cosine",
                       k: int = 5, controls: Sequence[str] = CONTROLS,
                       id_columns: Sequence[str] = (TREATMENT, BATCH, SOURCE),
                       features: Sequence[str] | None = None) -> pd.DataFrame:
    """Nearest neighbours of every query profile among the eligible candidates.

    Queries = candidates = the rows with a label that are not controls (`controls`, by
    Metadata_control_type). A candidate is eligible for a query unless it is the query or shares
    any `exclude` column's value with it (NSC: the compound; NSCB: compound and batch; a missing
    value is shared with nothing). Candidates are ranked by similarity (ties: table order).

    One row per query: query (id from `id_columns`), query_label, neighbour, neighbour_label,
    similarity (to the nearest eligible candidate), match (nearest shares the label),
    first_hit_rank (1-based rank of the first eligible candidate sharing the label, NaN if none),
    has_positive (some eligible candidate shares the label; queries without one are excluded from
    the accuracies), n_candidates, top_k ("; "-joined ids of the k nearest), metric, label, rule
    (the exclude columns, "+"-joined).
    """
    pool = _pool(profiles, label, controls)
    features = _features(profiles, features)
    rule = "+".join(c.removeprefix("Metadata_") for c in exclude) or "none"
    columns = ["query", "query_label", "neighbour", "neighbour_label", "similarity", "match",
               "first_hit_rank", "has_positive", "n_candidates", "top_k", "metric", "label", "rule"]
    if len(pool) == 0:
        return pd.DataFrame(columns=columns)
    S = similarity(pool[features].to_numpy(dtype=float), metric)
    allowed = _eligible(pool, exclude)
    hits = _label_match(pool[label])
    ids, labels = _ids(pool, id_columns), pool[label].astype(str).tolist()
    rows = []
    for i in range(len(pool)):
        candidates = np.flatnonzero(allowed[i])
        order = candidates[np.argsort(-S[i, candidates], kind="stable")]
        hit = hits[i, order]
        nearest = int(order[0]) if len(order) else None
        rows.append({
            "query": ids[i], "query_label": labels[i],
            "neighbour": ids[nearest] if nearest is not None else None,
            "neighbour_label": labels[nearest] if nearest is not None else None,
            "similarity": float(S[i, nearest]) if nearest is not None else np.nan,
            "match": bool(hit[0]) if len(hit) else False,
            "first_hit_rank": float(np.argmax(hit) + 1) if hit.any() else np.nan,
            "has_positive": bool(hit.any()), "n_candidates": len(order),
            "top_k": "; ".join(ids[j] for j in order[:k]),
            "metric": metric, "label": label, "rule": rule})
    return pd.DataFrame(rows, columns=columns)


def knn_accuracy(neighbours: pd.DataFrame) -> float:
    """1-NN accuracy of a `nearest_neighbours` table: the fraction of queries (with an eligible
    same-label candidate) whose nearest eligible candidate shares the label; NaN if none."""
    scored = neighbours[neighbours["has_positive"].astype(bool)]
    return float(scored["match"].astype(bool).mean()) if len(scored) else float("nan")


def top_k_hit_rate(neighbours: pd.DataFrame, k: int) -> float:
    """Fraction of queries (with an eligible same-label candidate) with a same-label candidate
    among their k nearest eligible candidates; k=1 equals `knn_accuracy`."""
    scored = neighbours[neighbours["has_positive"].astype(bool)]
    return float((scored["first_hit_rank"] <= k).mean()) if len(scored) else float("nan")


def target_matching(profiles: pd.DataFrame, target: str = TARGET,
                    exclude: Sequence[str] = (PERTURBATION,), metric: str = "cosine",
                    controls: Sequence[str] = CONTROLS,
                    features: Sequence[str] | None = None) -> dict:
    """Target matching over treatment profiles (labelled non-control rows).

    - match_rate: fraction of treatments whose nearest not-same-compound neighbour shares a target
      (n = treatments that have a not-same-compound treatment sharing a target at all).
    - mtdist (mean matching-target distance): mean of (1 - similarity) over the unordered pairs of
      treatments that share a target but not the compound (not any `exclude` value); cosine
      distance in [0, 2] for metric cosine, 1 - Pearson r for pearson. Lower = same-target
      compounds look alike.
    - mtdist_all: the same mean over all not-same-compound pairs, for scale (a phenotypically
      uninformative target gives mtdist ~ mtdist_all).
    """
    neighbours = nearest_neighbours(profiles, target, exclude, metric, 1, controls,
                                    features=features)
    pool = _pool(profiles, target, controls)
    out = {"match_rate": knn_accuracy(neighbours),
           "n": int(neighbours["has_positive"].sum()) if len(neighbours) else 0,
           "n_without_positive": int((~neighbours["has_positive"].astype(bool)).sum())
           if len(neighbours) else 0,
           "mtdist": np.nan, "mtdist_all": np.nan, "n_pairs_same_target": 0, "n_pairs_all": 0}
    if len(pool) < 2:
        return out
    S = similarity(pool[_features(profiles, features)].to_numpy(dtype=float), metric)
    upper = np.triu(_eligible(pool, exclude), k=1)
    same = upper & _label_match(pool[target])
    distance = 1.0 - S
    out.update(n_pairs_all=int(upper.sum()), n_pairs_same_target=int(same.sum()))
    if upper.any():
        out["mtdist_all"] = float(distance[upper].mean())
    if same.any():
        out["mtdist"] = float(distance[same].mean())
    return out


# --------------------------------------------------------------------------- mAP (copairs)


def _copairs_map(meta: pd.DataFrame, feats: np.ndarray, pos_sameby, pos_diffby, neg_sameby,
                 neg_diffby, group: list[str], metric: str, null_size: int, threshold: float,
                 seed: int, multilabel_col: str | None = None) -> pd.DataFrame:
    if multilabel_col is None:
        ap = average_precision(meta, feats, pos_sameby=pos_sameby, pos_diffby=pos_diffby,
                               neg_sameby=neg_sameby, neg_diffby=neg_diffby,
                               distance=_COPAIRS_DISTANCE[metric], progress_bar=False)
    else:
        ap = multilabel.average_precision(meta, feats, pos_sameby=pos_sameby, pos_diffby=pos_diffby,
                                          neg_sameby=neg_sameby, neg_diffby=neg_diffby,
                                          multilabel_col=multilabel_col,
                                          distance=_COPAIRS_DISTANCE[metric], progress_bar=False)
    # copairs caches null distributions per (n_pos, n_total) in cache_dir (default ~/.copairs),
    # and the seed of each cached null depends on the order of configurations in the run that
    # wrote it: a private cache per call keeps results a function of the inputs and the seed.
    with tempfile.TemporaryDirectory(prefix="copairs-") as cache:
        maps = mean_average_precision(ap, group, null_size=null_size, threshold=threshold,
                                      seed=seed, progress_bar=False, max_workers=1,
                                      cache_dir=cache)
    if multilabel_col is None:
        counts = meta.groupby(group).size().rename("n_profiles").reset_index()
    else:  # a profile counts towards each of its labels
        counts = (meta[group].explode(multilabel_col).groupby(group).size()
                  .rename("n_profiles").reset_index())
    maps = maps.drop(columns=["indices"]).merge(counts, on=group, how="left")
    return maps.rename(columns={"mean_average_precision": "mAP",
                                "mean_normalized_average_precision": "normalised_mAP",
                                "corrected_p_value": "q_value", "below_corrected_p": "retrieved"})


def replicate_map(wells: pd.DataFrame, replicate: str = TREATMENT, metric: str = "cosine",
                  reference: str = "negcon", neg_sameby: Sequence[str] = (PLATE,),
                  null_size: int = 10000, threshold: float = 0.05, seed: int = 0,
                  features: Sequence[str] | None = None) -> pd.DataFrame:
    """Replicate retrieval mAP against negative controls (phenotypic activity), with copairs.

    For every non-reference well: positives = the other wells of its `replicate` group, negatives
    = the reference wells (Metadata_control_type == `reference`) of the same `neg_sameby` (plate);
    AP of ranking its positives above those negatives; mAP per replicate group with copairs'
    permutation p-value and Benjamini-Hochberg q-value. Reference wells are never positives of
    each other (each gets its own reference index, copairs' recipe).

    Returns one row per group: <replicate>, mAP, normalised_mAP, p_value, q_value, below_p,
    retrieved (q < threshold), n_profiles. Fraction retrieved = `result["retrieved"].mean()`.
    Raises ValueError when there are no replicate pairs or no reference wells.
    """
    features = _features(wells, features)
    missing = [c for c in (replicate, CONTROL_TYPE) if c not in wells.columns]
    if missing:
        raise ValueError(f"replicate_map: the wells lack {missing}")
    df = wells[~_missing(wells[replicate])].reset_index(drop=True)
    is_reference = (df[CONTROL_TYPE] == reference).to_numpy()
    if not is_reference.any():
        raise ValueError(f"replicate_map: no {reference} wells to retrieve replicates against")
    ref_col = "Metadata_reference_index"
    meta = df[[replicate, *[c for c in neg_sameby if c in df.columns]]].copy()
    meta[replicate] = meta[replicate].astype(str)
    meta[ref_col] = np.where(is_reference, np.arange(len(df)), -1)
    try:
        maps = _copairs_map(meta, df[features].to_numpy(dtype=float), [replicate, ref_col], [],
                            [c for c in neg_sameby if c in df.columns], [replicate, ref_col],
                            [replicate], metric, null_size, threshold, seed)
    except UnpairedException as err:
        raise ValueError(f"replicate_map: {err} (need >= 2 wells of a treatment)") from err
    references = set(meta.loc[is_reference, replicate])
    return maps[~maps[replicate].isin(references)].reset_index(drop=True)


def consistency_map(profiles: pd.DataFrame, label: str = MOA, compound: str = PERTURBATION,
                    metric: str = "cosine", controls: Sequence[str] = CONTROLS,
                    null_size: int = 10000, threshold: float = 0.05, seed: int = 0,
                    features: Sequence[str] | None = None) -> pd.DataFrame:
    """MoA (or target) consistency mAP with copairs over labelled non-control profiles
    (treatment consensus or wells), multi-label as kNN matching: for each label value, positives
    = the profiles of other compounds that carry it, negatives = the profiles sharing no value
    with the query (copairs' multilabel AP; 'A|B' counts towards A and towards B). One row per
    label value: mAP, normalised_mAP, p_value, q_value, below_p, retrieved, n_profiles. Raises
    ValueError when no label value has two compounds."""
    pool = _pool(profiles, label, controls)
    features = _features(profiles, features)
    meta = pool[[label, compound]].astype(str)
    meta[label] = [label_values(v) for v in meta[label]]
    compounds = meta.explode(label).groupby(label)[compound].nunique()
    if not (compounds >= 2).any():
        raise ValueError(f"consistency_map: no {label} value is carried by two compounds "
                         f"({len(pool)} labelled non-control profiles)")
    try:
        return _copairs_map(meta, pool[features].to_numpy(dtype=float), [label], [compound], [],
                            [label], [label], metric, null_size, threshold, seed,
                            multilabel_col=label)
    except UnpairedException as err:
        raise ValueError(f"consistency_map: {err} (need a {label} with >= 2 compounds)") from err


# --------------------------------------------------------------------------- percent replicating


def percent_replicating(wells: pd.DataFrame, replicate: str = TREATMENT, n_null: int = 1000,
                        seed: int = 0, metric: str = "pearson", quantile: float = 0.95,
                        controls: Sequence[str] = ("negcon",),
                        features: Sequence[str] | None = None) -> pd.DataFrame:
    """Percent replicating (Way et al. 2022; JUMP): for each replicate group with >= 2 wells, the
    median pairwise similarity of its wells, against the `quantile` (95th percentile) of a null of
    `n_null` groups of the same size whose wells come from distinct replicate groups (random,
    seeded: deterministic for a seed). Control wells (`controls`) are neither groups nor in the
    null.

    Returns one row per group: <replicate>, n_wells, median_similarity, null_threshold,
    replicating (median > threshold). Percent replicating = 100 * `result["replicating"].mean()`.
    A group larger than the number of distinct groups gets no null (threshold NaN, not
    replicating).
    """
    features = _features(wells, features)
    pool = _pool(wells, replicate, controls)
    columns = [replicate, "n_wells", "median_similarity", "null_threshold", "replicating"]
    if len(pool) == 0:
        return pd.DataFrame(columns=columns)
    S = similarity(pool[features].to_numpy(dtype=float), metric)
    members = {g: np.asarray(ix) for g, ix in pool.groupby(replicate, sort=True).indices.items()}
    names = list(members)
    upper = {}

    def median_pairwise(ix: np.ndarray) -> float:
        m = len(ix)
        if m not in upper:
            upper[m] = np.triu_indices(m, k=1)
        a, b = upper[m]
        return float(np.median(S[ix[a], ix[b]]))

    rng = np.random.default_rng(seed)
    thresholds = {}
    for size in sorted({len(ix) for ix in members.values() if len(ix) >= 2}):
        if size > len(names):
            thresholds[size] = np.nan
            continue
        null = np.empty(n_null)
        for t in range(n_null):
            groups = rng.choice(len(names), size=size, replace=False)
            ix = np.array([rng.choice(members[names[g]]) for g in groups])
            null[t] = median_pairwise(ix)
        thresholds[size] = float(np.quantile(null, quantile))
    rows = []
    for name, ix in members.items():
        if len(ix) < 2:
            continue
        value, threshold = median_pairwise(ix), thresholds[len(ix)]
        rows.append((name, len(ix), value, threshold, bool(value > threshold)))
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- level 3: real vs virtual


def feature_compartment(feature: str) -> str:
    """First `_` token: Nuclei / Cells / Cytoplasm / ..."""
    return feature.split("_")[0]


def feature_group(feature: str) -> str:
    """Second `_` token: AreaShape, Intensity, Texture, Granularity, RadialDistribution,
    Correlation, Neighbors, ... ('' when the name has one token)."""
    parts = feature.split("_")
    return parts[1] if len(parts) > 1 else ""


def _paired(real: pd.DataFrame, virtual: pd.DataFrame, on: Sequence[str]
            ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    on = list(on)
    for name, table in (("real", real), ("virtual", virtual)):
        missing = [c for c in on if c not in table.columns]
        if missing:
            raise ValueError(f"{name} profiles lack {missing}")
        if table.duplicated(on).any():
            raise ValueError(f"{name} profiles have several rows per {on}")
    features = [f for f in feature_columns(real) if f in set(feature_columns(virtual))]
    if not features:
        raise ValueError("real and virtual profiles share no feature")
    keys = real[on].merge(virtual[on], on=on, how="inner")
    if len(keys) < 3:
        raise ValueError(f"only {len(keys)} wells are in both the real and the virtual profiles "
                         "(need >= 3)")
    r = keys.merge(real[[*on, *features]], on=on, how="left")
    v = keys.merge(virtual[[*on, *features]], on=on, how="left")
    return r[features], v[features], features


def feature_agreement(real_wells: pd.DataFrame, virtual_wells: pd.DataFrame,
                      on: Sequence[str] = (PLATE, WELL)) -> pd.DataFrame:
    """Per-feature Pearson correlation between features measured on real and on virtual stains,
    over the wells in both tables (matched on `on`), one row per shared feature: feature,
    compartment, group, pearson (NaN when either side is constant or fewer than 3 wells have both
    values), n_wells. `agreement_summary` turns it into the CPcor table."""
    r, v, features = _paired(real_wells, virtual_wells, on)
    rows = []
    for f in features:
        a, b = r[f].to_numpy(dtype=float), v[f].to_numpy(dtype=float)
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        value = np.nan
        if ok.sum() >= 3:
            a, b = a - a.mean(), b - b.mean()
            denominator = np.sqrt((a * a).sum() * (b * b).sum())
            value = float(np.clip((a * b).sum() / denominator, -1, 1)) if denominator > 0 else np.nan
        rows.append((f, feature_compartment(f), feature_group(f), value, int(ok.sum())))
    return pd.DataFrame(rows, columns=["feature", "compartment", "group", "pearson", "n_wells"])


def agreement_summary(agreement: pd.DataFrame) -> pd.DataFrame:
    """The CPcor table: per (compartment, group), plus each compartment ('all' groups) and
    everything ('all', 'all'): n_features, n_undefined (NaN correlations, left out), median and
    mean Pearson r."""
    def summarise(df: pd.DataFrame) -> dict:
        values = df["pearson"].dropna()
        return {"n_features": len(df), "n_undefined": int(df["pearson"].isna().sum()),
                "median_pearson": float(values.median()) if len(values) else np.nan,
                "mean_pearson": float(values.mean()) if len(values) else np.nan}

    rows = [{"compartment": c, "group": g, **summarise(df)}
            for (c, g), df in agreement.groupby(["compartment", "group"], sort=True)]
    rows += [{"compartment": c, "group": "all", **summarise(df)}
             for c, df in agreement.groupby("compartment", sort=True)]
    rows.append({"compartment": "all", "group": "all", **summarise(agreement)})
    return pd.DataFrame(rows)


def top_feature_nmae(real_wells: pd.DataFrame, virtual_wells: pd.DataFrame, label: str = MOA,
                     n: int = 20, seed: int = 0, on: Sequence[str] = (PLATE, WELL),
                     n_estimators: int = 300) -> pd.DataFrame:
    """N-MAE of the most informative features (level 3 of the virtual-staining evaluation).

    A random forest (scikit-learn, `n_estimators` trees, random_state=seed, n_jobs=1) learns
    `label` from the real well features (wells with a label; features with NaN left out), its
    values as a multi-label target ('A|B' is both A and B, as in every metric here); its
    impurity importances rank the features. For the top n: N-MAE = mean over matched wells of
    |virtual - real| / std(real) (std over those wells, ddof=1; NaN for a constant feature).
    0 = identical; ~1 = errors as large as the feature's spread across wells.

    Returns feature, importance, rank (1 = most important), nmae, n_wells.
    """
    r, v, features = _paired(real_wells, virtual_wells, on)
    labelled = real_wells[~_missing(real_wells[label])]
    usable = [f for f in features if np.isfinite(labelled[f].to_numpy(dtype=float)).all()]
    classes = MultiLabelBinarizer().fit_transform([label_values(v) for v in labelled[label]])
    if classes.shape[1] < 2 or not usable:
        raise ValueError(f"top_feature_nmae: need >= 2 {label} values and finite features")
    forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    forest.fit(labelled[usable].to_numpy(dtype=float), classes)
    importance = pd.Series(forest.feature_importances_, index=usable)
    top = importance.sort_values(ascending=False, kind="stable").head(n)
    rows = []
    for rank, (f, value) in enumerate(top.items(), start=1):
        a, b = r[f].to_numpy(dtype=float), v[f].to_numpy(dtype=float)
        ok = np.isfinite(a) & np.isfinite(b)
        scale = a[ok].std(ddof=1) if ok.sum() >= 2 else np.nan
        nmae = float(np.mean(np.abs(b[ok] - a[ok])) / scale) if scale > 0 else np.nan
        rows.append((f, float(value), rank, nmae, int(ok.sum())))
    return pd.DataFrame(rows, columns=["feature", "importance", "rank", "nmae", "n_wells"])


# --------------------------------------------------------------------------- summary


def _row(metric: str, value: float, n: int, details: str = "") -> dict:
    return {"metric": metric, "value": float(value) if value is not None else np.nan, "n": int(n),
            "details": details}


def _knn_rows(neighbours: pd.DataFrame, name: str, top_k: Sequence[int]) -> list[dict]:
    n = int(neighbours["has_positive"].sum()) if len(neighbours) else 0
    without = len(neighbours) - n
    details = f"{len(neighbours)} queries, {without} without an eligible same-label candidate"
    if not len(neighbours):
        details += " (no non-control profile has a label: an empty plate-map column?)"
    rows = [_row(f"{name}_accuracy", knn_accuracy(neighbours), n, details)]
    rows += [_row(f"{name}_top{k}", top_k_hit_rate(neighbours, k), n, details)
             for k in top_k if k != 1]
    return rows


def replication(wells: pd.DataFrame, replicate: str = TREATMENT) -> str:
    """How many replicate groups (non-control) have the >= 2 wells the replicate metrics need, said
    with the remedy when most have one (a dose-response plate: one well per compound and dose)."""
    if replicate not in wells.columns:
        return f"no {replicate} column"
    pool = wells[~wells[CONTROL_TYPE].isin(["negcon"])] if CONTROL_TYPE in wells.columns else wells
    sizes = pool.loc[~_missing(pool[replicate]), replicate].value_counts()
    replicated = int((sizes >= 2).sum())
    text = f"{replicated} of {len(sizes)} treatments have >= 2 wells"
    if len(sizes) and replicated < len(sizes) / 2:
        text += (" (one well per compound and dose? profiles.replicate_by: [perturbation] makes "
                 "a compound's doses its replicates)")
    return text


def matching(wells: pd.DataFrame, consensus: pd.DataFrame | None = None, label: str = MOA,
             target: str = TARGET, metrics: Sequence[str] = METRICS,
             top_k: Sequence[int] = (1, 3, 5), null_size: int = 1000, seed: int = 0
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`matching_summary` and the nearest-neighbour tables it was computed from."""
    if SOURCE in wells.columns and wells[SOURCE].nunique() > 1:
        raise ValueError("matching: one stain source at a time (filter Metadata_Source)")
    if consensus is None:
        consensus = consensus_profiles(wells, (TREATMENT,))
    rows, tables = [], []
    n_batches = wells[BATCH].nunique() if BATCH in wells.columns else 0
    per_batch = (consensus_profiles(wells, (TREATMENT, BATCH)) if n_batches >= 2 else None)
    for metric in metrics:
        nsc = nearest_neighbours(consensus, label, (PERTURBATION,), metric, max(top_k))
        tables.append(nsc)
        rows += [{**r, "metric": f"{r['metric']}_{metric}"}
                 for r in _knn_rows(nsc, f"{label.removeprefix('Metadata_')}_nsc", top_k)]
        name = f"{label.removeprefix('Metadata_')}_nscb_accuracy_{metric}"
        if per_batch is None:
            rows.append(_row(name, np.nan, 0, f"needs >= 2 batches, the profiles have {n_batches}"))
        else:
            nscb = nearest_neighbours(per_batch, label, (PERTURBATION, BATCH), metric, max(top_k))
            tables.append(nscb)
            rows += [{**r, "metric": f"{r['metric']}_{metric}"}
                     for r in _knn_rows(nscb, f"{label.removeprefix('Metadata_')}_nscb", top_k)]
        if target in consensus.columns:
            t = target_matching(consensus, target, (PERTURBATION,), metric)
            details = f"{t['n_without_positive']} treatments without a same-target other compound"
            rows.append(_row(f"target_match_rate_{metric}", t["match_rate"], t["n"], details))
            rows.append(_row(f"mtdist_{metric}", t["mtdist"], t["n_pairs_same_target"],
                             "mean 1 - similarity, same target, different compound"))
            rows.append(_row(f"mtdist_all_pairs_{metric}", t["mtdist_all"], t["n_pairs_all"],
                             "mean 1 - similarity, all different-compound pairs (scale)"))
    groups = replication(wells)
    try:
        rep = replicate_map(wells, null_size=null_size, seed=seed)
        rows.append(_row("replicate_mAP", rep["mAP"].mean(), len(rep),
                         "copairs, cosine, positives same treatment, negatives negcon same plate; "
                         + groups))
        rows.append(_row("replicate_fraction_retrieved", rep["retrieved"].mean(), len(rep),
                         "treatments with q < 0.05 (BH over treatments)"))
    except ValueError as err:
        rows.append(_row("replicate_mAP", np.nan, 0, f"{err}; {groups}"))
    try:
        con = consistency_map(consensus, label, null_size=null_size, seed=seed)
        rows.append(_row(f"{label.removeprefix('Metadata_')}_consistency_mAP", con["mAP"].mean(),
                         len(con), "copairs, cosine, treatment profiles, same label other compound"))
    except ValueError as err:
        rows.append(_row(f"{label.removeprefix('Metadata_')}_consistency_mAP", np.nan, 0, str(err)))
    pr = percent_replicating(wells, n_null=null_size, seed=seed)
    rows.append(_row("percent_replicating", 100 * pr["replicating"].mean() if len(pr) else np.nan,
                     len(pr), "median pairwise Pearson vs 95th percentile of non-replicate null; "
                     + groups))
    summary = pd.DataFrame(rows, columns=["metric", "value", "n", "details"])
    neighbours = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return summary, neighbours


def matching_summary(wells: pd.DataFrame, consensus: pd.DataFrame | None = None,
                     label: str = MOA, target: str = TARGET, metrics: Sequence[str] = METRICS,
                     top_k: Sequence[int] = (1, 3, 5), null_size: int = 1000, seed: int = 0
                     ) -> pd.DataFrame:
    """One tidy table (metric, value, n, details) of a plate's or a screen's matching, from its
    normalised, feature-selected, annotated well profiles of one stain source (and optionally the
    per-treatment consensus; built from the wells when None):

    - <label>_nsc_accuracy_<metric>, <label>_nsc_top<k>_<metric>: NSC 1-NN accuracy and top-k
      hit rates over treatment profiles (n = queries with an eligible same-label candidate; top1
      is the accuracy and is not repeated);
    - <label>_nscb_accuracy_<metric>, ..._top<k>_...: NSCB over per-(treatment, batch) profiles
      (NaN with a reason when there is one batch);
    - target_match_rate_<metric>, mtdist_<metric>, mtdist_all_pairs_<metric> (`target_matching`);
    - replicate_mAP, replicate_fraction_retrieved (`replicate_map`), <label>_consistency_mAP
      (`consistency_map`), percent_replicating (in %, `percent_replicating`).
    """
    return matching(wells, consensus, label, target, metrics, top_k, null_size, seed)[0]


def shape_only_matching(consensus: pd.DataFrame, metric: str = "cosine", wells: pd.DataFrame | None = None,
                        null_size: int = 1000, seed: int = 0) -> pd.DataFrame:
    """MoA NSC 1-NN accuracy of treatment profiles from their shape features alone (SHAPE_GROUPS),
    and, given the well profiles, their replicate mAP (`replicate_map`): about what a perfect reader
    of brightfield could reach from real-stain profiles, the reference that tells a virtual stain's
    shortfall in the model from one in the physics (a stain whose signal leaves no trace in
    brightfield). `matching_summary`'s columns, NaN with the reason where the profiles hold no
    shape feature."""
    shape = [c for c in _features(consensus, None) if feature_group(c) in SHAPE_GROUPS]
    name = f"{MOA.removeprefix('Metadata_')}_nsc_accuracy_{metric}"
    none = "no shape feature (AreaShape, Neighbors) in the profiles"
    if not shape:
        rows = [_row(name, np.nan, 0, none)]
    else:
        nsc = nearest_neighbours(consensus, MOA, (PERTURBATION,), metric, 1, features=shape)
        rows = [{**r, "metric": name, "details": f"{r['details']}; {len(shape)} shape features"}
                for r in _knn_rows(nsc, "nsc", (1,))]
    if wells is not None:
        try:
            if not shape:
                raise ValueError(none)
            rep = replicate_map(wells, null_size=null_size, seed=seed, features=shape)
            rows.append(_row("replicate_mAP", rep["mAP"].mean(), len(rep),
                             f"copairs, cosine, {len(shape)} shape features"))
        except ValueError as err:
            rows.append(_row("replicate_mAP", np.nan, 0, str(err)))
    return pd.DataFrame(rows, columns=["metric", "value", "n", "details"])


def virtual_feature_agreement(normalised: pd.DataFrame) -> pd.DataFrame:
    """`feature_agreement` of the real and virtual well profiles in `normalised`, every feature
    (empty, with its columns, where no well has both sources)."""
    empty = pd.DataFrame(columns=["feature", "compartment", "group", "pearson", "n_wells"])
    if SOURCE not in normalised.columns or not {"real", "virtual"} <= set(normalised[SOURCE]):
        return empty
    real = normalised[normalised[SOURCE] == "real"]
    virtual = normalised[normalised[SOURCE] == "virtual"]
    if real[[PLATE, WELL]].merge(virtual[[PLATE, WELL]], on=[PLATE, WELL]).empty:
        return empty
    return feature_agreement(real, virtual)


def chance_correlation(n_wells: np.ndarray | int, p: float = 0.01) -> np.ndarray:
    """The Pearson r that `n_wells` pairs of unrelated values exceed with probability `p` (one-sided
    t test; 1 below 3 pairs)."""
    n = np.asarray(n_wells, dtype=float)
    t = stats.t.ppf(1 - p, np.maximum(n - 2, 1))
    return np.where(n >= 3, t / np.sqrt(np.maximum(n - 2, 1) + t * t), 1.0)


def trusted_virtual_features(agreement: pd.DataFrame, min_r: float | None) -> list[str] | None:
    """Features of the virtual stains whose real-vs-virtual Pearson r over the wells measured on both
    sources (`virtual_feature_agreement`) is at least `min_r`, and above what chance gives over that
    many wells (`chance_correlation`: r 0.66 over 12 wells, 0.47 over 24, 0.27 over 72), so that a
    few wells cannot make a feature look trusted: those a virtual profile can be read by. None
    (every feature) when `min_r` is None or 0, or when no feature was compared."""
    if not min_r or agreement is None or agreement["pearson"].notna().sum() == 0:
        return None
    floor = np.maximum(min_r, chance_correlation(agreement["n_wells"].to_numpy()))
    return sorted(agreement.loc[agreement["pearson"].to_numpy() >= floor, "feature"])


def virtual_matching_features(candidates: Sequence[str], trusted: list[str] | None,
                              min_r: float | None) -> tuple[list[str], dict]:
    """The virtual profiles' features to match on, of the selected `candidates`, and the summary row
    virtual_features_trusted that says how many of how many and why."""
    if trusted is None:
        why = ("virtual_feature_min_r is off" if not min_r
               else "no well measured on both stain sources here to compare them on")
        return list(candidates), _row("virtual_features_trusted", len(candidates), len(candidates),
                                      f"every feature: {why}")
    chosen = set(trusted)
    keep = [f for f in candidates if f in chosen]
    if not keep:
        return list(candidates), _row("virtual_features_trusted", 0, len(candidates),
                                      f"no selected feature has real-vs-virtual r >= {min_r} above "
                                      "chance: every feature kept")
    return keep, _row("virtual_features_trusted", len(keep), len(candidates),
                      f"selected features with real-vs-virtual r >= {min_r} (and above chance) over "
                      "the wells measured on both sources")


def _restrict_features(profiles: pd.DataFrame, keep: Sequence[str]) -> pd.DataFrame:
    kept = set(keep)
    return profiles.drop(columns=[c for c in feature_columns(profiles) if c not in kept])


def match_profiles(selected: pd.DataFrame, consensus: pd.DataFrame, normalised: pd.DataFrame,
                   settings: Mapping | None = None) -> dict[str, pd.DataFrame]:
    """The matching tables of a plate or the screen (workflow rules match_plate / match_screen):

    - summary: `matching_summary` per stain source (column source), plus level-3 rows
      (feature_agreement_median_pearson, top<n>_feature_nmae) and the real profiles' NSC and
      replicate mAP from shape features alone (`shape_only_matching`, source SHAPE_ONLY) when both
      sources are present;
    - neighbours: the nearest-neighbour tables (column source);
    - agreement: `feature_agreement` per feature on the normalised (all features) well profiles,
      with the random-forest importance rank and N-MAE of the top features (empty without both
      sources).

    `settings` is config `match:` (metrics, top_k, null_size, top_features, seed,
    virtual_feature_min_r). The virtual profiles are matched on the selected features that follow
    their real counterparts over the wells measured on both sources here (`trusted_virtual_features`
    of that agreement table; a virtual feature that does not follow its real one from well to well
    adds noise, not biology), with a summary row virtual_features_trusted saying how many of how
    many; where no well has both sources (an apply-only plate), on every feature.
    """
    s = {**MATCH_DEFAULTS, **(settings or {})}
    virtual_agreement = virtual_feature_agreement(normalised)
    trusted = trusted_virtual_features(virtual_agreement, s["virtual_feature_min_r"])
    sources = (sorted(selected[SOURCE].dropna().unique()) if SOURCE in selected.columns
               else [None])
    summaries, neighbour_tables = [], []
    for source in sources:
        # each source on the features its own selection kept (select_features_by_source)
        wells = source_profiles(selected, source)
        cons = source_profiles(consensus, source)
        note = None
        if source == "virtual":
            keep, note = virtual_matching_features(feature_columns(wells), trusted,
                                                   s["virtual_feature_min_r"])
            wells, cons = _restrict_features(wells, keep), _restrict_features(cons, keep)
        summary, neighbours = matching(wells, cons, metrics=s["metrics"], top_k=s["top_k"],
                                       null_size=s["null_size"], seed=s["seed"])
        if note is not None:
            summary = pd.concat([summary, pd.DataFrame([note])], ignore_index=True)
        summaries.append(summary.assign(source=source))
        neighbour_tables.append(neighbours.assign(source=source))
    agreement = pd.DataFrame(columns=["feature", "compartment", "group", "pearson", "n_wells",
                                      "importance", "rank", "nmae"])
    if SOURCE in normalised.columns and {"real", "virtual"} <= set(normalised[SOURCE]):
        real = normalised[normalised[SOURCE] == "real"]
        virtual = normalised[normalised[SOURCE] == "virtual"]
        agreement = virtual_agreement
        rows = [_row("feature_agreement_median_pearson", agreement["pearson"].median(),
                     int(agreement["pearson"].notna().sum()),
                     "per-feature Pearson r real vs virtual over wells")]
        try:
            top = top_feature_nmae(real, virtual, n=s["top_features"], seed=s["seed"])
            agreement = agreement.merge(top.drop(columns=["n_wells"]), on="feature", how="left")
            rows.append(_row(f"top{s['top_features']}_feature_nmae", top["nmae"].mean(), len(top),
                             "mean |virtual - real| / std(real), random-forest top MoA features"))
        except ValueError as err:
            rows.append(_row(f"top{s['top_features']}_feature_nmae", np.nan, 0, str(err)))
        summaries.append(pd.DataFrame(rows).assign(source="real vs virtual"))
        summaries.append(shape_only_matching(source_profiles(consensus, "real"), s["metrics"][0],
                                             source_profiles(selected, "real"), s["null_size"],
                                             s["seed"]).assign(source=SHAPE_ONLY))
    return {"summary": pd.concat(summaries, ignore_index=True),
            "neighbours": pd.concat(neighbour_tables, ignore_index=True),
            "agreement": agreement}
