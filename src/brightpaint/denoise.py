"""Noise2Void: self-supervised blind-spot denoising of fluorescence channels, trained on the noisy data.

Why blind-spot training works without clean targets: camera noise (Poisson photons + Gaussian read
noise) is independent from pixel to pixel, while the signal is not. A network that must predict a pixel
from its neighbours only (the pixel itself is hidden) can learn the signal, never the pixel's own noise,
so the mean-squared error against the *noisy* value is minimised by the clean value (Krull et al. 2019).

Training (`train_n2v`): random patches of the noisy images, flipped / rotated by 90 degrees; in each
patch a small fraction of pixels is masked by replacing it with the value of a random other pixel of
its 5 x 5 neighbourhood; the loss is the MSE on the masked pixels only. The network is a small U-Net.
Each image is normalised by its own mean and standard deviation (images of one channel differ in
brightness between plates and batches); the same per-image normalisation is applied at inference and
undone afterwards, so `denoise_image` returns the input's own intensity scale.

Inference (`denoise_image`) runs in overlapping tiles blended with linear ramps, so any image size fits
in memory and tile borders leave no seams.

Models are saved with `save_n2v` as a plain `torch.save` dictionary (tensors, numbers, strings) that
`torch.load(path, weights_only=True)` reads: no pickled code is executed on load.

When not to use it: a blind-spot network never sees the pixel it predicts, so where the noise is
smaller than the pixel-scale structure it is worse than the input. Measured on a bright, unblurred
earlier version of the demo stains (DNA 47.5 dB noisy -> 34.7 dB). On the demo's stains as they are
now (a short exposure: tens of photons per clean unit, an autofluorescence background, the
widefield PSF; 16 sites, 128 px, 300 steps) it wins: DNA 29.5 -> 39.2 dB (best Gaussian, tuned on
the truth, 36.8), CYTO 20.8 -> 31.5 dB (best Gaussian 31.4: a smooth cell-body stain is what a
blur suits best). Denoise channels that are noisy.

Whether to apply it is decided from the data, per plate and stain (`assess_denoising`), by
Noise2Self's argument (Batson & Royer 2019): for a predictor that never sees the pixel it predicts,
the expected squared error against the NOISY pixel is its error against the clean one plus the noise
variance. So the blind-spot loss on images the model was not trained on, less the noise variance
measured on the raw images (`noise_variance`), estimates the denoised error, and the noise variance
is the raw image's own error: estimated gain = 10 log10(noise variance / (loss - noise variance)).
Checked against the generator's truth (demo stains at their own exposure and 8x / 64x brighter;
model trained on 14 sites, gain estimated on 6 others; true gain -> estimated): DNA +12.1 -> +8.0,
+3.5 -> +2.7, -3.0 -> -3.8 dB; CYTO +14.1 -> +18.0, +9.4 -> +7.4, +4.2 -> +2.6; DAMAGE (sparse
foci) +20.8 -> +21.7, +16.9 -> +30.7, +12.5 -> +10.7. Large gains are imprecise (a difference of
two close numbers) and reported up to `MAX_REPORTED_GAIN_DB`; the sign and the first few dB, which
the decision needs, are right on all nine. The estimate is of the blind-spot predictor; the applied
network also sees the pixel itself, which the measured gains above include.

Determinism: on CPU, the same images, parameters and seed give bit-identical weights. On CUDA the
convolution kernels are not guaranteed to be deterministic.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .atomic import atomic_path
from .inference import (
    autocast,
    channels_last,
    predict_tiled,
    resolve_device,
    resolve_precision,
    torch_threads,
)
from .ingest import StoreLayout, channel_plane, read_plane, stored_sites
from .provenance import sha256_file

LOGGER = logging.getLogger("brightpaint")

# Bump when the architecture, normalisation or file format changes: saved models record it.
CODE_VERSION = "n2v-1"
FORMAT = "brightpaint-n2v"
NEIGHBOURHOOD = 5  # masked pixels take the value of a random other pixel in this window
MIN_STD = 1e-6  # an image whose standard deviation is below this carries no signal
MIN_GAIN_DB = 1.0  # apply Noise2Void where its estimated gain is at least this
ASSESS_SITES = 4  # sites per plate and stain on which the gain is estimated (not trained on)
# px per axis of each assessed image (its centre): the estimate is an average over pixels, so a
# megapixel per site is plenty, and the assessment then costs the same for 1080 and 2160 px sites
ASSESS_SIDE = 1024
MAX_REPORTED_GAIN_DB = 20.0
NOISE_BLOCK = 32  # px: blocks over which the noise level is taken as constant
# Immerkaer's operator: zero on any locally linear signal; its response to white noise of variance
# s^2 has variance 36 s^2
_NOISE_OPERATOR = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


def _conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    """Two 3 x 3 convolutions with batch norm: batch norm made 300-step training ~0.9 dB better on
    the smooth CYTO stain (measured), and in eval mode it is a fixed affine map, so tiles still
    agree with whole-image inference."""
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out),
        nn.LeakyReLU(0.1),
        nn.Conv2d(channels_out, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out),
        nn.LeakyReLU(0.1))


class UNet(nn.Module):
    """A small U-Net (`depth` poolings, `base` channels doubling per level, linear output)."""

    def __init__(self, depth: int = 2, base: int = 32):
        super().__init__()
        if depth < 1 or base < 1:
            raise ValueError(f"UNet: depth and base must be >= 1, got {depth}, {base}")
        self.depth, self.base = depth, base
        widths = [base * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList([_conv_block(1, widths[0])] +
                                  [_conv_block(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_conv_block(2 * widths[i], widths[i])
                                    for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], 1, 1)

    @property
    def multiple(self) -> int:
        """Height and width of an input must be multiples of this."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = nn.functional.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def build_model(depth: int, base: int, seed: int) -> UNet:
    """A U-Net with weights drawn from `seed` (the global torch random state is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(depth, base)


# ---------------------------------------------------------------------------------------------
# Input checks and normalisation
# ---------------------------------------------------------------------------------------------


def check_images(images: Sequence[np.ndarray], channel: str, patch: int) -> list[np.ndarray]:
    """The training images as float32 2-D arrays with signal, or a ValueError that says what is wrong
    (no images, wrong shape, NaN/inf, smaller than the patch, no signal at all). Constant images
    among others are dropped with a warning: they teach nothing and cannot be normalised."""
    if isinstance(images, np.ndarray) or len(images) == 0:
        raise ValueError(f"channel {channel}: need a non-empty list of 2-D images")
    checked = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"channel {channel}: image {i} has shape {image.shape}; need 2-D (y, x)")
        image = image.astype(np.float32, copy=False)
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            raise ValueError(f"channel {channel}: image {i} has {bad} NaN or infinite pixel(s); "
                             "fill or drop them before denoising")
        if min(image.shape) < patch:
            raise ValueError(f"channel {channel}: image {i} is {image.shape[0]} x {image.shape[1]} px, "
                             f"smaller than the training patch {patch}; pass a smaller patch")
        if image.std() < MIN_STD:
            LOGGER.warning("channel %s: image %d is constant (%g); left out of training", channel, i,
                           float(image.flat[0]))
            continue
        checked.append(image)
    if not checked:
        raise ValueError(f"no signal to learn from: channel {channel} (all {len(images)} image(s) are "
                         "constant)")
    return checked


def image_stats(image: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation that normalise one image (std floored for constant images)."""
    data = image.astype(np.float64, copy=False)
    return float(data.mean()), max(float(data.std()), MIN_STD)


