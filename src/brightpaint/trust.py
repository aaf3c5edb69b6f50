"""Trust in virtual stains: is a site's brightfield like the training plates' (domain of
applicability), and how unsure is the model about its prediction (test-time augmentation)?

Domain: a few scale-free statistics of the in-focus brightfield plane (the stain model z-scores its
input, so an exposure change alone is no shift for it; a change of contrast, sharpness or spatial
spectrum is: optics, magnification, cell type, density). The training sites give each statistic's
median and robust spread; a site's score is its largest robust |z|; the threshold is calibrated on
the held-out (validation) wells of the training plates.

Uncertainty: the model predicts the site under flips / rotations of its input; the mean is the
virtual stain, the per-pixel standard deviation the uncertainty map. A site's score is the map's
RMS relative to the mean prediction's standard deviation (a noise-to-signal ratio, which is what
lowers a virtual stain's correlation with the real one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from .focus import plls, var_laplacian

DOMAIN_STATISTICS = {"bf_cv": "brightfield contrast (std / mean)",
                     "bf_sharpness": "fine detail (variance of Laplacian / mean^2)",
                     "bf_plls": "power-spectrum slope"}
ROBUST_SD = 1.4826  # MAD -> standard deviation of a normal distribution
DOMAIN_COLUMNS = ["domain_score", "domain_outside", "domain_reason"]
# the dihedral group of the square, in the order used: n = 2 adds a flip, 4 all flips, 8 rotations
AUGMENTATIONS = ((0, False), (0, True), (2, True), (2, False), (1, False), (3, False), (1, True), (3, True))


# ---------------------------------------------------------------------------------------------
# Domain of applicability
# ---------------------------------------------------------------------------------------------


def brightfield_statistics(plane: np.ndarray) -> dict[str, float]:
    """The domain statistics of one illumination-corrected in-focus brightfield plane."""
    data = np.asarray(plane, dtype=np.float32)
    mean = float(data.mean(dtype=np.float64))
    if not np.isfinite(mean) or mean <= 0:
        return dict.fromkeys(DOMAIN_STATISTICS, np.nan)
    return {"bf_cv": float(data.std(dtype=np.float64)) / mean,
            "bf_sharpness": var_laplacian(data) / mean ** 2, "bf_plls": plls(data)}


def _robust_z(values: pd.DataFrame, domain: Mapping) -> pd.DataFrame:
    return pd.DataFrame({name: (values[name].astype(float) - s["median"]) / s["spread"]
                         for name, s in domain["statistics"].items()}, index=values.index)


def _scores(values: pd.DataFrame, domain: Mapping) -> pd.Series:
    # a statistic that cannot be computed (blank plane) is no evidence of being in the domain
    return _robust_z(values, domain).abs().fillna(np.inf).max(axis=1)


def describe_domain(train: pd.DataFrame, validation: pd.DataFrame, *, quantile: float = 0.99,
                    floor: float = 3.0) -> dict:
    """The training brightfield's domain, for a model card: per statistic the training sites'
    median and robust spread (1.4826 x MAD), and the score threshold: the `quantile` of the
    validation (held-out wells) sites' scores (an observed score: the smallest at or above the
    quantile), at least `floor` robust spreads."""
    if train.empty or validation.empty:
        raise ValueError("describe_domain: needs training and validation sites")
    statistics = {}
    for name, label in DOMAIN_STATISTICS.items():
        values = train[name].astype(float).dropna().to_numpy()
        if not len(values):
            raise ValueError(f"describe_domain: no training site has a finite {name}")
        median = float(np.median(values))
        spread = ROBUST_SD * float(np.median(np.abs(values - median))) or float(np.std(values)) or 1e-12
        statistics[name] = {"label": label, "median": median, "spread": spread}
    domain = {"statistics": statistics, "quantile": quantile, "floor": floor,
              "n_train": int(len(train)), "n_validation": int(len(validation))}
    held_out = _scores(validation, domain)
    domain["validation_score_max"] = float(held_out.max())
    # "higher": an observed score, never one interpolated below it (with the few dozen held-out
    # sites of a small screen, the 0.99 quantile is their largest score)
    domain["threshold"] = max(float(floor), float(np.quantile(held_out, quantile, method="higher")))
    return domain


def domain_scores(values: pd.DataFrame, domain: Mapping) -> pd.DataFrame:
    """Per site (rows of `values`, which hold the DOMAIN_STATISTICS): domain_score (largest robust
    |z| over the statistics), domain_outside (score above the card's threshold) and domain_reason
    (the statistic furthest out, its z and the threshold; empty when inside)."""
    z = _robust_z(values, domain)
    score = _scores(values, domain)
    outside = score > domain["threshold"]
    labels = {name: s["label"] for name, s in domain["statistics"].items()}
    reasons = []
    for index in values.index:
        if not outside[index]:
            reasons.append("")
            continue
        row = z.loc[index]
        if row.isna().any():
            missing = ", ".join(labels[n] for n in row.index[row.isna()])
            reasons.append(f"brightfield {missing} not computable (blank or constant plane)")
            continue
        name = row.abs().idxmax()
        side = "above" if row[name] > 0 else "below"
        reasons.append(f"{labels[name]} {abs(row[name]):.1f} robust SD {side} the training sites' "
                       f"(threshold {domain['threshold']:.1f})")
    return pd.DataFrame({"domain_score": score.astype(float), "domain_outside": outside.astype(bool),
                         "domain_reason": reasons}, index=values.index)


# ---------------------------------------------------------------------------------------------
# Uncertainty by test-time augmentation
# ---------------------------------------------------------------------------------------------


def augment(image: np.ndarray, index: int) -> np.ndarray:
    """Augmentation `index` (0 = identity) of a (..., Y, X) array."""
    turns, flip = AUGMENTATIONS[index]
    out = np.rot90(image, turns, axes=(-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if flip else out)


def undo_augment(image: np.ndarray, index: int) -> np.ndarray:
    turns, flip = AUGMENTATIONS[index]
    out = image[..., ::-1] if flip else image
    return np.ascontiguousarray(np.rot90(out, -turns, axes=(-2, -1)))


def predict_augmented(predict: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, n: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and per-pixel standard deviation of `predict` over the first `n` augmentations of
    `inputs` (each prediction mapped back). n = 1: the plain prediction and a zero map."""
    if not 1 <= n <= len(AUGMENTATIONS):
        raise ValueError(f"test-time augmentations: {n} is not in 1..{len(AUGMENTATIONS)}")
    total = squares = None
    for index in range(n):
        prediction = undo_augment(predict(augment(inputs, index)), index).astype(np.float64)
        total = prediction if total is None else total + prediction
        squares = prediction ** 2 if squares is None else squares + prediction ** 2
    mean = total / n
    variance = np.maximum(squares / n - mean ** 2, 0.0)
    return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


def site_uncertainty(mean: np.ndarray, spread: np.ndarray) -> float:
    """A site's uncertainty score for one channel: RMS of the spread map / std of the mean map."""
    signal = float(np.std(mean, dtype=np.float64))
    noise = float(np.sqrt(np.mean(np.square(spread, dtype=np.float64))))
    return noise / signal if signal > 0 else float("inf") if noise > 0 else 0.0


def uncertainty_error_correlation(metrics: pd.DataFrame) -> pd.DataFrame:
    """How well the uncertainty score ranks sites by their error (1 - PCC with the real stain):
    Spearman's rho per split and channel, and per split over the sites' means across channels
    ('all'). `metrics` holds plate, well, site, split, channel, pcc, uncertainty."""
    rows = []
    data = metrics.dropna(subset=["pcc", "uncertainty"]).assign(error=lambda d: 1 - d["pcc"])
    site_means = (data.groupby(["plate", "well", "site", "split"])[["uncertainty", "error"]].mean()
                  .reset_index().assign(channel="all"))
    for (split, channel), group in pd.concat([data, site_means]).groupby(["split", "channel"]):
        rho = spearmanr(group["uncertainty"], group["error"])[0] if len(group) >= 3 else np.nan
        rows.append({"split": split, "channel": channel, "sites": len(group), "spearman": float(rho)})
    return pd.DataFrame(rows, columns=["split", "channel", "sites", "spearman"])


def attach_uncertainty(metrics: pd.DataFrame, sites: pd.DataFrame) -> pd.DataFrame:
    """`metrics` (one row per well, site, channel) with column `uncertainty`: the site's score for
    that channel from the stain sites table (NaN where prediction had no augmentations)."""
    columns = [c for c in sites.columns if c.startswith("uncertainty_")]
    long = (sites[["well", "site", *columns]].melt(id_vars=["well", "site"], var_name="channel",
                                                    value_name="uncertainty")
            .assign(channel=lambda d: d["channel"].str.removeprefix("uncertainty_"),
                    site=lambda d: d["site"].astype(int),
                    uncertainty=lambda d: pd.to_numeric(d["uncertainty"], errors="coerce")))
    out = metrics.drop(columns=["uncertainty"], errors="ignore").merge(
        long, on=["well", "site", "channel"], how="left", validate="one_to_one")
    return out
