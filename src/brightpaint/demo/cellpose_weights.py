"""Training of the Cellpose networks the project ships (resources/cellpose/, rule segment_train):
small reduced networks trained from scratch on the demo generator's sites, the nuclei network also on
real nuclei (nuclei-gt-coelho-ctc), and measured on held-out generated sites."""

from __future__ import annotations

import platform
from pathlib import Path

import cellpose
import numpy as np
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from .. import __version__
from ..inference import torch_threads
from ..provenance import git_commit, sha256_file
from ..segment.evaluate import instance_metrics, pooled_ap
from ..segment.run import cellpose_input, run_cellpose
from ..segment.settings import SegmentError, SegmentSettings
from ..segment.train import train_cellpose_model
from ..segment.weights import load_cellpose_model
from .site import simulate_site
from .spec import PlateSpec, ScreenSpec
from .treatments import plate_wells

KINDS = ("nuclei", "cells")
KIND_DIAMETERS = {"nuclei": 17.0, "cells": 30.0}  # Cellpose's own reference sizes


def simulated_training_data(n_sites: int, seed: int, size: int = 256) -> dict[str, list]:
    """Images and masks from the demo generator (never the demo screen's own sites: a different
    seed and plates). Each site gives two samples: the camera image (noise, vignetting) and a
    smoothed clean one (virtual stains are smooth). Returns {'nuclei_images', 'cell_images'
    ((2, Y, X) scaled inputs), 'nuclei_masks', 'cell_masks', 'sources'}."""
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
    root = Path(folder) / "data" / "Otsu_data"
    return [(f"{dataset}/t{frame}", tifffile.imread(root / dataset / "img" / f"t{frame}.tif"),
             tifffile.imread(root / dataset / "gt" / f"man_seg{frame}.tif").astype(np.int32))
            for dataset, splits in CTC_FRAMES.items() for frame in splits[split]]


def real_nuclei_training_data(folder: str | Path) -> dict[str, list]:
    """Real nuclei for training from nuclei-gt-coelho-ctc: the NIH3T3 Hoechst images (hand-drawn
    binary masks; objects = connected components) and the CTC training frames."""
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


def train_shipped_model(kind: str, out: str | Path, *, sites: int = 48, epochs: int = 40, seed: int = 0,
                        threads: int = 2, real_nuclei: str | Path | None = None) -> dict:
    """Train the `kind` ('nuclei' or 'cells') network on `sites` generated sites (plus, for nuclei,
    the real images of `real_nuclei` = the nuclei-gt-coelho-ctc folder, when given and present),
    measure it on held-out generated sites, write the weights to `out` and return its card
    (training data, epochs, losses, AP@0.5 per image kind, sha256, versions)."""
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
                  + "; each scaled to its 1st-99th percentile (brightpaint.segment.run.cellpose_input)",
        "widths": history["widths"], "diam_mean": history["diam_mean"],
        "training": {k: history[k]
                     for k in ("epochs", "learning_rate", "batch", "seed", "seconds", "train_loss")},
        "data": {"generator": "brightpaint.demo (flat and dense cell types, all 384 treatments)",
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