def normalise(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Zero-mean, unit-variance float32 copy of `image`, and the mean and std that undo it."""
    mean, std = image_stats(image)
    return ((image - mean) / std).astype(np.float32), mean, std


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def random_patches(rng: np.random.Generator, images: list[np.ndarray], count: int,
                   patch: int) -> np.ndarray:
    """`count` random patch x patch crops of random images, each flipped / rotated by a random
    multiple of 90 degrees (the eight symmetries of the square): shape (count, patch, patch)."""
    out = np.empty((count, patch, patch), dtype=np.float32)
    picks = rng.integers(0, len(images), count)
    for k, i in enumerate(picks):
        image = images[i]
        y = rng.integers(0, image.shape[0] - patch + 1)
        x = rng.integers(0, image.shape[1] - patch + 1)
        crop = image[y:y + patch, x:x + patch]
        crop = np.rot90(crop, int(rng.integers(0, 4)))
        out[k] = crop[:, ::-1] if rng.integers(0, 2) else crop
    return out


def blind_spot_mask(rng: np.random.Generator, patches: np.ndarray,
                    fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hide a `fraction` of the pixels of every patch: each hidden pixel gets the value of a random
    other pixel of its 5 x 5 neighbourhood (clipped at the patch border). Returns the network input
    and the boolean mask of hidden pixels (where the loss is computed)."""
    count, height, width = patches.shape
    per_patch = max(1, int(round(fraction * height * width)))
    inputs = patches.copy()
    mask = np.zeros(patches.shape, dtype=bool)
    reach = NEIGHBOURHOOD // 2
    offsets = np.array([(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
                        if (dy, dx) != (0, 0)])
    for k in range(count):
        flat = rng.choice(height * width, per_patch, replace=False)
        y, x = np.divmod(flat, width)
        dy, dx = offsets[rng.integers(0, len(offsets), per_patch)].T
        source_y, source_x = np.clip(y + dy, 0, height - 1), np.clip(x + dx, 0, width - 1)
        inputs[k, y, x] = patches[k, source_y, source_x]
        mask[k, y, x] = True
    return inputs, mask


def training_batch(rng: np.random.Generator, images: list[np.ndarray], batch: int, patch: int,
                   fraction: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One batch: masked inputs, noisy targets and the mask, as (batch, 1, patch, patch) tensors."""
    targets = random_patches(rng, images, batch, patch)
    inputs, mask = blind_spot_mask(rng, targets, fraction)
    return tuple(torch.from_numpy(a[:, None]).to(device) for a in (inputs, targets, mask))


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the hidden pixels only: elsewhere the network sees the noisy value and
    would learn the identity."""
    return ((prediction - target)[mask] ** 2).mean()


def check_training_parameters(steps: int, patch: int, batch: int, mask_fraction: float, depth: int,
                              base: int, threads: int) -> None:
    """Raise a ValueError naming the first training parameter out of range (before any work)."""
    for name, value, low in (("steps", steps, 1), ("patch", patch, 8), ("batch", batch, 1),
                             ("depth", depth, 1), ("base", base, 1), ("threads", threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
    if not 0 < mask_fraction <= 0.25:
        raise ValueError(f"mask_fraction: {mask_fraction} must be in (0, 0.25]")
    if patch % 2**depth:
        raise ValueError(f"patch: {patch} must be a multiple of {2**depth} (2 ** depth)")


def fit(model: UNet, images: list[np.ndarray], *, steps: int, patch: int, batch: int, lr: float,
        mask_fraction: float, seed: int, device: torch.device, precision: str = "fp32") -> list[float]:
    """Run the blind-spot training loop on normalised images; return the loss of every step. Adam
    with a cosine-decaying learning rate (to lr / 20) settles the weights within a short run. The
    forward pass runs in `precision` (inference.autocast), the loss in fp32."""
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=lr / 20)
    channels_last(model).train()
    losses = []
    for _ in range(steps):
        inputs, targets, mask = (channels_last(t) for t in training_batch(rng, images, batch, patch,
                                                                               mask_fraction, device))
        with autocast(device, precision):
            prediction = model(inputs)
        loss = masked_mse(prediction.float(), targets, mask)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


def normalisation_summary(stats: list[tuple[float, float]]) -> dict:
    """What the metadata records about normalisation: the method and the training images' ranges
    (an image far outside them at inference is out of the training distribution)."""
    means, stds = np.array(stats).T
    return {"method": "per-image mean / std, undone after denoising",
            "train_mean_range": [float(means.min()), float(means.max())],
            "train_std_range": [float(stds.min()), float(stds.max())]}


def train_n2v(images: list[np.ndarray], *, steps: int = 300, patch: int = 64, batch: int = 16,
              lr: float = 3e-3, mask_fraction: float = 0.02, depth: int = 2, base: int = 16,
              seed: int = 0, device: str = "cpu", precision: str = "auto", threads: int = 2,
              channel: str = "image") -> tuple[UNet, dict]:
    """Train a Noise2Void U-Net on noisy 2-D images of one channel (no clean targets needed).

    The defaults are sized for short CPU runs (300 steps of 16 x 64 x 64 patches, ~20-25 s on 2
    cores): 2 % masked pixels rather than the paper's 0.2 % give ten times more loss pixels per
    step, and lr 3e-3 rather than 4e-4 (both measured better at 300 steps on the demo's DNA and
    CYTO stains). `precision` (inference.resolve_precision): "auto" trains in bf16 mixed precision
    where the hardware has bf16 units. Returns the model (eval mode, CPU) and the history: per-step
    loss, seconds, and the parameters that `save_n2v` records (the model carries them as
    `model.n2v_info`). `channel` names the images in messages and metadata."""
    check_training_parameters(steps, patch, batch, mask_fraction, depth, base, threads)
    checked = check_images(images, channel, patch)
    normalised = [normalise(image) for image in checked]
    target = resolve_device(device, what="Noise2Void")
    precision = resolve_precision(precision, target)
    start = time.perf_counter()
    with torch_threads(threads):
        model = build_model(depth, base, seed).to(target)
        losses = fit(model, [data for data, _, _ in normalised], steps=steps, patch=patch, batch=batch,
                     lr=lr, mask_fraction=mask_fraction, seed=seed, device=target, precision=precision)
    seconds = time.perf_counter() - start
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    model.n2v_info = {
        "channel": channel, "steps": steps, "patch": patch, "batch": batch, "lr": lr,
        "mask_fraction": mask_fraction, "neighbourhood": NEIGHBOURHOOD, "seed": seed,
        "device": str(target), "precision": precision, "threads": threads, "n_images": len(checked),
        "n_images_skipped": len(images) - len(checked), "train_seconds": round(seconds, 3),
        "final_loss": float(np.mean(losses[-max(1, steps // 10):])),  # mean of the last 10 %
        "normalisation": normalisation_summary([(mean, std) for _, mean, std in normalised]),
        "architecture": {"name": "UNet", "depth": depth, "base": base},
    }
    LOGGER.info("Noise2Void %s: %d steps in %.1f s, final loss %.4f", channel, steps, seconds,
                model.n2v_info["final_loss"])
    return model, {"loss": losses, "seconds": seconds, **model.n2v_info}


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def denoise_image(model: UNet, image: np.ndarray, *, tile: int = 256, overlap: int = 32,
                  device: str = "cpu", threads: int = 2) -> np.ndarray:
    """Denoised float32 copy of a 2-D image, in the image's own intensity scale.

    The image is normalised by its own mean and std (as in training), predicted in `tile` px tiles
    overlapping by `overlap` px (both rounded down to the U-Net's size multiple) and blended with
    raised-cosine ramps, then de-normalised. An overlap of at least twice the network's receptive
    radius (17 px at depth 2) makes tiled and whole-image inference agree closely."""
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"denoise_image: need a 2-D image, got shape {image.shape}")
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise ValueError(f"denoise_image: image has {bad} NaN or infinite pixel(s)")
    normalised, mean, std = normalise(image.astype(np.float32, copy=False))
    target = resolve_device(device, log=False)
    with torch_threads(threads):
        model = model.to(target).eval()
        out = predict_tiled(model, normalised[None], tile=tile, overlap=overlap, batch=1, device=target,
                            amp=False)[0]
        model.cpu()
    return out * np.float32(std) + np.float32(mean)


def denoise_if_assessed(model: UNet | None, image: np.ndarray, *, tile: int = 256, device: str = "cpu",
                        threads: int = 2) -> np.ndarray:
    """`denoise_image` where the plate's assessment applies Noise2Void (a model), else the image
    itself as float32 (None: the estimate said the stain is better kept as it is)."""
    if model is None:
        return np.asarray(image, dtype=np.float32)
    return denoise_image(model, image, tile=tile, device=device, threads=threads)


# ---------------------------------------------------------------------------------------------
# Does it help? Estimated from the data alone
# ---------------------------------------------------------------------------------------------


def noise_variance(image: np.ndarray, block: int = NOISE_BLOCK) -> float:
    """The image's pixel noise variance, averaged over the image: per `block` x `block` block the
    median absolute response of Immerkaer's operator (blind to smooth signal; the median ignores the
    edges and spots that leak through) converted to a variance, then the mean over blocks, so
    Poisson noise that grows with brightness is averaged as the image has it."""
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2 or min(data.shape) < 3:
        raise ValueError(f"noise_variance: need a 2-D image of at least 3 x 3 px, got {data.shape}")
    response = np.abs(ndimage.convolve(data, _NOISE_OPERATOR, mode="reflect"))[1:-1, 1:-1]
    height, width = response.shape
    step_y, step_x = min(block, height), min(block, width)
    variances = [float(np.median(response[y:y + step_y, x:x + step_x])) ** 2
                 for y in range(0, height - step_y + 1, step_y)
                 for x in range(0, width - step_x + 1, step_x)]
    return float(np.mean(variances)) / (0.6745 * 6.0) ** 2  # median |N(0, 1)| = 0.6745


def blind_spot_loss(model: UNet, image: np.ndarray, *, fraction: float = 0.02, repeats: int = 8,
                    seed: int = 0, tile: int = 256, device: str = "cpu", threads: int = 2) -> float:
    """Mean squared error of the model's prediction of hidden pixels against their noisy values, on
    a normalised image: `repeats` passes, each hiding a random `fraction` of the pixels as training
    does (`blind_spot_mask`)."""
    data = np.asarray(image, dtype=np.float32)[None]
    rng = np.random.default_rng(seed)
    target = resolve_device(device, log=False)
    total, count = 0.0, 0
    with torch_threads(threads):
        model = model.to(target).eval()
        for _ in range(repeats):
            inputs, mask = blind_spot_mask(rng, data, fraction)
            prediction = predict_tiled(model, inputs, tile=tile, overlap=32, batch=1, device=target,
                                       amp=False)
            total += float(((prediction - data)[mask].astype(np.float64) ** 2).sum())
            count += int(mask.sum())
        model.cpu()
    return total / count


def assess_denoising(model: UNet, images: Sequence[np.ndarray], *, min_gain_db: float = MIN_GAIN_DB,
                     seed: int = 0, tile: int = 256, device: str = "cpu", threads: int = 2,
                     side: int = ASSESS_SIDE) -> dict:
    """Whether Noise2Void improves these images (of one stain, not trained on), from the images
    alone (module docstring): each image's centre, at most `side` px per axis, is normalised as for
    denoising; noise variance and blind-spot loss are averaged over the images. Returns a
    JSON-ready dict: apply (estimated gain >= `min_gain_db`), estimated_gain_db, noise_variance and
    blind_spot_loss (in units of each image's variance), n_images, min_gain_db."""
    usable = [_centre(np.asarray(image, dtype=np.float32), side) for image in images]
    usable = [image for image in usable if np.isfinite(image).all() and image.std() > MIN_STD]
    if not usable:
        raise ValueError("assess_denoising: no image with signal to assess the model on")
    noise, loss = [], []
    for k, image in enumerate(usable):
        normalised, _, _ = normalise(image)
        noise.append(noise_variance(normalised))
        loss.append(blind_spot_loss(model, normalised, seed=seed + k, tile=tile, device=device,
                                    threads=threads))
    noise_mean, loss_mean = float(np.mean(noise)), float(np.mean(loss))
    # the blind-spot predictor's error against the clean image, floored where the gain is too large
    # to measure (loss and noise nearly equal)
    floor = noise_mean * 10 ** (-MAX_REPORTED_GAIN_DB / 10)
    gain = 10 * np.log10(noise_mean / max(loss_mean - noise_mean, floor)) if noise_mean > 0 else -np.inf
    return {"apply": bool(gain >= min_gain_db), "estimated_gain_db": round(float(gain), 2),
            "noise_variance": round(noise_mean, 5), "blind_spot_loss": round(loss_mean, 5),
            "n_images": len(usable), "min_gain_db": min_gain_db}


def _centre(image: np.ndarray, side: int) -> np.ndarray:
    """The central window of at most `side` px per axis of a 2-D image."""
    y0, x0 = max(0, (image.shape[0] - side) // 2), max(0, (image.shape[1] - side) // 2)
    return image[y0:y0 + side, x0:x0 + side]


def choose_assessment_sites(store: str | Path, wells: Sequence[str], exclude: Sequence[Sequence],
                            n: int = ASSESS_SITES, seed: int = 0) -> tuple[list[tuple[str, int]], bool]:
    """Up to `n` sites of `wells` (seeded draw, plate order) that are not in `exclude` (the sites
    the model was trained on), and True; when every site was trained on (a small plate), up to `n`
    of those, and False: the estimate is then on training images."""
    candidates = stored_sites(store, wells)
    excluded = {(str(well), int(site)) for well, site in exclude}
    fresh = [c for c in candidates if (c[0], int(c[1])) not in excluded]
    pool, held_out = (fresh, True) if fresh else (candidates, False)
    if not pool:
        raise ValueError(f"{store}: no sites in wells {sorted(set(wells))}")
    return seeded_sample(pool, n, seed), held_out


def assess_plate_denoising(store: str | Path, layout: StoreLayout, channel: str, wells: Sequence[str],
                           model: UNet, trained_sites: Sequence[Sequence], *, always: bool = False,
                           min_gain_db: float = MIN_GAIN_DB, seed: int = 0,
                           correct: Callable[[np.ndarray], np.ndarray] | None = None, tile: int = 256,
                           device: str = "cpu", threads: int = 2) -> dict:
    """`assess_denoising` of one stain of a plate, on up to `ASSESS_SITES` of its sites that the
    model was not trained on (`trained_sites`), read through `correct` as denoising reads them. With
    `always`, the decision is to apply whatever the estimate (config denoise.apply: always)."""
    sites, held_out = choose_assessment_sites(store, wells, trained_sites, ASSESS_SITES, seed)
    images = read_training_images(store, layout, channel, sites, correct=correct)
    result = assess_denoising(model, images, min_gain_db=min_gain_db, seed=seed, tile=tile, device=device,
                              threads=threads)
    decided_by = "estimate"
    if always:
        result["apply"], decided_by = True, "denoise.apply: always"
    return {**result, "decided_by": decided_by, "held_out": held_out,
            "sites": [[well, int(site)] for well, site in sites]}


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


def save_n2v(model: UNet, path: str | Path, metadata: dict | None = None) -> dict:
    """Write the model's weights and metadata to `path` (written beside it, then renamed) and return
    the metadata with the file's sha256 added. Recorded: the training parameters and normalisation
    (`model.n2v_info`), the caller's `metadata` (e.g. plates, wells / sites used) and the code and
    torch versions. Metadata must be JSON-serialisable; the file holds only tensors and a JSON string,
    so `torch.load(path, weights_only=True)` reads it."""
    recorded = {**getattr(model, "n2v_info", {}), **(metadata or {}),
                "architecture": {"name": "UNet", "depth": model.depth, "base": model.base},
                "code_version": CODE_VERSION, "torch_version": torch.__version__}
    try:
        text = json.dumps(recorded, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"metadata: must be JSON-serialisable ({err})") from err
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as partial:
        torch.save({"format": FORMAT, "state_dict": state, "metadata": text}, partial)
    return {**json.loads(text), "sha256": sha256_file(path)}


def load_n2v(path: str | Path) -> tuple[UNet, dict]:
    """The model (eval mode, CPU) and metadata (with the file's sha256) saved by `save_n2v`."""
    path = Path(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path}: not a brightpaint Noise2Void model file")
    metadata = json.loads(saved["metadata"])
    architecture = metadata["architecture"]
    model = UNet(architecture["depth"], architecture["base"])
    model.load_state_dict(saved["state_dict"])
    model.n2v_info = {k: v for k, v in metadata.items() if k not in ("code_version", "torch_version")}
    return model.eval(), {**metadata, "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------
# Training images from a plate store
# ---------------------------------------------------------------------------------------------


def choose_training_sites(store: str | Path, wells: Sequence[str], max_sites: int = 16,
                          seed: int = 0) -> list[tuple[str, int]]:
    """At most `max_sites` (well, site) pairs drawn at random (seeded) from `wells`, in plate order:
    a bounded, reproducible sample, whatever the plate size."""
    if isinstance(max_sites, bool) or not isinstance(max_sites, int) or max_sites < 1:
        raise ValueError(f"max_sites: must be an integer >= 1, got {max_sites!r}")
    candidates = stored_sites(store, wells)
    absent = sorted(set(wells) - {well for well, _ in candidates})
    if absent:
        raise ValueError(f"{store}: well(s) {', '.join(absent)} are not in the store")
    if not candidates:
        raise ValueError(f"{store}: no sites in wells {sorted(set(wells))}")
    return seeded_sample(candidates, max_sites, seed)


def seeded_sample(pool: Sequence, n: int, seed: int) -> list:
    """At most `n` items of `pool`, drawn without replacement with `seed`, in the pool's order."""
    picked = np.random.default_rng(seed).choice(len(pool), min(n, len(pool)), replace=False)
    return [pool[i] for i in sorted(picked)]


def read_training_images(store: str | Path, layout: StoreLayout, channel: str,
                         sites: Sequence[tuple[str, int]], *, z: int | None = None,
                         correct: Callable[[np.ndarray], np.ndarray] | None = None
                         ) -> list[np.ndarray]:
    """The channel's plane of each (well, site), optionally passed through `correct` (e.g. an
    illumination correction: plane -> corrected plane of the same shape)."""
    c, z = channel_plane(layout, channel, z)
    images = []
    for well, site in sites:
        plane = np.asarray(read_plane(store, well, site, c, z), dtype=np.float32)
        if correct is not None:
            plane = np.asarray(correct(plane), dtype=np.float32)
            if plane.shape != tuple(layout.shape):
                raise ValueError(f"correct: returned shape {plane.shape} for well {well} site {site}; "
                                 f"expected {tuple(layout.shape)}")
        images.append(plane)
    return images


def sample_training_images(store: str | Path, layout: StoreLayout, channel: str,
                           wells: Sequence[str], max_sites: int = 16, seed: int = 0, *,
                           z: int | None = None,
                           correct: Callable[[np.ndarray], np.ndarray] | None = None
                           ) -> list[np.ndarray]:
    """At most `max_sites` 2-D float32 planes of `channel` from random sites of `wells`, streamed
    from the plate store one plane at a time (memory stays bounded on a full plate). Call
    `choose_training_sites` with the same arguments to record which sites were used."""
    sites = choose_training_sites(store, wells, max_sites, seed)
    return read_training_images(store, layout, channel, sites, z=z, correct=correct)
