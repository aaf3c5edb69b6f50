"""Instance metrics of segmentations (level 2 of the virtual-staining evaluation): per site against
another segmentation or ground truth, pooled summaries, and the overlay figure of a plate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy.optimize import linear_sum_assignment

from ..atomic import atomic_path
from ..labels import label_name, label_names, read_labels
from .cellpose_modules import import_cellpose
from .objects import consecutive_labels, relate_objects
from .plates import SiteReader
from .run import scale_channel
from .settings import SegmentError

IOU_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def instance_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """AP@0.5, mean AP over IoU 0.5-0.95 (AP = TP / (TP + FP + FN), as in the DSB2018 and Cellpose
    papers), F1 at IoU 0.7, mean Jaccard (IoU) of the objects matched at 0.5, and object counts.
    Matching is Cellpose's optimal one-to-one assignment."""
    # at call time: cellpose.metrics takes seconds to import (OpenCV)
    metrics = import_cellpose("cellpose.metrics")

    truth = np.asarray(truth, np.int32)
    predicted = np.asarray(predicted, np.int32)
    if truth.shape != predicted.shape:
        raise SegmentError(f"label images differ in shape: {truth.shape} vs {predicted.shape}")
    truth, predicted = consecutive_labels(truth), consecutive_labels(predicted)
    ap, tp, fp, fn = metrics.average_precision(truth, predicted, threshold=list(IOU_THRESHOLDS))
    n_true, n_pred = int(truth.max()), int(predicted.max())
    at_07 = list(IOU_THRESHOLDS).index(0.7)
    f1 = 2 * tp[at_07] / max(2 * tp[at_07] + fp[at_07] + fn[at_07], 1)
    jaccard = np.nan
    if n_true and n_pred:
        iou = metrics._intersection_over_union(truth, predicted)[1:, 1:]
        rows, cols = linear_sum_assignment(-iou)
        matched = iou[rows, cols]
        matched = matched[matched >= 0.5]
        jaccard = float(matched.mean()) if len(matched) else 0.0
    empty = n_true == 0 and n_pred == 0
    return {"ap50": 1.0 if empty else float(ap[0]), "map50_95": 1.0 if empty else float(np.mean(ap)),
            "f1_70": 1.0 if empty else float(f1), "jaccard": jaccard,
            "n_true": n_true, "n_predicted": n_pred, "tp50": int(tp[0])}


def pooled_ap(rows: Sequence[dict]) -> float:
    """AP@0.5 over many sites, pooled by object counts (sum TP / sum (TP + FP + FN))."""
    tp = sum(r["tp50"] for r in rows)
    fp = sum(r["n_predicted"] - r["tp50"] for r in rows)
    fn = sum(r["n_true"] - r["tp50"] for r in rows)
    return tp / max(tp + fp + fn, 1)


METRIC_COLUMNS = ["plate", "well", "site", "objects", "comparison", "ap50", "map50_95", "f1_70", "jaccard",
                  "n_true", "n_predicted", "tp50"]


def read_truth(pattern: str, plate: str, well: str, site: int, exclude_border: bool
               ) -> dict[str, np.ndarray] | None:
    """Ground-truth nuclei and cells of a site from files named by `pattern` ({plate}, {well},
    {site}, {objects} = nuclei | cells), related like the predictions (so border objects are
    dropped on both sides); None when the site has no truth files."""
    paths = {o: Path(pattern.format(plate=plate, well=well, site=site, objects=o))
             for o in ("nuclei", "cells")}
    if not all(p.is_file() for p in paths.values()):
        return None
    related = relate_objects(tifffile.imread(paths["nuclei"]), tifffile.imread(paths["cells"]),
                             exclude_border)
    return {"nuclei": related.nuclei, "cells": related.cells}


def evaluate_plate(store: str | Path, plate: str, sites: pd.DataFrame, *, truth_pattern: str = "",
                   exclude_border: bool = True) -> pd.DataFrame:
    """Level-2 metrics per site: virtual vs real masks where a site has both, and each input vs
    ground truth where `truth_pattern` names truth files. `sites` is the segmentation site table;
    only sites segmented with status ok / no_objects are compared."""
    done = sites[sites["status"].isin(["ok", "no_objects"])]
    rows = []
    for (well, site), group in done.groupby(["well", "site"]):
        sources = set(group["source"])
        truth = read_truth(truth_pattern, plate, well, int(site), exclude_border) if truth_pattern else None
        for objects in ("nuclei", "cells"):
            masks = {s: read_labels(store, well, int(site), label_name(objects, s)) for s in sources}
            pairs = []
            if {"real", "virtual"} <= sources:
                pairs.append(("virtual_vs_real", masks["real"], masks["virtual"]))
            if truth is not None:
                pairs += [(f"{s}_vs_truth", truth[objects], masks[s]) for s in sorted(sources)]
            for comparison, reference, predicted in pairs:
                rows.append({"plate": plate, "well": well, "site": int(site), "objects": objects,
                             "comparison": comparison, **instance_metrics(reference, predicted)})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def summarise_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per comparison and object kind: pooled AP@0.5 and means of the per-site metrics."""
    rows = []
    for (comparison, objects), group in metrics.groupby(["comparison", "objects"]):
        records = group.to_dict("records")
        rows.append({"comparison": comparison, "objects": objects, "sites": len(group),
                     "ap50_pooled": pooled_ap(records), "ap50": group["ap50"].mean(),
                     "map50_95": group["map50_95"].mean(), "f1_70": group["f1_70"].mean(),
                     "jaccard": group["jaccard"].mean(), "objects_true": int(group["n_true"].sum()),
                     "objects_predicted": int(group["n_predicted"].sum())})
    return pd.DataFrame(rows)


def outlines(labels: np.ndarray) -> np.ndarray:
    """1-px object outlines (pixels whose 4-neighbourhood holds another label)."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dy:dy + labels.shape[0], dx:dx + labels.shape[1]] != centre
    return edge & (labels > 0)


def overlay_figure(store: str | Path, readers: dict[str, SiteReader], sites: Sequence[tuple[str, int]],
                   out: str | Path, plate: str, max_sites: int = 4) -> None:
    """Per site: the nuclei and cell-body inputs with real (green) and virtual (magenta) outlines of
    nuclei and cells."""
    # inside: matplotlib is for this figure only, and takes a while to import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = list(sites)[:max_sites]
    source = "real" if "real" in readers else "virtual"
    fig, axes = plt.subplots(max(len(chosen), 1), 2, figsize=(7, 3.4 * max(len(chosen), 1)), squeeze=False)
    colours = {"real": (0.1, 1.0, 0.1), "virtual": (1.0, 0.1, 1.0)}
    for row, (well, site) in enumerate(chosen):
        images = readers[source](well, site)
        names = label_names(store, well, site)
        for column, (objects, image) in enumerate(zip(("nuclei", "cells"), images, strict=True)):
            rgb = np.repeat(scale_channel(image)[..., None], 3, axis=2) * 0.8
            for name, colour in colours.items():
                if label_name(objects, name) in names:
                    rgb[outlines(read_labels(store, well, site, label_name(objects, name)))] = colour
            ax = axes[row, column]
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(f"{well} s{site} {objects} ({source} input)", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"Plate {plate}: green = segmented on real stains, magenta = on virtual stains", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as partial:
        fig.savefig(partial, dpi=90, format="png")
    plt.close(fig)
