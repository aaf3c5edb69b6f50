"""Training a virtual-staining generator: the training loop (masked reconstruction loss, optional
conditional WGAN-GP step, cosine learning-rate decay, early stopping on the validation L1, best
weights kept, seeded), the model card, and the training domain recorded in it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch

from .. import inference
from ..inference import autocast, channels_last, predict_tiled, torch_threads
from ..metrics import pearson
from ..plate import VIRTUAL_PREFIX, PlateSource, brightfield_planes
from ..trust import DOMAIN_STATISTICS, brightfield_statistics, describe_domain
from . import models
from .data import StainSite, TrainingSet, build_training_set, training_batch
from .settings import StainError, StainSettings

LOGGER = logging.getLogger("brightpaint")
# Held-out sites below which a model's validation numbers and domain threshold are warned about:
# with a handful, one odd site sets the threshold (the largest of their domain scores) and moves the
# early stop and the card's validation means (issue 21 saw 2 validation sites on a real field).
MIN_VALIDATION_SITES = 12


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def validation_scores(generator: torch.nn.Module, sites: Sequence[StainSite], targets: Sequence[str],
                      device: torch.device, tile: int = 512, precision: str = "fp32") -> dict[str, float]:
    """Masked L1 (normalised units) and per-channel PCC over whole validation sites, predicted in the
    training's `precision` (the forward pass the model is trained in; bf16 halves the time on CPU)."""
    generator.eval()
    losses, pccs = [], {c: [] for c in targets}
    for site in sites:
        with autocast(device, precision):
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
    precision, seconds)."""
    target = inference.resolve_device(device, what="virtual staining")
    precision = inference.resolve_precision(settings.precision, target)
    LOGGER.info("virtual staining trains in %s (requested %r)", precision, settings.precision)
    n_inputs, n_outputs = data.train[0].inputs.shape[0], len(targets)
    rng = np.random.default_rng(settings.seed)
    reconstruction = models.reconstruction_loss(settings.loss)
    history, best, best_loss, stale = [], None, math.inf, 0
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        generator = models.build_generator(settings.arch, n_inputs, n_outputs, width=settings.width,
                                           depth=settings.depth, stem=settings.stem,
                                           seed=settings.seed).to(target)
        channels_last(generator)
        patch = training_patch(settings, generator.multiple, data)
        betas = (0.5, 0.9) if settings.gan else (0.9, 0.999)
        optimiser = torch.optim.Adam(generator.parameters(), lr=settings.lr, betas=betas)
        # cosine decay to 5 % over the planned steps: late epochs refine instead of jumping around
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.05 + 0.95 * 0.5 * (
            1 + math.cos(math.pi * min(step / (settings.max_epochs * settings.steps_per_epoch), 1))))
        critic = critic_optimiser = None
        if settings.gan:
            critic = models.build_critic(n_inputs + n_outputs, width=settings.width,
                                               seed=settings.seed).to(target)
            channels_last(critic)
            critic_optimiser = torch.optim.Adam(critic.parameters(), lr=settings.lr, betas=betas)
        generator.train()
        for epoch in range(settings.max_epochs):
            start, losses = time.perf_counter(), []
            for _ in range(settings.steps_per_epoch):
                batch = training_batch(rng, data.train, settings.batch, patch, settings.augment)
                x, y, mask = (channels_last(t.to(target)) for t in batch)
                if settings.gan:
                    loss = _gan_step(generator, critic, optimiser, critic_optimiser, x, y, mask,
                                     reconstruction, settings, precision)
                else:
                    optimiser.zero_grad(set_to_none=True)
                    with autocast(target, precision):
                        prediction = generator(x)
                    loss = reconstruction(prediction.float(), y, mask)
                    loss.backward()
                    optimiser.step()
                    loss = float(loss.detach())
                schedule.step()
                losses.append(loss)
            scores = validation_scores(generator, data.validation, targets, target, precision=precision)
            history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **scores,
                            "patch": patch, "precision": precision,
                            "seconds": time.perf_counter() - start})
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
    return generator.cpu().to(memory_format=torch.contiguous_format).eval(), table


def _gan_step(generator, critic, optimiser, critic_optimiser, x, y, mask, reconstruction,
              settings: StainSettings, precision: str = "fp32") -> float:
    """One conditional WGAN-GP step: the critic (on [brightfield, fluorescence] pairs, missing target
    channels zeroed in both) with gradient penalty, then the generator with weighted L1 plus an
    adversarial term whose weight adapts so its gradient never exceeds the reconstruction's. The
    generator's forward pass runs in `precision`, the critic in fp32."""
    channel_mask = mask[:, :, None, None]
    with autocast(x.device, precision):
        fake = generator(x)
    fake = fake.float()
    real_pair = torch.cat([x, y * channel_mask], 1)
    fake_pair = torch.cat([x, fake.detach() * channel_mask], 1)
    critic_optimiser.zero_grad(set_to_none=True)
    critic_loss = (critic(fake_pair).mean() - critic(real_pair).mean()
                   + settings.gan_gp_weight * models.gradient_penalty(critic, real_pair, fake_pair))
    critic_loss.backward()
    critic_optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    rec = settings.gan_l1_weight * reconstruction(fake, y, mask)
    adversarial = -critic(torch.cat([x, fake * channel_mask], 1)).mean()
    weight = models.adaptive_adversarial_weight(rec, adversarial, generator.last_layer)
    loss = rec + settings.gan_adversarial * weight * adversarial
    loss.backward()
    optimiser.step()
    return float(rec.detach()) / settings.gan_l1_weight


