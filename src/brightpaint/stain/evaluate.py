"""Virtual-staining evaluation, level 1 (pixels): metrics per site and channel of a plate with real
stains, by the well's role in training, and the brightfield | real | virtual examples figure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..ingest import read_plane, read_store_layout
from ..metrics import METRICS, image_metrics
from ..plate import VIRTUAL_PREFIX, PlateSource, fluorescence_plane, plate_scales, robust_scale, sample_items
from .data import brightfield_input
from .settings import StainError


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


def examples_figure(source: PlateSource, virtual_store: str | Path, metrics: pd.DataFrame,
                    path: str | Path, n_sites: int = 3) -> None:
    """PNG: for a few sites (validation or unseen wells first, median PCC), brightfield in focus |
    real | virtual for every evaluated channel, each pair on one contrast (real's 0.5-99.5 %)."""
    import matplotlib  # heavy, and only this figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

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
