"""Segmentation with Cellpose 3: nuclei (DNA channel) and cells (cell-body channel + nuclei).

Weights never come from the network. Cellpose's named models (`nuclei`, `cyto3`, `cpsam`, ...)
download at run time, and `CellposeModel()` built without weights silently runs random ones, so
`load_cellpose_model` takes a weight file only, checks that it is a complete Cellpose state dict (a
partial or foreign file would otherwise load with strict=False and leave random layers), reads the
network's widths from the file, and loads it strictly. The project ships small reduced networks
(widths 16-32-64-128) trained from scratch on the demo generator's images (`train_cellpose_model`,
rule `segment_train_models`); a user's own Cellpose weights (e.g. a cyto3 copy) load the same way.

Inputs follow Cellpose's two-channel convention: nuclei model = (DNA, zeros), cell model = (cell
body, DNA). Each channel is scaled to its 1st-99th percentile (Cellpose's own normalisation), then
optionally gamma-corrected (the virtual-staining literature used 0.3), by one function for training
and prediction alike.

After Cellpose: size filters, then `relate_objects` makes the compartments CellProfiler expects: one
nucleus per cell (the nucleus that overlaps the cell most), nuclei clipped to their cell, cytoplasm =
cell minus nucleus, the three label images sharing object numbers. Cells without a nucleus and nuclei
without a cell are dropped and counted; objects touching the image border are dropped as a pair
(their features would be biased), by default.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_well_metadata
from scipy import ndimage

from .provenance import sha256_file

log = logging.getLogger(__name__)

NAMED_MODELS = ("cyto", "cyto2", "cyto3", "nuclei", "cpsam", "tissuenet_cp3", "livecell_cp3",
                "yeast_PhC_cp3", "yeast_BF_cp3", "bact_phase_cp3", "bact_fluor_cp3",
                "deepbacs_cp3", "cyto2_cp3")
REDUCED_WIDTHS = (16, 32, 64, 128)
STYLE_WIDTH = 256  # cellpose.core.run_net allocates styles of this width whatever the network
OBJECTS = ("nuclei", "cells", "cytoplasm")
_FIRST_CONV = "downsample.down.res_down_{}.conv.conv_0.2.weight"


class SegmentError(ValueError):
    """A segmentation input or weight file that cannot be used, named with what is wrong."""


@dataclass(frozen=True)
class SegmentSettings:
    """Cellpose and object settings shared by every site of a run (config `segment:`)."""

    nuclei_diameter: float = 0.0  # px; 0 = estimated once per plate and input
    cell_diameter: float = 0.0
    gamma: float = 1.0  # applied to the [0, 1]-scaled channels before Cellpose; 1 = off
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_nucleus_area: int = 15  # px
    max_nucleus_area: int = 0  # px; 0 = no limit
    min_cell_area: int = 30
    max_cell_area: int = 0
    exclude_border: bool = True
    batch: int = 8  # 224-px tiles per forward pass
    diameter_sites: int = 8  # sites sampled to estimate a plate's diameters

    @classmethod
    def from_config(cls, section: dict) -> SegmentSettings:
        """From the workflow's `segment:` config (keys that are not settings, such as the weight
        paths, are the workflow's and are ignored here; the schema checks their spelling)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in known}).checked()

    def checked(self) -> SegmentSettings:
        for name in ("nuclei_diameter", "cell_diameter", "min_nucleus_area", "max_nucleus_area",
                     "min_cell_area", "max_cell_area"):
            if getattr(self, name) < 0:
                raise SegmentError(f"segment settings: {name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.gamma <= 5:
            raise SegmentError(f"segment settings: gamma must be in (0, 5], got {self.gamma}")
        if self.batch < 1 or self.diameter_sites < 1:
            raise SegmentError("segment settings: batch and diameter_sites must be >= 1")
        return self


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def resolve_weights(weights: str | Path, base: str | Path = ".") -> Path:
    """The weight file a config entry names. A Cellpose model name (`cyto3`, `nuclei`, `cpsam`, ...)
    is accepted only when its file already sits in Cellpose's model folder: brightpaint never lets
    Cellpose download it."""
    text = str(weights).strip()
    if not text:
        raise SegmentError("no Cellpose weight file given")
    path = Path(text) if Path(text).is_absolute() else Path(base) / text
    if path.is_file():
        return path
    if text in NAMED_MODELS:
        from cellpose.models import MODEL_DIR

        cached = [MODEL_DIR / name for name in (text, f"{text}torch_0")]
        for candidate in cached:
            if candidate.is_file():
                return candidate
        raise SegmentError(
            f"Cellpose model {text!r} is a named model whose weights Cellpose downloads at run time; "
            f"brightpaint never downloads weights. Put the weight file at {cached[0]} or give its path "
            "in the config (segment: nuclei_weights / cell_weights), or use the shipped models in "
            "resources/cellpose/")
    raise SegmentError(f"Cellpose weight file {path} not found")


def cellpose_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a Cellpose weight file, checked: it must be a torch file of a Cellpose
    CPnet (every layer present), never something that would load partially."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SegmentError(f"{path}: not a Cellpose weight file (torch cannot read it: "
                           f"{type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(state, dict) or _FIRST_CONV.format(0) not in state:
        what = f"keys like {sorted(state)[:3]}" if isinstance(state, dict) else type(state).__name__
        raise SegmentError(f"{path}: not a Cellpose 3 CPnet state dict ({what}); a Cellpose 4 "
                           "(cpsam) or other network cannot be used here")
    return state


def network_widths(state: dict[str, torch.Tensor]) -> list[int]:
    """[input channels, width 1, ..., width 4] of the CPnet a state dict belongs to."""
    widths = [int(state[_FIRST_CONV.format(0)].shape[1])]
    level = 0
    while _FIRST_CONV.format(level) in state:
        widths.append(int(state[_FIRST_CONV.format(level)].shape[0]))
        level += 1
    return widths


def _padded_net_class():
    from cellpose.resnet_torch import CPnet

    class StylePaddedCPnet(CPnet):
        """CPnet whose style vector is zero-padded to the 256 values `run_net` stores, so a reduced
        network runs through Cellpose's own tiling and mask code unchanged."""

        def forward(self, data):
            output, style, downsampled = super().forward(data)
            if style.shape[1] < STYLE_WIDTH:
                style = F.pad(style, (0, STYLE_WIDTH - style.shape[1]))
            return output, style, downsampled

    return StylePaddedCPnet


def build_network(widths: Sequence[int], diam_mean: float):
    """A fresh (randomly initialised) Cellpose network of the given widths, for training."""
    return _padded_net_class()(list(widths), 3, 3, mkldnn=False, max_pool=True, diam_mean=float(diam_mean))


def load_cellpose_model(weights: str | Path, device: torch.device | str = "cpu"):
    """A cellpose.models.CellposeModel whose network is the one in `weights`, loaded strictly."""
    from cellpose.models import CellposeModel

    logging.getLogger("cellpose").setLevel(logging.ERROR)  # per-call progress lines, not news
    path = Path(weights)
    state = cellpose_state(path)
    widths = network_widths(state)
    device = torch.device(device)
    net = build_network(widths, float(state["diam_mean"][0]) if "diam_mean" in state else 30.0)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SegmentError(f"{path}: Cellpose weights do not fit a CPnet of widths {widths}: "
                           f"{str(err)[:300]}") from err
    # Built without weights on purpose: its random network is replaced at once by the loaded one
    # and the object never leaves this function otherwise.
    model = CellposeModel(gpu=device.type == "cuda", pretrained_model=False, nchan=widths[0], device=device)
    net.mkldnn = model.mkldnn
    model.net = net.to(device)
    model.net.eval()
    model.pretrained_model = str(path)
    model.diam_mean = float(net.diam_mean.item())
    model.diam_labels = float(net.diam_labels.item())
    model.nbase = widths
    return model


def model_card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def model_description(weights: str | Path) -> dict:
    """What the report and the site tables record of a weight file: path, sha256, widths, diameters,
    and the card beside it when there is one."""
    state = cellpose_state(weights)
    card_file = model_card_path(weights)
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    return {"path": str(weights), "sha256": sha256_file(weights), "widths": network_widths(state),
            "diam_mean": float(state["diam_mean"][0]) if "diam_mean" in state else None,
            "diam_labels": float(state["diam_labels"][0]) if "diam_labels" in state else None,
            "card": card}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def scale_channel(image: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """One channel to [0, 1] by its 1st-99th percentile (Cellpose's normalisation), then ** gamma.
    A constant (or empty) channel becomes zeros. NaN or infinite pixels are an error."""
    image = np.asarray(image, np.float32)
    if not np.isfinite(image).all():
        raise SegmentError("image has NaN or infinite pixels")
    low, high = np.percentile(image, [1, 99])
    if high <= low:
        return np.zeros_like(image)
    scaled = np.clip((image - low) / (high - low), 0, 1)
    return scaled if gamma == 1 else scaled ** np.float32(gamma)


def cellpose_input(main: np.ndarray, second: np.ndarray | None = None, gamma: float = 1.0) -> np.ndarray:
    """(2, Y, X) float32: the channel to segment and the helper channel (nuclei for cells; zeros
    for nuclei), each scaled by `scale_channel`."""
    first = scale_channel(main, gamma)
    other = np.zeros_like(first) if second is None else scale_channel(second, gamma)
    return np.stack([first, other])


def site_quality(image: np.ndarray) -> str:
    """Why a site's segmentation input cannot be trusted ('' when it can): blank or saturated."""
    image = np.asarray(image)
    if not np.isfinite(image).all():
        return "NaN or infinite pixels"
    if np.issubdtype(image.dtype, np.integer):
        at_top = float(np.mean(image == np.iinfo(image.dtype).max))
        if at_top > 0.5:
            return f"saturated: {100 * at_top:.1f}% of pixels at the dtype maximum"
    if float(np.ptp(image)) == 0:
        return f"blank image (constant value {float(image.flat[0]):g})"
    return ""


# ---------------------------------------------------------------------------------------------
# Cellpose
# ---------------------------------------------------------------------------------------------


def run_cellpose(model, inputs: np.ndarray, *, diameter: float, settings: SegmentSettings,
                 min_size: int) -> np.ndarray:
    """Labels (N, Y, X) int32 of N same-size inputs (N, 2, Y, X), already scaled. The sites go
    through Cellpose as one stack, so its tiles are batched across sites. `diameter` 0 runs at the
    network's own scale."""
    inputs = np.asarray(inputs, np.float32)
    if inputs.ndim != 4 or inputs.shape[1] != 2:
        raise SegmentError(f"Cellpose input must be (sites, 2, Y, X), got {inputs.shape}")
    rescale = model.diam_mean / diameter if diameter > 0 else 1.0
    masks, _, _ = model.eval(inputs, channel_axis=1, z_axis=0, normalize=False, rescale=rescale,
                             diameter=None, batch_size=settings.batch,
                             flow_threshold=settings.flow_threshold,
                             cellprob_threshold=settings.cellprob_threshold, min_size=min_size,
                             do_3D=False, stitch_threshold=0.0)
    return np.asarray(masks, np.int32).reshape(inputs.shape[0], *inputs.shape[2:])


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """Diameter of the circle of each object's area, for every object of a label image."""
    counts = np.bincount(np.asarray(labels).ravel())[1:]
    return 2 * np.sqrt(counts[counts > 0] / np.pi)


def estimate_diameter(model, inputs: np.ndarray, settings: SegmentSettings, min_size: int) -> float:
    """Median object diameter (px) in sample inputs. Cellpose runs assuming diameters from half to
    four times the network's own; the answer is the median size found at the assumption that agrees
    best with what it finds (a network shown objects far from its size cuts them up or misses them,
    so a single run at its own scale can be far off); scales that find fewer than half the objects of
    the most fruitful one are not considered. Falls back to the network's diameter when
    nothing is found at any scale."""
    runs = []
    for assumed in model.diam_mean * 2.0 ** np.arange(-1, 2.5, 0.5):
        labels = run_cellpose(model, inputs, diameter=float(assumed), settings=settings, min_size=min_size)
        found = np.concatenate([equivalent_diameters(site) for site in labels])
        if len(found):
            runs.append((abs(np.log(np.median(found) / assumed)), float(np.median(found)), len(found)))
    # a scale that finds only a few stray objects agrees with itself by chance: ignore it
    runs = [r for r in runs if r[2] >= 0.5 * max((r[2] for r in runs), default=0)]
    best = min(runs)[1] if runs else 0.0
    return best if best > 0 else float(model.diam_mean)


# ---------------------------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------------------------


def filter_sizes(labels: np.ndarray, min_area: int = 0, max_area: int = 0) -> np.ndarray:
    """Remove objects smaller than `min_area` or (when > 0) larger than `max_area` pixels."""
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel())
    drop = areas < min_area
    if max_area > 0:
        drop |= areas > max_area
    drop[0] = False
    if not drop.any():
        return labels
    out = labels.copy()
    out[drop[labels]] = 0
    return out


def touching_border(labels: np.ndarray) -> np.ndarray:
    """Label ids of the objects with a pixel on the image edge."""
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.unique(edge[edge > 0])


def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label in a, label in b, pixels in common) for every overlapping pair."""
    both = (a > 0) & (b > 0)
    pairs = np.stack([a[both], b[both]]).astype(np.int64)
    if pairs.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    unique, counts = np.unique(pairs, axis=1, return_counts=True)
    return unique[0], unique[1], counts


def _best_partner(ids: np.ndarray, partners: np.ndarray, counts: np.ndarray) -> dict[int, int]:
    """For each id, the partner it shares most pixels with (ties: the lower partner id)."""
    order = np.lexsort((partners, -counts, ids))
    best: dict[int, int] = {}
    for i in order:
        best.setdefault(int(ids[i]), int(partners[i]))
    return best


@dataclass(frozen=True)
class RelatedObjects:
    nuclei: np.ndarray  # int32, object k = nucleus of cell k
    cells: np.ndarray
    cytoplasm: np.ndarray  # cell k minus nucleus k
    counts: dict  # objects found and dropped, by reason


def relate_objects(nuclei: np.ndarray, cells: np.ndarray, exclude_border: bool = True) -> RelatedObjects:
    """One nucleus per cell, one cell per nucleus, shared object numbers 1..n.

    A cell keeps the nucleus it overlaps most, provided that nucleus overlaps this cell more than any
    other; the nucleus is clipped to the cell. Cells without a nucleus and nuclei without a cell are
    dropped (counted). With `exclude_border`, a pair is dropped when its cell or nucleus touches the
    image edge."""
    nuclei, cells = np.asarray(nuclei), np.asarray(cells)
    if nuclei.shape != cells.shape:
        raise SegmentError(f"nuclei {nuclei.shape} and cells {cells.shape} differ in shape")
    nucleus_ids = np.unique(nuclei[nuclei > 0])
    cell_ids = np.unique(cells[cells > 0])
    n_ids, c_ids, common = _overlaps(nuclei, cells)
    nucleus_of_cell = _best_partner(c_ids, n_ids, common)
    cell_of_nucleus = _best_partner(n_ids, c_ids, common)
    pairs = sorted((c, n) for c, n in nucleus_of_cell.items() if cell_of_nucleus.get(n) == c)
    border = set()
    if exclude_border:
        border = set(touching_border(cells).tolist()) | {-int(n) for n in touching_border(nuclei)}
    kept = [(c, n) for c, n in pairs if c not in border and -n not in border]
    cell_lut = np.zeros(int(cells.max()) + 1, np.int32)
    nucleus_lut = np.zeros(int(nuclei.max()) + 1, np.int32)
    for new, (c, n) in enumerate(kept, start=1):
        cell_lut[c] = new
        nucleus_lut[n] = new
    new_cells = cell_lut[cells]
    new_nuclei = nucleus_lut[nuclei]
    new_nuclei[new_nuclei != new_cells] = 0  # a nucleus is clipped to its own cell
    cytoplasm = np.where(new_nuclei > 0, 0, new_cells).astype(np.int32)
    paired_cells = {c for c, _ in pairs}
    paired_nuclei = {n for _, n in pairs}
    counts = {"nuclei_found": len(nucleus_ids), "cells_found": len(cell_ids), "objects": len(kept),
              "cells_without_nucleus": int(len(set(cell_ids.tolist()) - paired_cells)),
              "nuclei_without_cell": int(len(set(nucleus_ids.tolist()) - paired_nuclei)),
              "border_objects": len(pairs) - len(kept)}
    return RelatedObjects(new_nuclei, new_cells, cytoplasm, counts)


# ---------------------------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------------------------


@dataclass
class Segmenter:
    """The two Cellpose models and the settings of a run, with the diameters fixed for a plate."""

    nuclei_model: object
    cell_model: object
    settings: SegmentSettings
    nuclei_diameter: float = 0.0
    cell_diameter: float = 0.0

    def calibrate(self, sample: Sequence[tuple[np.ndarray, np.ndarray]]) -> Segmenter:
        """Diameters from the settings, or estimated once from sample (nuclei, cell body) images."""
        s = self.settings
        nuclei_d, cell_d = s.nuclei_diameter, s.cell_diameter
        if sample and nuclei_d == 0:
            inputs = np.stack([cellpose_input(n, None, s.gamma) for n, _ in sample])
            nuclei_d = estimate_diameter(self.nuclei_model, inputs, s, s.min_nucleus_area)
        if sample and cell_d == 0:
            inputs = np.stack([cellpose_input(c, n, s.gamma) for n, c in sample])
            cell_d = estimate_diameter(self.cell_model, inputs, s, s.min_cell_area)
        return Segmenter(self.nuclei_model, self.cell_model, s, nuclei_d, cell_d)

    def segment(self, sites: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[RelatedObjects]:
        """Related nuclei / cells / cytoplasm of same-size sites given as (nuclei, cell body)
        images, run through each network as one batch."""
        if not sites:
            return []
        s = self.settings
        nuclei_in = np.stack([cellpose_input(n, None, s.gamma) for n, _ in sites])
        cell_in = np.stack([cellpose_input(c, n, s.gamma) for n, c in sites])
        nuclei = run_cellpose(self.nuclei_model, nuclei_in, diameter=self.nuclei_diameter, settings=s,
                              min_size=s.min_nucleus_area)
        cells = run_cellpose(self.cell_model, cell_in, diameter=self.cell_diameter, settings=s,
                             min_size=s.min_cell_area)
        return [relate_objects(filter_sizes(n, s.min_nucleus_area, s.max_nucleus_area),
                               filter_sizes(c, s.min_cell_area, s.max_cell_area), s.exclude_border)
                for n, c in zip(nuclei, cells, strict=True)]

    def segment_nuclei(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Nuclei alone (no cell model: half the cost) of same-size nuclei-channel images, size
        filtered and, with exclude_border, without the objects touching the edge."""
        if not images:
            return []
        s = self.settings
        inputs = np.stack([cellpose_input(image, None, s.gamma) for image in images])
        found = run_cellpose(self.nuclei_model, inputs, diameter=self.nuclei_diameter, settings=s,
                             min_size=s.min_nucleus_area)
        out = []
        for labels in found:
            labels = filter_sizes(labels, s.min_nucleus_area, s.max_nucleus_area)
            if s.exclude_border:
                labels = np.where(np.isin(labels, touching_border(labels)), 0, labels)
            out.append(labels.astype(np.int32))
        return out

    def describe(self) -> dict:
        return {"nuclei_diameter": float(self.nuclei_diameter), "cell_diameter": float(self.cell_diameter),
                **asdict(self.settings)}


# ---------------------------------------------------------------------------------------------
# Instance metrics (level 2 of the virtual-staining evaluation)
# ---------------------------------------------------------------------------------------------

def consecutive_labels(labels: np.ndarray) -> np.ndarray:
    """The same objects numbered 1..n (Cellpose's metrics index objects by label value)."""
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32)
    return inverse if labels.min() == 0 else inverse + 1