# ---------------------------------------------------------------------------------------------
# Model card and training domain
# ---------------------------------------------------------------------------------------------


def model_card(settings: StainSettings, data: TrainingSet, targets: Sequence[str], brightfield: str,
               history: pd.DataFrame, plates: Sequence[dict], well_query: str | None,
               validation_query: str | None = None) -> dict:
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
        "validation_filter": validation_query or "",
        "wells": data.wells, "n_sites": {"train": len(data.train), "validation": len(data.validation)},
        "metrics": {k: float(v) for k, v in best.items() if k.startswith("val_")}
        | {"best_epoch": int(best["epoch"]), "epochs_run": int(len(history))},
        "patch_used": int(best["patch"]),
        "precision_used": str(best.get("precision", "fp32")),
    }


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


def fit_stain_model(sources: Sequence[PlateSource], targets: Sequence[str], settings: StainSettings, *,
                    brightfield: str, plates: Sequence[dict], well_query: str | None = None,
                    validation_query: str | None = None, device: torch.device | str = "cpu",
                    threads: int = 1, domain_quantile: float = 0.99,
                    domain_floor: float = 3.0) -> tuple[torch.nn.Module, dict, pd.DataFrame]:
    """Training set, training, and the model card with its training domain: what rule stain_train
    (and the generalisation matrix's per-group training) does. Returns generator, card, history.
    Fewer than MIN_VALIDATION_SITES held-out sites is logged as a warning: they set the early stop,
    the card's metrics and the domain threshold."""
    data = build_training_set(sources, targets, settings, well_query, validation_query)
    LOGGER.info("training on %d sites (%d validation) of plates %s", len(data.train), len(data.validation),
                [s.plate for s in sources])
    if len(data.validation) < MIN_VALIDATION_SITES:
        LOGGER.warning("only %d validation sites (fewer than %d): the early stop, the card's validation "
                       "metrics and the domain threshold rest on them; hold out more wells "
                       "(stain.validation_wells, stain.model.val_fraction)", len(data.validation),
                       MIN_VALIDATION_SITES)
    generator, history = train_stain_model(data, targets, settings, device=device, threads=threads)
    card = model_card(settings, data, targets, brightfield, history, plates, well_query, validation_query)
    card["domain"] = training_domain(sources, data, quantile=domain_quantile, floor=domain_floor)
    LOGGER.info("domain: %s, threshold %.2f robust SD (validation sites' max %.2f)",
                {k: round(v["median"], 4) for k, v in card["domain"]["statistics"].items()},
                card["domain"]["threshold"], card["domain"]["validation_score_max"])
    return generator, card, history
