"""Virtual staining: predict fluorescence channels from brightfield, trained on plates with both.

Inputs. The in-focus brightfield plane of a site (from the focus table) and, with `half_width` > 0,
the planes around it as extra channels (out-of-focus planes carry the phase contrast that shows where
nuclei are). Every plane is illumination-corrected, then the stack is z-scored with the mean and
standard deviation of its centre plane (per field of view: brightfield brightness varies with lamp and
well, and carries no biology), so plane k keeps its contrast relative to focus.

Targets. Each fluorescence channel, illumination-corrected (and Noise2Void-denoised where the plate
has a denoised store), scaled per plate as (x - median) / (q99.5 - median) of the plate's training
sites (`target_norm: plate`, default) or per field of view as (x - median) / IQR (`target_norm: fov`).
The per-plate scale is the default because rescaling every field on its own erases intensity
differences between wells, which are the screen's biology (a treatment that doubles DNA content must
still double the virtual DNA), and because the IQR of a sparse fluorescence field is the camera noise,
not the stain. Predictions are written back in the training plates' reference scale (the medians of
their per-plate medians and spreads), recorded in the model card, so every plate's virtual channels
share one scale.

Training (`train_stain_model`). Random crops of `patch` px, augmented (flips, 90-degree rotations,
small scale changes on input and target; intensity / contrast jitter, blur and noise on the input
only); a masked loss so that a plate lacking a target channel still trains the others; wells split
into training and validation (never sites of one well on both sides); early stopping on the
validation loss, best weights kept; seeded. Architectures and losses are in `stain_models`:
U-Net + L1 (default), UNeXt2, MS-SSIM + L1, and a conditional WGAN-GP with a PatchGAN critic.

Prediction (`predict_virtual`) runs in overlapping tiles blended with raised-cosine ramps
(`inference.predict_tiled`), in batches, with bf16 autocast and channels-last memory on a GPU.

Models are a safetensors file (weights plus the card as metadata; no pickled code) and a card.json
beside it: architecture, channels, normalisation, training plates and wells, metrics, versions and the
weights' sha256.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from scipy import ndimage

from . import __version__, stain_models
from .atomic import atomic_path
from .inference import predict_tiled, resolve_device, torch_threads
from .ingest import StoreLayout, read_plane, read_store_layout, stored_sites, write_sites
from .metrics import METRICS, image_metrics, pearson
from .plate import (
    MIN_SPREAD,
    UNCERTAINTY_PREFIX,
    VIRTUAL_PREFIX,
    PlateError,
    PlateSource,
    brightfield_planes,
    fluorescence_plane,
    plate_scales,
    robust_scale,
    sample_items,
)
from .provenance import git_commit, sha256_file
from .trust import (
    DOMAIN_COLUMNS,
    DOMAIN_STATISTICS,
    brightfield_statistics,
    describe_domain,
    domain_scores,
    predict_augmented,
    site_uncertainty,
)

LOGGER = logging.getLogger("brightpaint")

CODE_VERSION = "stain-1"
FORMAT = "brightpaint-stain"
TARGET_NORMS = ("plate", "fov")


class StainError(ValueError):
    """Bad input to virtual staining: names the plate / channel / file and what is wrong."""


@dataclass(frozen=True)
class StainSettings:
    """Everything that shapes a model; recorded in its card."""

    arch: str = "unet"  # stain_models.ARCHITECTURES
    width: int = 32
    depth: int = 3
    loss: str = "l1"  # stain_models.LOSSES
    gan: bool = False  # conditional WGAN-GP on top of the reconstruction loss
    half_width: int = 1  # brightfield planes on each side of focus as extra input channels
    target_norm: str = "plate"  # plate | fov
    patch: int = 128
    batch: int = 8
    lr: float = 2e-3
    steps_per_epoch: int = 50
    max_epochs: int = 10
    patience: int = 3
    val_fraction: float = 0.2
    max_sites: int = 256  # training sites held in memory (sampled across plates, seeded)
    augment: bool = True
    seed: int = 0
    gan_l1_weight: float = 100.0
    gan_gp_weight: float = 10.0
    gan_adversarial: float = 0.5  # times the adaptive weight (adversarial <= reconstruction gradient)

    @classmethod
    def from_config(cls, config: dict) -> StainSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise StainError(f"stain settings: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**config).checked()

    def checked(self) -> StainSettings:
        if self.arch not in stain_models.ARCHITECTURES:
            raise StainError(f"stain.arch: {self.arch!r} is not one of {stain_models.ARCHITECTURES}")
        if self.loss not in stain_models.LOSSES:
            raise StainError(f"stain.loss: {self.loss!r} is not one of {stain_models.LOSSES}")
        if self.target_norm not in TARGET_NORMS:
            raise StainError(f"stain.target_norm: {self.target_norm!r} is not one of {TARGET_NORMS}")
        for name in ("width", "depth", "patch", "batch", "steps_per_epoch", "max_epochs", "patience",
                     "max_sites"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StainError(f"stain.{name}: must be an integer >= 1, got {value!r}")
        if self.half_width < 0:
            raise StainError(f"stain.half_width: must be >= 0, got {self.half_width}")
        if not 0 < self.val_fraction < 1:
            raise StainError(f"stain.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise StainError(f"stain.lr: must be > 0, got {self.lr}")
        return self


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


def site_domain_statistics(sources: Sequence[PlateSource], sites: Sequence[StainSite | tuple[str, str, int]]
                           ) -> pd.DataFrame:
    """The domain statistics (trust.brightfield_statistics) of the in-focus brightfield plane of
    each (plate, well, site)."""
    by_plate = {source.plate: source for source in sources}
    rows = []
    for item in sites:
        plate, well, site = (item.plate, item.well, item.site) if isinstance(item, StainSite) else item
        plane = brightfield_planes(by_plate[plate], well, site, 0)[0]
        rows.append({"plate": plate, "well": well, "site": int(site), **brightfield_statistics(plane)})
    return pd.DataFrame(rows, columns=["plate", "well", "site", *DOMAIN_STATISTICS])


def training_domain(sources: Sequence[PlateSource], data: TrainingSet, *, quantile: float = 0.99,
                    floor: float = 3.0) -> dict:
    """The card's description of the brightfield the model was trained on (trust.describe_domain),
    calibrated on the validation wells' sites."""
    return describe_domain(site_domain_statistics(sources, data.train),
                           site_domain_statistics(sources, data.validation), quantile=quantile, floor=floor)


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