IOU_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def instance_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """AP@0.5, mean AP over IoU 0.5-0.95 (AP = TP / (TP + FP + FN), as in the DSB2018 and Cellpose
    papers), F1 at IoU 0.7, mean Jaccard (IoU) of the objects matched at 0.5, and object counts.
    Matching is Cellpose's optimal one-to-one assignment."""
    from cellpose.metrics import _intersection_over_union, average_precision

    truth = np.asarray(truth, np.int32)
    predicted = np.asarray(predicted, np.int32)
    if truth.shape != predicted.shape:
        raise SegmentError(f"label images differ in shape: {truth.shape} vs {predicted.shape}")
    truth, predicted = consecutive_labels(truth), consecutive_labels(predicted)
    ap, tp, fp, fn = average_precision(truth, predicted, threshold=list(IOU_THRESHOLDS))
    n_true, n_pred = int(truth.max()), int(predicted.max())
    at_07 = list(IOU_THRESHOLDS).index(0.7)
    f1 = 2 * tp[at_07] / max(2 * tp[at_07] + fp[at_07] + fn[at_07], 1)
    jaccard = np.nan
    if n_true and n_pred:
        iou = _intersection_over_union(truth, predicted)[1:, 1:]
        from scipy.optimize import linear_sum_assignment

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


