"""Training a Cellpose network from random initialisation (Cellpose's own `train_seg`), written in
Cellpose's weight format."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from .cellpose_modules import import_cellpose
from .weights import REDUCED_WIDTHS, build_network


def train_cellpose_model(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], out: str | Path, *,
                         diam_mean: float, widths: Sequence[int] = REDUCED_WIDTHS, epochs: int = 40,
                         learning_rate: float = 0.005, batch: int = 8, seed: int = 0,
                         test_images: Sequence[np.ndarray] = (), test_masks: Sequence[np.ndarray] = ()
                         ) -> dict:
    """Train a Cellpose network from random initialisation with `cellpose.train.train_seg` on
    scaled (2, Y, X) inputs and their label images; write its weights to `out` (Cellpose's own
    format, loadable by `load_cellpose_model` and Cellpose) and return the loss history."""
    # at call time: cellpose.train takes seconds to import (OpenCV and more)
    train_seg = import_cellpose("cellpose.train").train_seg

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
