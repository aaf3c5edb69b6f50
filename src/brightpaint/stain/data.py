"""Virtual-staining training data: the normalised brightfield input of a site, its normalised
fluorescence targets, the wells' training / validation split, the training set sampled across plates,
and augmented crops and batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..groups import platemap_wells
from ..ingest import stored_sites
from ..plate import (
    MIN_SPREAD,
    PlateSource,
    brightfield_planes,
    fluorescence_plane,
    plate_scales,
    robust_scale,
    sample_items,
)
from .settings import StainError, StainSettings

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def normalise_brightfield(stack: np.ndarray) -> np.ndarray:
    """The model's input: a brightfield window z-scored by its centre plane."""
    centre = stack[len(stack) // 2]
    mean, std = float(centre.mean()), float(centre.std())
    return ((stack - mean) / max(std, MIN_SPREAD)).astype(np.float32)


def brightfield_input(source: PlateSource, well: str, site: int, half_width: int) -> np.ndarray:
    """(2 * half_width + 1, Y, X) float32: `brightfield_planes` z-scored by the centre plane."""
    return normalise_brightfield(brightfield_planes(source, well, site, half_width))


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------


@dataclass
class StainSite:
    plate: str
    well: str
    site: int
    inputs: np.ndarray  # (K, Y, X) float32, normalised brightfield planes
    targets: np.ndarray  # (C, Y, X) float32, normalised fluorescence (zeros where absent)
    mask: np.ndarray  # (C,) float32: 1 where the plate has the channel


def load_site(source: PlateSource, well: str, site: int, targets: Sequence[str], half_width: int,
              target_norm: str, scales: dict[str, tuple[float, float]]) -> StainSite:
    inputs = brightfield_input(source, well, site, half_width)
    planes, mask = [], []
    for channel in targets:
        if not source.has_channel(channel):
            planes.append(np.zeros(inputs.shape[1:], np.float32))
            mask.append(0.0)
            continue
        plane = fluorescence_plane(source, well, site, channel)
        median, spread = robust_scale(plane, "fov") if target_norm == "fov" else scales[channel]
        planes.append(((plane - median) / spread).astype(np.float32))
        mask.append(1.0)
    return StainSite(source.plate, well, int(site), inputs, np.stack(planes), np.asarray(mask, np.float32))


def select_wells(source: PlateSource, query: str | None, setting: str = "stain.train_wells") -> list[str]:
    """Wells of the plate whose plate-map row satisfies `query` (a pandas query on the plate map's
    columns, e.g. "control_type != 'poscon'"); every stored well when the query is empty. Errors
    name the plate and the config `setting` the query came from."""
    wells = sorted({w for w, _ in stored_sites(source.store)})
    if not query:
        return wells
    if source.platemap is None:
        raise StainError(f"{setting}, plate {source.plate}: a well query ({query!r}) needs the plate map")
    try:
        chosen = platemap_wells(source.platemap, query)
    except ValueError as err:
        raise StainError(f"{setting}, plate {source.plate}: {err}") from err
    return [w for w in wells if w in chosen]


def split_wells(wells: Sequence[str], val_fraction: float, seed: int, plate: str
                ) -> tuple[list[str], list[str]]:
    """(training wells, validation wells): a seeded draw of round(val_fraction * n) wells (at least
    one when the plate has two or more) go to validation; a site never sits on both sides."""
    wells = sorted(wells)
    n_val = max(1, round(val_fraction * len(wells))) if len(wells) >= 2 else 0
    seed_key = [seed, *plate.encode()]
    order = np.random.default_rng(seed_key).permutation(len(wells))
    val = sorted(wells[i] for i in order[:n_val])
    return [w for w in wells if w not in val], val


def plate_split(source: PlateSource, wells: Sequence[str], settings: StainSettings,
                validation_query: str | None = None) -> tuple[list[str], list[str]]:
    """(training wells, validation wells) of one plate's `wells`: those whose plate-map row satisfies
    `validation_query` (config stain.validation_wells, e.g. a replicate or a set of columns the
    user holds out) are validation wells, the rest training wells; without a query, a seeded random
    draw (`split_wells`). A query that leaves no training well is a StainError naming the plate."""
    if not validation_query:
        return split_wells(wells, settings.val_fraction, settings.seed, source.plate)
    held_out = set(select_wells(source, validation_query, "stain.validation_wells"))
    validation = [w for w in sorted(wells) if w in held_out]
    train = [w for w in sorted(wells) if w not in held_out]
    if not train:
        raise StainError(f"stain.validation_wells, plate {source.plate}: {validation_query!r} holds out "
                         f"every one of its {len(validation)} training well(s); none is left to train on")
    return train, validation


@dataclass
class TrainingSet:
    train: list[StainSite]
    validation: list[StainSite]
    wells: dict[str, dict[str, list[str]]]  # plate -> {"train": [...], "validation": [...]}
    scales: dict[str, dict[str, tuple[float, float]]]  # plate -> channel -> (median, spread)

    def reference_scales(self, targets: Sequence[str]) -> dict[str, tuple[float, float]]:
        """Per target channel, the median over training plates of their (median, spread)."""
        out = {}
        for channel in targets:
            pairs = [s[channel] for s in self.scales.values() if channel in s]
            if pairs:
                out[channel] = (float(np.median([p[0] for p in pairs])),
                                float(np.median([p[1] for p in pairs])))
        return out


def held_sites(settings: StainSettings, site_pixels: int) -> int:
    """Training sites held in memory: `max_sites`, and no more than `max_megapixels` of sites of
    `site_pixels` pixels (at least one), so the training job's memory does not grow with the site
    size (~28 MB per 1080 px site with 3 planes and 3 targets in float32: 36 sites held took the
    training job to 1.86 GB, docs/performance.md)."""
    return min(settings.max_sites, max(1, int(settings.max_megapixels * 1e6 // max(1, site_pixels))))


def build_training_set(sources: Sequence[PlateSource], targets: Sequence[str],
                       settings: StainSettings, well_query: str | None = None,
                       validation_query: str | None = None) -> TrainingSet:
    """Split every training plate's wells (`plate_split`: `validation_query`, or a seeded random
    draw), sample at most `held_sites` training sites (and a quarter of that, at least 4, for
    validation) across plates, and load them normalised."""
    if not sources:
        raise StainError("virtual staining: no training plates (no plate of the screen has role "
                         "train or both, or the filters left none)")
    if not targets:
        raise StainError("virtual staining: no target channels")
    for channel in targets:
        if not any(s.has_channel(channel) for s in sources):
            raise StainError(f"virtual staining: target channel {channel!r} is on no training plate "
                             f"({', '.join(s.plate for s in sources)})")
    rng = np.random.default_rng(settings.seed)
    candidates: dict[str, list] = {"train": [], "validation": []}
    wells, scales = {}, {}
    for source in sources:
        chosen = select_wells(source, well_query)
        if not chosen:
            raise StainError(f"plate {source.plate}: no wells left for training (filter {well_query!r})")
        train_wells, val_wells = plate_split(source, chosen, settings, validation_query)
        wells[source.plate] = {"train": train_wells, "validation": val_wells}
        for side, side_wells in (("train", train_wells), ("validation", val_wells)):
            candidates[side] += [(source, w, s) for w, s in source.usable_sites(side_wells)]
    cap = held_sites(settings, max(int(np.prod(s.layout.shape)) for s in sources))
    picked = {"train": sample_items(rng, candidates["train"], cap),
              "validation": sample_items(rng, candidates["validation"], max(4, cap // 4))}
    if not picked["train"] or not picked["validation"]:
        raise StainError("virtual staining: need usable sites in both training and validation wells; "
                         f"got {len(picked['train'])} and {len(picked['validation'])}"
                         + (f" (stain.validation_wells {validation_query!r})" if validation_query else ""))
    for source in sources:
        own = [(w, s) for src, w, s in picked["train"] if src is source]
        scales[source.plate] = plate_scales(source, own or source.usable_sites()[:8], targets,
                                            settings.target_norm)
    loaded = {side: [load_site(src, w, s, targets, settings.half_width, settings.target_norm,
                               scales[src.plate]) for src, w, s in items]
              for side, items in picked.items()}
    return TrainingSet(loaded["train"], loaded["validation"], wells, scales)


# ---------------------------------------------------------------------------------------------
# Augmentation and batches
# ---------------------------------------------------------------------------------------------


def random_crop(rng: np.random.Generator, site: StainSite, patch: int, augment: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """A `patch` x `patch` crop of a site's inputs and targets; with `augment`, a random scale change
    of 0.8-1.25 (both, bilinear) first, then flips and 90-degree rotations (both), then intensity /
    contrast jitter, blur and noise (input only: the target is what the microscope would record)."""
    height, width = site.inputs.shape[-2:]
    scale = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))) if augment and rng.random() < 0.5 else 1.0
    size = min(height, width, max(8, round(patch / scale)))
    y, x = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
    inputs = site.inputs[:, y:y + size, x:x + size]
    targets = site.targets[:, y:y + size, x:x + size]
    if size != patch:
        zoom = (1, patch / size, patch / size)
        inputs = ndimage.zoom(inputs, zoom, order=1, grid_mode=True, mode="nearest")
        targets = ndimage.zoom(targets, zoom, order=1, grid_mode=True, mode="nearest")
    if not augment:
        return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)
    k = int(rng.integers(4))
    inputs, targets = np.rot90(inputs, k, axes=(1, 2)), np.rot90(targets, k, axes=(1, 2))
    if rng.random() < 0.5:
        inputs, targets = inputs[:, :, ::-1], targets[:, :, ::-1]
    inputs = inputs * np.float32(rng.uniform(0.8, 1.25)) + np.float32(rng.normal(0, 0.1))
    if rng.random() < 0.3:
        inputs = ndimage.gaussian_filter(inputs, (0, *[rng.uniform(0.3, 1.0)] * 2))
    if rng.random() < 0.3:
        inputs = inputs + rng.normal(0, rng.uniform(0.01, 0.1), inputs.shape)
    return (np.ascontiguousarray(inputs, dtype=np.float32),
            np.ascontiguousarray(targets, dtype=np.float32))


def training_batch(rng: np.random.Generator, sites: Sequence[StainSite], batch: int, patch: int,
                   augment: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = [sites[i] for i in rng.integers(0, len(sites), batch)]
    crops = [random_crop(rng, site, patch, augment) for site in chosen]
    return (torch.from_numpy(np.stack([c[0] for c in crops])),
            torch.from_numpy(np.stack([c[1] for c in crops])),
            torch.from_numpy(np.stack([site.mask for site in chosen])))
