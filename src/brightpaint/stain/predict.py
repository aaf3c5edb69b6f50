"""Virtual-staining prediction: a site's virtual channels in the training plates' reference scale
(tiled, `inference.predict_tiled`), the layout of a plate's virtual.zarr, and a shard of a plate end
to end (`predict_sites`: test-time augmentation, uncertainty maps, domain scores)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..inference import predict_tiled
from ..ingest import StoreLayout, write_sites
from ..plate import UNCERTAINTY_PREFIX, VIRTUAL_PREFIX, PlateError, PlateSource, brightfield_planes
from ..trust import (
    DOMAIN_COLUMNS,
    DOMAIN_STATISTICS,
    brightfield_statistics,
    domain_scores,
    predict_augmented,
    site_uncertainty,
)
from .data import brightfield_input, normalise_brightfield
from .settings import StainError


def check_inputs(card: dict, inputs: np.ndarray, where: str) -> None:
    expected = card["architecture"]["in_channels"]
    if inputs.ndim != 3 or inputs.shape[0] != expected:
        raise StainError(f"{where}: the model expects {expected} brightfield plane(s) "
                         f"(half_width {card['inputs']['half_width']}), got input of shape {inputs.shape}")


def predict_normalised(generator: torch.nn.Module, card: dict, inputs: np.ndarray, *, tile: int = 512,
                       overlap: int = 96, batch: int | str = "auto", device: torch.device | str = "cpu",
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
# A shard of a plate, end to end
# ---------------------------------------------------------------------------------------------


SITE_COLUMNS = ["well", "site", "status", "reason", "seconds"]


def predict_sites(source: PlateSource, sites: Sequence[tuple[str, int]],
                  models: Sequence[tuple[torch.nn.Module, dict]], out: str | Path, *,
                  device: torch.device | str = "cpu", tile: int = 512, overlap: int = 96,
                  batch: int | str = "auto",
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
