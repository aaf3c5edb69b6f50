"""Generalisation matrix of virtual staining: train one model per group of wells with real stains
(cell type x phenotype group, e.g. non-toxic / toxic wells by a plate-map query), test every model
on every group's held-out wells, and report each evaluation level as the difference to the
in-distribution baseline (the model trained on the test group itself).

Levels, per test site:
1. pixels: PCC, SSIM, PSNR of each target channel (both images in plate-normalised units);
2. instances: AP@0.5 and F1@0.7 of Cellpose nuclei on the virtual nuclei channel (nuclei model
   alone, size-filtered, border objects dropped) against the plate's real-stain nuclei
   (labels.zarr, from the main run's segmentation);
3. features: N-MAE, over the real nuclei of the site, of their mean intensity in each target
   channel (virtual against real, relative to the real values' robust range). A per-nucleus
   intensity feature set, not CellProfiler's (the main run's level 3 is CellProfiler's).

The test sites of a group are its model's validation wells, so every model is scored on the same
sites of a group; a site among a model's own training wells is never used to score it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .groups import Group
from .labels import label_name, read_labels
from .metrics import image_metrics, robust_range
from .plate import PlateSource, fluorescence_plane, plate_scales, sample_items
from .segment.evaluate import instance_metrics
from .segment.run import Segmenter
from .stain.data import brightfield_input, select_wells
from .stain.predict import predict_normalised
from .stain.settings import StainError

LEVELS = {"pcc": "pixels", "ssim": "pixels", "psnr": "pixels", "ap50": "instances", "f1_70": "instances",
          "feature_nmae": "features"}
# metrics where lower is better (their difference to the baseline is read with the sign flipped)
LOWER_IS_BETTER = {"feature_nmae"}


def group_sources(group: Group, sources: Sequence[tuple[PlateSource, str]]) -> list[PlateSource]:
    """The training plates (source, cell type) of a group that hold at least one of its wells."""
    return [source for source, cell_type in sources
            if (not group.cell_type or cell_type == group.cell_type)
            and select_wells(source, group.query, f"generalisation group {group.name}")]


def held_out_sites(card: Mapping, sources: Sequence[PlateSource], limit: int = 0
                   ) -> list[tuple[PlateSource, str, int]]:
    """A group's test sites: the usable sites of its model's validation wells; at most `limit`
    of them (0: all), drawn with a fixed seed so that every model gets the same ones."""
    by_plate = {s.plate: s for s in sources}
    sites = [(by_plate[plate], well, site) for plate, split in card["wells"].items() if plate in by_plate
             for well, site in by_plate[plate].usable_sites(split["validation"])]
    return sample_items(np.random.default_rng(0), sites, limit) if limit else sites


def nuclei_features(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean intensity of `image` in every object of `labels` (objects 1..max, absent ones NaN)."""
    n = int(labels.max())
    if n == 0:
        return np.zeros(0)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    sums = np.bincount(labels.ravel(), weights=image.ravel().astype(np.float64), minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def evaluate_site(generator, card: Mapping, source: PlateSource, well: str, site: int,
                  scales: Mapping[str, tuple[float, float]], segmenter: Segmenter, labels_store,
                  nuclei: str, **tiling) -> list[dict]:
    """Every level's metrics of one model on one site: rows of (level, metric, channel, value)."""
    virtual = predict_normalised(generator, card, brightfield_input(source, well, site,
                                                                    card["inputs"]["half_width"]), **tiling)
    real = {c: (fluorescence_plane(source, well, site, c) - scales[c][0]) / scales[c][1]
            for c in card["targets"] if source.has_channel(c)}
    rows = []
    for index, channel in enumerate(card["targets"]):
        if channel not in real:
            continue
        scores = image_metrics(real[channel], virtual[index])
        rows += [{"level": LEVELS[m], "metric": m, "channel": channel, "value": scores[m]}
                 for m in ("pcc", "ssim", "psnr")]
    truth = read_labels(labels_store, well, site, label_name("nuclei", "real"))
    if nuclei in card["targets"]:
        found = segmenter.segment_nuclei([virtual[card["targets"].index(nuclei)]])[0]
        instances = instance_metrics(truth, found)
        rows += [{"level": "instances", "metric": m, "channel": nuclei, "value": instances[m]}
                 for m in ("ap50", "f1_70")]
    if truth.max() >= 3:
        for index, channel in enumerate(card["targets"]):
            if channel in real:
                real_features = nuclei_features(real[channel], truth)
                keep = np.isfinite(real_features)
                virtual_features = nuclei_features(virtual[index], truth)[keep]
                error = np.mean(np.abs(virtual_features - real_features[keep]))
                rows.append({"level": "features", "metric": "feature_nmae", "channel": channel,
                             "value": float(error / robust_range(real_features[keep]))})
    return rows


def evaluate_model(generator, card: Mapping, group: str, tests: Mapping[str, Sequence[tuple]],
                   segmenters: Mapping[str, Segmenter], labels_stores: Mapping[str, str], nuclei: str,
                   **tiling) -> pd.DataFrame:
    """Metrics of the model of `group` on every group's test sites ({test group: [(source, well,
    site)]}), leaving out sites of the model's own training wells; `segmenters` and
    `labels_stores` by plate (Cellpose with the plate's diameters for its virtual stains, and the
    plate's labels.zarr). One row per train group, test group, plate, well, site, level, metric,
    channel."""
    trained = {(plate, w) for plate, split in card["wells"].items() for w in split["train"]}
    scales: dict[str, dict] = {}
    rows = []
    for test_group, sites in tests.items():
        for source, well, site in sites:
            if (source.plate, well) in trained:
                continue
            if source.plate not in scales:
                usable = source.usable_sites()
                channels = [c for c in card["targets"] if source.has_channel(c)]
                sample = sample_items(np.random.default_rng(0), usable, 64)
                scales[source.plate] = plate_scales(source, sample, channels, "plate")
            for row in evaluate_site(generator, card, source, well, site, scales[source.plate],
                                     segmenters[source.plate], labels_stores[source.plate], nuclei,
                                     **tiling):
                rows.append({"train_group": group, "test_group": test_group, "plate": source.plate,
                             "well": well, "site": int(site), **row})
    if not rows:
        raise StainError(f"generalisation: the model of group {group} has no test site in any group")
    return pd.DataFrame(rows, columns=["train_group", "test_group", "plate", "well", "site", "level",
                                       "metric", "channel", "value"])


def generalisation_matrix(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per train group x test group and metric: the mean over the test group's sites (and
    channels), the in-distribution baseline (the test group's own model on the same sites) and
    the difference to it. `better` is the difference signed so that > 0 is better than baseline."""
    means = (metrics.groupby(["train_group", "test_group", "level", "metric"])["value"].mean()
             .rename("value").reset_index())
    baseline = (means[means["train_group"] == means["test_group"]]
                .set_index(["test_group", "metric"])["value"].rename("baseline"))
    out = means.join(baseline, on=["test_group", "metric"])
    out["difference"] = out["value"] - out["baseline"]
    out["better"] = np.where(out["metric"].isin(LOWER_IS_BETTER), -out["difference"], out["difference"])
    order = list(LEVELS)
    out["order"] = out["metric"].map(order.index)
    return (out.sort_values(["order", "train_group", "test_group"]).drop(columns="order")
            .reset_index(drop=True))


def generalisation_table(matrix: pd.DataFrame) -> pd.DataFrame:
    """The matrix for a page: one row per metric and training group, one column per test group,
    the difference to the in-distribution model (rounded)."""
    table = matrix.pivot_table(index=["level", "metric", "train_group"], columns="test_group",
                               values="difference").round(4)
    table = table.reset_index()
    table["order"] = table["metric"].map(list(LEVELS).index)
    table = table.sort_values(["order", "train_group"]).drop(columns="order")
    table.columns.name = None
    return table.reset_index(drop=True)


def matrix_figure(matrix: pd.DataFrame, path) -> None:
    """PNG: one heatmap per metric, rows = training group, columns = test group, colour = difference
    to the in-distribution baseline (red worse, blue better), numbers = the difference."""
    import matplotlib  # heavy; only this figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(matrix["metric"]))
    groups = sorted(set(matrix["train_group"]) | set(matrix["test_group"]))
    columns = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.ravel(), metrics, strict=False):
        part = matrix[matrix["metric"] == metric]
        grid = (part.pivot(index="train_group", columns="test_group", values="better")
                .reindex(index=groups, columns=groups))
        shown = (part.pivot(index="train_group", columns="test_group", values="difference")
                 .reindex(index=groups, columns=groups))
        limit = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
        ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
        for i in range(len(groups)):
            for j in range(len(groups)):
                value = shown.iat[i, j]
                if np.isfinite(value):
                    ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(groups)), groups, fontsize=7)
        ax.set_title(f"{metric} ({LEVELS[metric]})", fontsize=9)
        ax.set_xlabel("test group", fontsize=7)
        ax.set_ylabel("training group", fontsize=7)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_axis_off()
    fig.suptitle("virtual staining: difference to the in-distribution model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