# ---------------------------------------------------------------------------------------------
# Training the shipped networks
# ---------------------------------------------------------------------------------------------

KINDS = ("nuclei", "cells")
KIND_DIAMETERS = {"nuclei": 17.0, "cells": 30.0}  # Cellpose's own reference sizes


def simulated_training_data(n_sites: int, seed: int, size: int = 256) -> dict[str, list]:
    """Images and masks from the demo generator (never the demo screen's own sites: a different
    seed and plates). Each site gives two samples: the camera image (noise, vignetting) and a
    smoothed clean one (virtual stains are smooth). Returns {'nuclei_images', 'cell_images'
    ((2, Y, X) scaled inputs), 'nuclei_masks', 'cell_masks', 'sources'}."""
    from .simulate import PlateSpec, ScreenSpec, plate_wells, simulate_site

    plates = (PlateSpec("SEGFLAT", "SEGB", "flat", "train"), PlateSpec("SEGDENSE", "SEGB", "dense", "train"))
    spec = ScreenSpec(plates=plates, wells=384, sites=1, size=size, z_planes=5, seed=seed)
    rng = np.random.default_rng(seed)
    wells = plate_wells(384)
    data = {"nuclei_images": [], "cell_images": [], "nuclei_masks": [], "cell_masks": [], "sources": []}
    for i in range(n_sites):
        plate = plates[i % 2].plate
        well = wells[int(rng.integers(len(wells)))]
        site = simulate_site(spec, plate, well, 1)
        sigma = float(rng.uniform(0.7, 2.0))
        variants = {
            "camera": (site.images[("DNA", 0)], site.images[("CYTO", 0)]),
            "smooth": tuple(ndimage.gaussian_filter(site.clean[c], sigma)
                            + rng.normal(0, 0.01, site.clean[c].shape).astype(np.float32)
                            for c in ("DNA", "CYTO")),
        }
        for variant, (dna, cyto) in variants.items():
            data["nuclei_images"].append(cellpose_input(dna))
            data["cell_images"].append(cellpose_input(cyto, dna))
            data["nuclei_masks"].append(site.labels.nuclei.astype(np.int32))
            data["cell_masks"].append(site.labels.cells.astype(np.int32))
            data["sources"].append(f"{plate}/{well}/{variant}")
    return data