def select_wells(source: PlateSource, query: str | None) -> list[str]:
    """Wells of the plate whose plate-map row satisfies `query` (a pandas query on the plate map's
    columns, e.g. "control_type != 'poscon'"); every stored well when the query is empty."""
    wells = sorted({w for w, _ in stored_sites(source.store)})
    if not query:
        return wells
    if source.platemap is None:
        raise StainError(f"plate {source.plate}: a well filter ({query!r}) needs the plate map")
    try:
        chosen = set(source.platemap.query(query)["well"])
    except Exception as err:  # pandas raises many kinds for a bad expression
        raise StainError(f"stain.train_wells: cannot apply {query!r} to plate {source.plate}'s plate "
                         f"map (columns {list(source.platemap.columns)}): {err}") from err
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


def build_training_set(sources: Sequence[PlateSource], targets: Sequence[str],
                       settings: StainSettings, well_query: str | None = None) -> TrainingSet:
    """Split every training plate's wells, sample at most `max_sites` training sites (and a quarter
    of that for validation) across plates, and load them normalised."""
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
        train_wells, val_wells = split_wells(chosen, settings.val_fraction, settings.seed, source.plate)
        wells[source.plate] = {"train": train_wells, "validation": val_wells}
        for side, side_wells in (("train", train_wells), ("validation", val_wells)):
            candidates[side] += [(source, w, s) for w, s in source.usable_sites(side_wells)]
    picked = {"train": sample_items(rng, candidates["train"], settings.max_sites),
              "validation": sample_items(rng, candidates["validation"], max(4, settings.max_sites // 4))}
    if not picked["train"] or not picked["validation"]:
        raise StainError("virtual staining: need usable sites in both training and validation wells; "
                         f"got {len(picked['train'])} and {len(picked['validation'])}")
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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def validation_scores(generator: torch.nn.Module, sites: Sequence[StainSite], targets: Sequence[str],
                      device: torch.device, tile: int = 512) -> dict[str, float]:
    """Masked L1 (normalised units) and per-channel PCC over whole validation sites."""
    generator.eval()
    losses, pccs = [], {c: [] for c in targets}
    for site in sites:
        prediction = predict_tiled(generator, site.inputs, tile=tile, overlap=96, device=device)
        for c, channel in enumerate(targets):
            if site.mask[c]:
                losses.append(float(np.mean(np.abs(prediction[c] - site.targets[c]))))
                pccs[channel].append(pearson(site.targets[c], prediction[c]))
    generator.train()
    return {"val_l1": float(np.mean(losses)),
            **{f"val_pcc_{c}": float(np.nanmean(v)) for c, v in pccs.items() if v}}


def training_patch(settings: StainSettings, multiple: int, data: TrainingSet) -> int:
    """The crop size: stain.patch, or, on sites smaller than that, the largest multiple of the
    network's size divisor that fits (logged); a StainError if not even one fits."""
    smallest = min(min(site.inputs.shape[-2:]) for site in [*data.train, *data.validation])
    if settings.patch % multiple:
        raise StainError(f"stain.patch {settings.patch} must be a multiple of {multiple} for "
                         f"{settings.arch} of depth {settings.depth}")
    patch = min(settings.patch, smallest // multiple * multiple)
    if patch < multiple:
        raise StainError(f"virtual staining: sites of {smallest} px are smaller than the network's size "
                         f"multiple {multiple}")
    if patch != settings.patch:
        LOGGER.warning("stain.patch %d is larger than the smallest site (%d px): training on %d px crops",
                       settings.patch, smallest, patch)
    return patch


def train_stain_model(data: TrainingSet, targets: Sequence[str], settings: StainSettings, *,
                      device: str = "cpu", threads: int = 2) -> tuple[torch.nn.Module, pd.DataFrame]:
    """Train a generator on `data`; returns it (eval mode, CPU, best validation epoch's weights) and
    the history (one row per epoch: train loss, validation L1 and per-channel PCC, crop size,
    seconds)."""
    target = resolve_device(device, what="virtual staining")
    n_inputs, n_outputs = data.train[0].inputs.shape[0], len(targets)
    rng = np.random.default_rng(settings.seed)
    reconstruction = stain_models.reconstruction_loss(settings.loss)
    history, best, best_loss, stale = [], None, math.inf, 0
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        generator = stain_models.build_generator(settings.arch, n_inputs, n_outputs, width=settings.width,
                                                 depth=settings.depth, seed=settings.seed).to(target)
        patch = training_patch(settings, generator.multiple, data)
        betas = (0.5, 0.9) if settings.gan else (0.9, 0.999)
        optimiser = torch.optim.Adam(generator.parameters(), lr=settings.lr, betas=betas)
        # cosine decay to 5 % over the planned steps: late epochs refine instead of jumping around
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.05 + 0.95 * 0.5 * (
            1 + math.cos(math.pi * min(step / (settings.max_epochs * settings.steps_per_epoch), 1))))
        critic = critic_optimiser = None
        if settings.gan:
            critic = stain_models.build_critic(n_inputs + n_outputs, width=settings.width,
                                               seed=settings.seed).to(target)
            critic_optimiser = torch.optim.Adam(critic.parameters(), lr=settings.lr, betas=betas)
        generator.train()
        for epoch in range(settings.max_epochs):
            start, losses = time.perf_counter(), []
            for _ in range(settings.steps_per_epoch):
                x, y, mask = (t.to(target) for t in training_batch(rng, data.train, settings.batch, patch,
                                                                    settings.augment))
                if settings.gan:
                    loss = _gan_step(generator, critic, optimiser, critic_optimiser, x, y, mask,
                                     reconstruction, settings)
                else:
                    optimiser.zero_grad(set_to_none=True)
                    loss = reconstruction(generator(x), y, mask)
                    loss.backward()
                    optimiser.step()
                    loss = float(loss.detach())
                schedule.step()
                losses.append(loss)
            scores = validation_scores(generator, data.validation, targets, target)
            history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **scores,
                            "patch": patch, "seconds": time.perf_counter() - start})
            LOGGER.info("virtual staining epoch %d: train %.4f, validation L1 %.4f", epoch + 1,
                        history[-1]["train_loss"], scores["val_l1"])
            if scores["val_l1"] < best_loss:
                best_loss, stale = scores["val_l1"], 0
                best = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
            else:
                stale += 1
                if stale >= settings.patience:
                    LOGGER.info("early stop after epoch %d (no validation gain for %d epochs)", epoch + 1,
                                stale)
                    break
        generator.load_state_dict(best)
    table = pd.DataFrame(history)
    table["best"] = table["val_l1"] == table["val_l1"].min()
    return generator.cpu().eval(), table


def _gan_step(generator, critic, optimiser, critic_optimiser, x, y, mask, reconstruction,
              settings: StainSettings) -> float:
    """One conditional WGAN-GP step: the critic (on [brightfield, fluorescence] pairs, missing target
    channels zeroed in both) with gradient penalty, then the generator with weighted L1 plus an
    adversarial term whose weight adapts so its gradient never exceeds the reconstruction's."""
    channel_mask = mask[:, :, None, None]
    fake = generator(x)
    real_pair = torch.cat([x, y * channel_mask], 1)
    fake_pair = torch.cat([x, fake.detach() * channel_mask], 1)
    critic_optimiser.zero_grad(set_to_none=True)
    critic_loss = (critic(fake_pair).mean() - critic(real_pair).mean()
                   + settings.gan_gp_weight * stain_models.gradient_penalty(critic, real_pair, fake_pair))
    critic_loss.backward()
    critic_optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    rec = settings.gan_l1_weight * reconstruction(fake, y, mask)
    adversarial = -critic(torch.cat([x, fake * channel_mask], 1)).mean()
    weight = stain_models.adaptive_adversarial_weight(rec, adversarial, generator.last_layer)
    loss = rec + settings.gan_adversarial * weight * adversarial
    loss.backward()
    optimiser.step()
    return float(rec.detach()) / settings.gan_l1_weight


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------


def save_stain_model(generator: torch.nn.Module, card: dict, path: str | Path) -> dict:
    """Write the weights (safetensors, with the card as metadata) to `path` and the card, with the
    weights' sha256, to card.json beside it; both appear only when complete. Returns the card."""
    path = Path(path)
    card = {**card, "format": FORMAT, "code_version": CODE_VERSION, "package_version": __version__,
            "git_commit": git_commit(), "torch_version": torch.__version__,
            "architecture": dict(generator.config)}
    text = json.dumps(card, sort_keys=True)
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    with atomic_path(path) as partial:
        save_file(state, str(partial), metadata={"format": FORMAT, "card": text})
    card = {**json.loads(text), "sha256": sha256_file(path), "file": path.name}
    with atomic_path(card_path(path)) as partial:
        partial.write_text(json.dumps(card, indent=2, sort_keys=True))
    return card


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_name("card.json")


def load_stain_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The generator (eval mode, CPU) and card of a model file written by `save_stain_model`, or a
    StainError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise StainError(f"virtual-staining model {path}: file not found")
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise StainError(f"virtual-staining model {path}: unreadable or corrupted ({err})") from err
    if metadata.get("format") != FORMAT or "card" not in metadata:
        raise StainError(f"virtual-staining model {path}: not a brightpaint virtual-staining model "
                         "(no card in its metadata)")
    card = json.loads(metadata["card"])
    generator = stain_models.build_generator(**card["architecture"])
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        raise StainError(f"virtual-staining model {path}: weights do not match its architecture "
                         f"{card['architecture']} ({str(err).splitlines()[0]})") from err
    return generator.eval(), {**card, "sha256": sha256_file(path), "file": path.name}


def load_card(weights: str | Path) -> dict:
    """The card.json beside a model file, checked against the file (a card left from another
    training run is an error, not a silent mismatch)."""
    weights, path = Path(weights), card_path(weights)
    if not path.is_file():
        raise StainError(f"virtual-staining model {weights}: no card.json beside it")
    card = json.loads(path.read_text())
    if card.get("sha256") != sha256_file(weights):
        raise StainError(f"virtual-staining model {weights}: card.json does not describe this file "
                         "(sha256 differs)")
    return card


def model_card(settings: StainSettings, data: TrainingSet, targets: Sequence[str], brightfield: str,
               history: pd.DataFrame, plates: Sequence[dict], well_query: str | None) -> dict:
    best = history[history["best"]].iloc[0]
    return {
        "targets": list(targets), "virtual_channels": [VIRTUAL_PREFIX + c for c in targets],
        "inputs": {"channel": brightfield, "half_width": settings.half_width,
                   "planes": [f"focus{k:+d}" if k else "focus"
                              for k in range(-settings.half_width, settings.half_width + 1)],
                   "normalisation": "illumination-corrected; z-score by the centre plane's mean/std"},
        "target_normalisation": {
            "method": settings.target_norm,
            "description": ("(x - plate median) / (plate q99.5 - median)" if settings.target_norm == "plate"
                            else "(x - field median) / field IQR"),
            "reference": {c: {"median": m, "spread": s}
                          for c, (m, s) in data.reference_scales(targets).items()},
            "plates": {p: {c: {"median": m, "spread": s} for c, (m, s) in sc.items()}
                       for p, sc in data.scales.items()}},
        "settings": asdict(settings), "training_plates": list(plates), "well_filter": well_query or "",
        "wells": data.wells, "n_sites": {"train": len(data.train), "validation": len(data.validation)},
        "metrics": {k: float(v) for k, v in best.items() if k.startswith("val_")}
        | {"best_epoch": int(best["epoch"]), "epochs_run": int(len(history))},
        "patch_used": int(best["patch"]),
    }


def fit_stain_model(sources: Sequence[PlateSource], targets: Sequence[str], settings: StainSettings, *,
                    brightfield: str, plates: Sequence[dict], well_query: str | None = None,
                    device: torch.device | str = "cpu", threads: int = 1, domain_quantile: float = 0.99,
                    domain_floor: float = 3.0) -> tuple[torch.nn.Module, dict, pd.DataFrame]:
    """Training set, training, and the model card with its training domain: what rule stain_train
    (and the generalisation matrix's per-group training) does. Returns generator, card, history."""
    data = build_training_set(sources, targets, settings, well_query)
    LOGGER.info("training on %d sites (%d validation) of plates %s", len(data.train), len(data.validation),
                [s.plate for s in sources])
    generator, history = train_stain_model(data, targets, settings, device=device, threads=threads)
    card = model_card(settings, data, targets, brightfield, history, plates, well_query)
    card["domain"] = training_domain(sources, data, quantile=domain_quantile, floor=domain_floor)
    LOGGER.info("domain: %s, threshold %.2f robust SD (validation sites' max %.2f)",
                {k: round(v["median"], 4) for k, v in card["domain"]["statistics"].items()},
                card["domain"]["threshold"], card["domain"]["validation_score_max"])
    return generator, card, history


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


def check_inputs(card: dict, inputs: np.ndarray, where: str) -> None:
    expected = card["architecture"]["in_channels"]
    if inputs.ndim != 3 or inputs.shape[0] != expected:
        raise StainError(f"{where}: the model expects {expected} brightfield plane(s) "
                         f"(half_width {card['inputs']['half_width']}), got input of shape {inputs.shape}")


def predict_normalised(generator: torch.nn.Module, card: dict, inputs: np.ndarray, *, tile: int = 512,
                       overlap: int = 96, batch: int = 8, device: torch.device | str = "cpu",
                       amp: bool = True) -> np.ndarray:
    """(C, Y, X) prediction in normalised target units for normalised brightfield `inputs`."""
    check_inputs(card, inputs, "predict")
    return predict_tiled(generator, inputs, tile=tile, overlap=overlap, batch=batch, device=device, amp=amp)


def denormalise(prediction: np.ndarray, card: dict) -> dict[str, np.ndarray]:
    """Virtual channels (VS_<target>) in the training plates' reference intensity scale."""
    reference = card["target_normalisation"]["reference"]
    return {VIRTUAL_PREFIX + c: (prediction[i] * np.float32(reference[c]["spread"])
                                 + np.float32(reference[c]["median"])).astype(np.float32)
            for i, c in enumerate(card["targets"])}


def predict_virtual(generator: torch.nn.Module, card: dict, source: PlateSource, well: str, site: int,
                    **tiling) -> dict[str, np.ndarray]:
    """The virtual channels of one site of a plate, in the reference intensity scale."""
    inputs = brightfield_input(source, well, site, card["inputs"]["half_width"])
    return denormalise(predict_normalised(generator, card, inputs, **tiling), card)


def virtual_channel_names(cards: Sequence[dict], augmentations: int = 1) -> list[str]:
    """Channels of a plate's virtual.zarr: VS_<target> for every model's targets and, when test-time
    augmentation gives an uncertainty map (augmentations > 1), SD_<target> after them."""
    virtual = [VIRTUAL_PREFIX + c for card in cards for c in card["targets"]]
    return virtual + ([UNCERTAINTY_PREFIX + c for card in cards for c in card["targets"]]
                      if augmentations > 1 else [])


def _virtual_role(layout: StoreLayout, channel: str) -> str:
    if channel.startswith(UNCERTAINTY_PREFIX):
        return "uncertainty"
    return layout.roles.get(channel.removeprefix(VIRTUAL_PREFIX), "virtual")


def virtual_layout(layout: StoreLayout, channels: Sequence[str]) -> StoreLayout:
    """Layout of a plate's virtual.zarr: float32 single planes of the virtual channels, each with
    the role (nuclei, cell, ...) of the channel it stands for; uncertainty maps have role
    `uncertainty`."""
    return StoreLayout(plate=layout.plate, channels=list(channels), planes={c: [0] for c in channels},
                       n_z=1, shape=layout.shape, dtype="float32",
                       source_dtypes={c: "float32" for c in channels},
                       roles={c: _virtual_role(layout, c) for c in channels})


# ---------------------------------------------------------------------------------------------
# Evaluation (level 1: pixels)
# ---------------------------------------------------------------------------------------------


def site_split(card: dict, plate: str, well: str) -> str:
    """Where a well stood in a model's training: train, validation or unseen."""
    wells = card.get("wells", {}).get(plate, {})
    for side in ("train", "validation"):
        if well in wells.get(side, []):
            return side
    return "unseen"


def evaluate_site(real: np.ndarray, virtual: np.ndarray, scale: tuple[float, float],
                  reference: dict) -> dict[str, float]:
    """Metrics of one channel of one site, both images in normalised units: the real image by its
    plate's (or field's) (median, spread), the virtual one by the model's reference scale (the scale
    it was written in). PSNR / SSIM / NRMSE / N-MAE are relative to the real image's robust range."""
    median, spread = scale
    return image_metrics((real - median) / spread, (virtual - reference["median"]) / reference["spread"])


def cards_by_target(cards: Sequence[dict]) -> dict[str, dict]:
    """Target channel -> the card of the model that predicts it; a StainError if two models do."""
    out: dict[str, dict] = {}
    for card in cards:
        for channel in card["targets"]:
            if channel in out:
                raise StainError(f"two virtual-staining models predict {channel}: {out[channel]['file']} "
                                 f"and {card['file']}")
            out[channel] = card
    return out


def evaluate_plate(source: PlateSource, virtual_store: str | Path, cards: Sequence[dict],
                   max_sites: int = 64) -> pd.DataFrame:
    """Level-1 metrics per site and channel for a plate with real stains: plate, well, site, split
    (train / validation / unseen by the model), channel, pcc, ssim, psnr, nrmse, nmae."""
    layout = read_store_layout(virtual_store)
    by_target = cards_by_target(cards)
    channels = [c for c in by_target if source.has_channel(c) and VIRTUAL_PREFIX + c in layout.channels]
    if not channels:
        raise StainError(f"plate {source.plate}: no target channel has both a real and a virtual image")
    sites = source.usable_sites()
    scales = plate_scales(source, sample_items(np.random.default_rng(0), sites, max_sites), channels, "plate")
    rows = []
    for well, site in sites:
        for channel in channels:
            card = by_target[channel]
            real = fluorescence_plane(source, well, site, channel)
            virtual = np.asarray(read_plane(virtual_store, well, site,
                                            layout.channels.index(VIRTUAL_PREFIX + channel), 0))
            fov = card["target_normalisation"]["method"] == "fov"
            scale = robust_scale(real, "fov") if fov else scales[channel]
            scores = evaluate_site(real, virtual, scale, card["target_normalisation"]["reference"][channel])
            rows.append({"plate": source.plate, "well": well, "site": int(site),
                         "split": site_split(card, source.plate, well), "channel": channel, **scores})
    return pd.DataFrame(rows, columns=["plate", "well", "site", "split", "channel", *METRICS])


# ---------------------------------------------------------------------------------------------
# A shard of a plate, end to end
# ---------------------------------------------------------------------------------------------


SITE_COLUMNS = ["well", "site", "status", "reason", "seconds"]


def predict_sites(source: PlateSource, sites: Sequence[tuple[str, int]],
                  models: Sequence[tuple[torch.nn.Module, dict]], out: str | Path, *,
                  device: torch.device | str = "cpu", tile: int = 512, overlap: int = 96, batch: int = 8,
                  augmentations: int = 1, domain: bool = True, io_threads: int = 2) -> pd.DataFrame:
    """Write the virtual channels of `sites` into a shard store at `out` (float32, one plane each, in
    the reference scale). Sites are read and written by `io_threads` workers, so reading the next
    site overlaps the network on the current one (torch releases the GIL); the network itself runs
    one site at a time, with the job's torch threads (no oversubscription). A site that cannot be
    predicted (no in-focus plane, NaN pixels) keeps zeros and gets status `skipped` with the reason.

    With `augmentations` > 1 each site is predicted under that many flips / rotations: the virtual
    channel is their mean, SD_<target> their per-pixel standard deviation (reference scale) and
    `uncertainty_<target>` the site's score (trust.site_uncertainty). With `domain`, every site's
    brightfield statistics are scored against each card's training domain (cards without one are
    skipped): the worst model's score, whether it is outside, and why.

    Returns one row per site: well, site, status, reason, seconds, the domain statistics and
    columns, and the uncertainty scores."""
    device = torch.device(device)
    network = threading.Lock()
    channels = virtual_channel_names([card for _, card in models], augmentations)
    layout = virtual_layout(source.layout, channels)
    for generator, _ in models:
        generator.to(device).eval()
        if device.type == "cuda":
            generator.to(memory_format=torch.channels_last)
    domains = [card["domain"] for _, card in models if domain and card.get("domain")]
    targets = [c for _, card in models for c in card["targets"]]
    scores = [f"uncertainty_{c}" for c in targets] if augmentations > 1 else []

    def fill(array, well, site):
        start = time.perf_counter()
        row = {"well": well, "site": int(site), "status": "ok", "reason": ""}
        try:
            planes = {}
            for _, card in models:
                half = card["inputs"]["half_width"]
                if half not in planes:
                    planes[half] = brightfield_planes(source, well, site, half)
        except PlateError as err:
            return [{**row, "status": "skipped", "reason": str(err),
                     "seconds": time.perf_counter() - start}], {c: (0.0, 0.0) for c in channels}
        if domains:
            half, stack = next(iter(planes.items()))
            row |= brightfield_statistics(stack[half])
        ranges = {}
        for generator, card in models:
            inputs = normalise_brightfield(planes[card["inputs"]["half_width"]])

            def predict(x, generator=generator, card=card):
                return predict_normalised(generator, card, x, tile=tile, overlap=overlap, batch=batch,
                                          device=device)

            with network:  # one forward pass at a time: the other worker reads and writes meanwhile
                mean, spread = predict_augmented(predict, inputs, augmentations)
            for index, (name, image) in enumerate(denormalise(mean, card).items()):
                array[0, channels.index(name), 0] = image
                ranges[name] = (float(np.percentile(image, 0.1)), float(np.percentile(image, 99.9)))
                if augmentations > 1:
                    target = card["targets"][index]
                    reference = card["target_normalisation"]["reference"][target]
                    scaled = spread[index] * np.float32(reference["spread"])
                    array[0, channels.index(UNCERTAINTY_PREFIX + target), 0] = scaled
                    ranges[UNCERTAINTY_PREFIX + target] = (0.0, float(np.percentile(scaled, 99.9)))
                    row[f"uncertainty_{target}"] = site_uncertainty(mean[index], spread[index])
        row["seconds"] = time.perf_counter() - start
        return [row], ranges

    rows = write_sites(out, list(sites), layout, fill, io_threads)
    table = pd.DataFrame(rows, columns=SITE_COLUMNS + (list(DOMAIN_STATISTICS) if domains else []) + scores)
    if domains:
        worst = None
        for description in domains:
            scored = domain_scores(table[list(DOMAIN_STATISTICS)], description)
            if worst is None:
                worst = scored
            else:
                further = scored["domain_score"] > worst["domain_score"]
                worst.loc[further] = scored.loc[further]
        skipped = table["status"] != "ok"  # no brightfield statistics: not scored, already flagged
        worst.loc[skipped, "domain_score"] = np.nan
        worst.loc[skipped, "domain_outside"] = False
        worst.loc[skipped, "domain_reason"] = ""
        table[DOMAIN_COLUMNS] = worst[DOMAIN_COLUMNS]
    return table


def examples_figure(source: PlateSource, virtual_store: str | Path, metrics: pd.DataFrame,
                    path: str | Path, n_sites: int = 3) -> None:
    """PNG: for a few sites (validation or unseen wells first, median PCC), brightfield in focus |
    real | virtual for every evaluated channel, each pair on one contrast (real's 0.5-99.5 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = read_store_layout(virtual_store)
    channels = list(dict.fromkeys(metrics["channel"]))
    held = metrics[metrics["split"] != "train"]
    pool = held if not held.empty else metrics
    per_site = pool.groupby(["well", "site"])["pcc"].mean().sort_values()
    picks = list(per_site.index[np.linspace(0, len(per_site) - 1, min(n_sites, len(per_site))).astype(int)])
    columns = 1 + 2 * len(channels)
    fig, axes = plt.subplots(len(picks), columns, figsize=(2.2 * columns, 2.3 * len(picks)), squeeze=False)
    for r, (well, site) in enumerate(picks):
        bf = brightfield_input(source, well, site, 0)[0]
        axes[r, 0].imshow(bf, cmap="gray", vmin=np.percentile(bf, 0.5), vmax=np.percentile(bf, 99.5))
        axes[r, 0].set_title(f"{well} s{site} BF", fontsize=8)
        for k, channel in enumerate(channels):
            real = fluorescence_plane(source, well, site, channel)
            virtual = np.asarray(read_plane(virtual_store, well, site,
                                            layout.channels.index(VIRTUAL_PREFIX + channel), 0))
            row = metrics[(metrics["well"] == well) & (metrics["site"] == site)
                          & (metrics["channel"] == channel)]
            real_range = np.percentile(real, [0.5, 99.5])
            virtual_range = np.percentile(virtual, [0.5, 99.5])
            axes[r, 1 + 2 * k].imshow(real, cmap="magma", vmin=real_range[0], vmax=real_range[1])
            axes[r, 1 + 2 * k].set_title(f"{channel} real", fontsize=8)
            axes[r, 2 + 2 * k].imshow(virtual, cmap="magma", vmin=virtual_range[0], vmax=virtual_range[1])
            pcc = float(row["pcc"].iloc[0]) if not row.empty else float("nan")
            axes[r, 2 + 2 * k].set_title(f"{VIRTUAL_PREFIX}{channel} (PCC {pcc:.2f})", fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(f"plate {source.plate}: brightfield | real | virtual", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