# CTC frames with gold-standard masks: the first ones may train the shipped nuclei network, the
# others are held out for its evaluation (tests/test_segment.py) and never trained on.
CTC_FRAMES = {"N2DH-GOWT1": {"train": ("01", "21", "31"), "test": ("39", "52", "72")},
              "N2DL-HeLa": {"train": ("13", "52"), "test": ("75", "79")}}


def ctc_frames(folder: str | Path, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, instance masks) of the CTC frames of `split` in nuclei-gt-coelho-ctc."""
    import tifffile

    root = Path(folder) / "data" / "Otsu_data"
    return [(f"{dataset}/t{frame}", tifffile.imread(root / dataset / "img" / f"t{frame}.tif"),
             tifffile.imread(root / dataset / "gt" / f"man_seg{frame}.tif").astype(np.int32))
            for dataset, splits in CTC_FRAMES.items() for frame in splits[split]]


def real_nuclei_training_data(folder: str | Path) -> dict[str, list]:
    """Real nuclei for training from nuclei-gt-coelho-ctc: the NIH3T3 Hoechst images (hand-drawn
    binary masks; objects = connected components) and the CTC training frames."""
    from PIL import Image

    root = Path(folder) / "data" / "Otsu_data" / "NIH3T3"
    data = {"images": [], "masks": [], "sources": []}
    for mask_file in sorted((root / "gt").glob("*.png"), key=lambda p: int(p.stem)):
        image = np.asarray(Image.open(root / "img" / f"dna-{mask_file.stem}.png"), np.float32)
        masks, _ = ndimage.label(np.asarray(Image.open(mask_file)) > 0)
        data["images"].append(cellpose_input(image))
        data["masks"].append(masks.astype(np.int32))
        data["sources"].append(f"NIH3T3/{mask_file.stem}")
    for name, image, masks in ctc_frames(folder, "train"):
        data["images"].append(cellpose_input(image))
        data["masks"].append(masks)
        data["sources"].append(name)
    return data


def train_cellpose_model(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], out: str | Path, *,
                         diam_mean: float, widths: Sequence[int] = REDUCED_WIDTHS, epochs: int = 40,
                         learning_rate: float = 0.005, batch: int = 8, seed: int = 0,
                         test_images: Sequence[np.ndarray] = (), test_masks: Sequence[np.ndarray] = ()
                         ) -> dict:
    """Train a Cellpose network from random initialisation with `cellpose.train.train_seg` on
    scaled (2, Y, X) inputs and their label images; write its weights to `out` (Cellpose's own
    format, loadable by `load_cellpose_model` and Cellpose) and return the loss history."""
    import tempfile

    from cellpose.train import train_seg

    from .atomic import atomic_path

    torch.manual_seed(seed)  # the initial weights; train_seg seeds numpy's global generator per epoch
    net = build_network([2, *widths], diam_mean)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path, train_losses, test_losses = train_seg(
            net, train_data=list(images), train_labels=list(masks),
            test_data=list(test_images) or None, test_labels=list(test_masks) or None,
            channel_axis=0, normalize=False, n_epochs=epochs, learning_rate=learning_rate,
            weight_decay=1e-4, batch_size=batch, save_path=tmp, model_name="model", min_train_masks=1,
            save_every=10 ** 9, rescale=True)
        with atomic_path(out) as partial:
            Path(partial).write_bytes(Path(path).read_bytes())
    return {"epochs": epochs, "learning_rate": learning_rate, "batch": batch, "seed": seed,
            "widths": [2, *widths], "diam_mean": diam_mean, "seconds": time.perf_counter() - start,
            "train_loss": [float(v) for v in train_losses],
            "test_loss": [float(v) for v in test_losses] if len(test_images) else []}


# ---------------------------------------------------------------------------------------------
# A plate: inputs, calibration, shards, evaluation
# ---------------------------------------------------------------------------------------------

SITE_COLUMNS = ["well", "site", "source", "status", "reason", "objects", "nuclei_found", "cells_found",
                "cells_without_nucleus", "nuclei_without_cell", "border_objects", "seconds"]
SiteReader = Callable[[str, int], tuple[np.ndarray, np.ndarray]]


def plate_readers(source, virtual_store: str | Path, nuclei: str, cell: str) -> dict[str, SiteReader]:
    """(nuclei image, cell-body image) readers per input of a plate: `real` (illumination-corrected
    stains, when the plate has both channels) and `virtual` (its VS_ channels)."""
    from .ingest import read_plane, read_store_layout
    from .plate import VIRTUAL_PREFIX, fluorescence_plane

    readers: dict[str, SiteReader] = {}
    if source.has_channel(nuclei) and source.has_channel(cell):
        readers["real"] = lambda well, site: (fluorescence_plane(source, well, site, nuclei),
                                              fluorescence_plane(source, well, site, cell))
    layout = read_store_layout(virtual_store)
    names = [VIRTUAL_PREFIX + nuclei, VIRTUAL_PREFIX + cell]
    if all(n in layout.channels for n in names):
        indices = [layout.channels.index(n) for n in names]
        readers["virtual"] = lambda well, site: tuple(
            np.asarray(read_plane(virtual_store, well, site, i, 0), np.float32) for i in indices)
    return readers


def calibrate_plate(models: tuple, settings: SegmentSettings, readers: dict[str, SiteReader],
                    sites: Sequence[tuple[str, int]], seed: int = 0) -> dict[str, dict]:
    """Diameters per input of a plate, from up to `settings.diameter_sites` usable sample sites (or
    the configured ones): {source: {'nuclei_diameter', 'cell_diameter', 'sites'}}."""
    rng = np.random.default_rng(seed)
    chosen = [sites[i] for i in sorted(rng.permutation(len(sites))[:settings.diameter_sites])]
    result = {}
    for name, read in readers.items():
        sample = []
        for well, site in chosen:
            images = read(well, site)
            if not site_quality(images[0]) and not site_quality(images[1]):
                sample.append(images)
        segmenter = Segmenter(*models, settings).calibrate(sample)
        result[name] = {"nuclei_diameter": segmenter.nuclei_diameter,
                        "cell_diameter": segmenter.cell_diameter,
                        "sites": [f"{w}/{s}" for w, s in chosen], "sample_sites": len(sample)}
    return result


def _site_row(well, site, source, status, reason, counts=None, seconds=0.0) -> dict:
    counts = counts or {}
    return {"well": well, "site": int(site), "source": source, "status": status, "reason": reason,
            **{k: int(counts.get(k, 0)) for k in SITE_COLUMNS[5:-1]}, "seconds": seconds}


def segment_shard(segmenters: dict[str, Segmenter], readers: dict[str, SiteReader],
                  sites: Sequence[tuple[str, int]], virtual_store: str | Path, out: str | Path, *,
                  skip: dict[str, dict[tuple[str, int], str]] | None = None, sites_per_batch: int = 8
                  ) -> pd.DataFrame:
    """Segment `sites` with every input's Segmenter and write a shard labels store at `out` (field
    images hard-linked from `virtual_store`, labels added; see `labels`). Sites go through Cellpose
    `sites_per_batch` at a time. A site whose input is blank, saturated or listed in `skip[source]`
    (with the reason) gets empty labels and status `skipped`; a site where nothing is found gets status
    `no_objects`. Returns one row per site and input (SITE_COLUMNS)."""
    from .atomic import atomic_path, link_tree
    from .ingest import field_path
    from .io import well_row_column
    from .labels import label_name, write_field_labels

    skip = skip or {}
    rows = []
    by_well: dict[str, list[int]] = {}
    for well, site in sites:
        by_well.setdefault(well, []).append(int(site))
    with atomic_path(out) as partial:
        root = zarr.open_group(partial, mode="w", zarr_format=3)
        fields = {}
        for well, well_sites in sorted(by_well.items()):
            row, column = well_row_column(well)
            well_group = root.require_group(row).require_group(column)
            write_well_metadata(well_group, [{"path": field_path(s)} for s in sorted(well_sites)],
                                fmt=FormatV05())
            for site in sorted(well_sites):
                link_tree(Path(virtual_store) / row / column / field_path(site),
                          Path(partial) / row / column / field_path(site))
                fields[(well, site)] = zarr.open_group(str(Path(partial) / row / column / field_path(site)),
                                                       mode="r+")
        ordered = sorted(fields)
        for name, read in readers.items():
            segmenter = segmenters[name]
            for start in range(0, len(ordered), sites_per_batch):
                batch, images = [], []
                began = time.perf_counter()
                for well, site in ordered[start:start + sites_per_batch]:
                    empty = np.zeros(2, np.int32)
                    reason = skip.get(name, {}).get((well, site), "")
                    if not reason:
                        pair = read(well, site)
                        reason = "; ".join(f"{what}: {why}" for what, why in
                                           zip(("nuclei channel", "cell channel"), map(site_quality, pair),
                                               strict=True) if why)
                    if reason:
                        shape = read_shape(fields[(well, site)])
                        empty = np.zeros(shape, np.uint32)
                        write_field_labels(fields[(well, site)],
                                           {label_name(o, name): empty for o in OBJECTS})
                        rows.append(_site_row(well, site, name, "skipped", reason))
                        continue
                    batch.append((well, site))
                    images.append(pair)
                results = segmenter.segment(images)
                seconds = (time.perf_counter() - began) / max(len(batch), 1)
                for (well, site), objects in zip(batch, results, strict=True):
                    write_field_labels(fields[(well, site)], {
                        label_name("nuclei", name): objects.nuclei, label_name("cells", name): objects.cells,
                        label_name("cytoplasm", name): objects.cytoplasm})
                    status = "ok" if objects.counts["objects"] else "no_objects"
                    reason = "" if objects.counts["objects"] else "no cell with a nucleus found"
                    rows.append(_site_row(well, site, name, status, reason, objects.counts, seconds))
    return pd.DataFrame(rows, columns=SITE_COLUMNS).sort_values(["source", "well", "site"],
                                                                ignore_index=True)


def read_shape(field: zarr.Group) -> tuple[int, int]:
    return tuple(field["0"].shape[-2:])


METRIC_COLUMNS = ["plate", "well", "site", "objects", "comparison", "ap50", "map50_95", "f1_70", "jaccard",
                  "n_true", "n_predicted", "tp50"]


def read_truth(pattern: str, plate: str, well: str, site: int, exclude_border: bool
               ) -> dict[str, np.ndarray] | None:
    """Ground-truth nuclei and cells of a site from files named by `pattern` ({plate}, {well},
    {site}, {objects} = nuclei | cells), related like the predictions (so border objects are
    dropped on both sides); None when the site has no truth files."""
    import tifffile

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
    from .labels import label_name, read_labels

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path
    from .labels import label_name, label_names, read_labels

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


def unusable_sites(stain_sites: pd.DataFrame) -> dict[str, dict[tuple[str, int], str]]:
    """Sites virtual staining skipped (their virtual channels are zeros), with its reason, to be
    skipped by segmentation of the virtual input."""
    bad = stain_sites[stain_sites["status"] != "ok"]
    return {"virtual": {(w, int(s)): f"no virtual stains: {r}"
                        for w, s, r in zip(bad["well"], bad["site"], bad["reason"], strict=True)}}


def train_shipped_model(kind: str, out: str | Path, *, sites: int = 48, epochs: int = 40, seed: int = 0,
                        threads: int = 2, real_nuclei: str | Path | None = None) -> dict:
    """Train the `kind` ('nuclei' or 'cells') network on `sites` generated sites (plus, for nuclei,
    the real images of `real_nuclei` = the nuclei-gt-coelho-ctc folder, when given and present),
    measure it on held-out generated sites, write the weights to `out` and return its card
    (training data, epochs, losses, AP@0.5 per image kind, sha256, versions)."""
    import platform

    import cellpose

    from . import __version__
    from .inference import torch_threads
    from .provenance import git_commit

    if kind not in KINDS:
        raise SegmentError(f"unknown model kind {kind!r} (one of {KINDS})")
    key = {"nuclei": ("nuclei_images", "nuclei_masks"), "cells": ("cell_images", "cell_masks")}[kind]
    data = simulated_training_data(sites, seed)
    test_seed = seed + 10_000
    test = simulated_training_data(max(4, sites // 4), test_seed)
    images, masks, real_sources = list(data[key[0]]), list(data[key[1]]), []
    if kind == "nuclei" and real_nuclei is not None and Path(real_nuclei).is_dir():
        real = real_nuclei_training_data(real_nuclei)
        images += real["images"]
        masks += real["masks"]
        real_sources = real["sources"]
    with torch_threads(threads):
        history = train_cellpose_model(images, masks, out, diam_mean=KIND_DIAMETERS[kind],
                                       epochs=epochs, seed=seed)
        model = load_cellpose_model(out)
        settings = SegmentSettings()
        min_size = settings.min_nucleus_area if kind == "nuclei" else settings.min_cell_area
        predicted = run_cellpose(model, np.stack(test[key[0]]), diameter=0, settings=settings,
                                 min_size=min_size)
    rows = [instance_metrics(t, p) for t, p in zip(test[key[1]], predicted, strict=True)]
    variants = [source.rsplit("/", 1)[1] for source in test["sources"]]
    metrics = {f"ap50_{v}": round(pooled_ap([r for r, w in zip(rows, variants, strict=True) if w == v]), 4)
               for v in sorted(set(variants))}
    metrics["map50_95"] = round(float(np.mean([r["map50_95"] for r in rows])), 4)
    return {
        "kind": kind, "format": "Cellpose 3 CPnet state dict (torch.save), loadable by cellpose.models",
        "inputs": ("channel 0: nuclei stain, channel 1: zeros" if kind == "nuclei"
                   else "channel 0: cell-body stain, channel 1: nuclei stain")
                  + "; each scaled to its 1st-99th percentile (brightpaint.segment.cellpose_input)",
        "widths": history["widths"], "diam_mean": history["diam_mean"],
        "training": {k: history[k]
                     for k in ("epochs", "learning_rate", "batch", "seed", "seconds", "train_loss")},
        "data": {"generator": "brightpaint.simulate (flat and dense cell types, all 384 treatments)",
                 "sites": sites, "seed": seed, "samples": len(data[key[0]]),
                 "variants": "camera image (noise, vignetting) and smoothed clean image per site",
                 "test_sites": len(test[key[0]]) // 2, "test_seed": test_seed,
                 "real_images": real_sources,
                 "real_source": "nuclei-gt-coelho-ctc (NIH3T3 Hoechst, Coelho 2009; CTC training frames "
                                f"{CTC_FRAMES}; held-out frames never trained on)" if real_sources else ""},
        "metrics": metrics, "sha256": sha256_file(out),
        "versions": {"brightpaint": __version__, "cellpose": cellpose.version, "torch": torch.__version__,
                     "python": platform.python_version(), "git_commit": git_commit()},
    }
