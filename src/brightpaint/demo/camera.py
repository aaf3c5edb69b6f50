"""Acquisition per plate and channel: flat field (vignetting), batch factor, gain, background,
Poisson shot noise, read noise and the camera's dark offset."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .seeds import keyed_rng
from .spec import CHANNELS, ScreenSpec

# photons per clean unit, read noise (ADU), uniform background (clean units: autofluorescence
# and unbound dye) per channel, and the camera's offset (ADU). Fluorescence at 1/8 of a bright
# exposure: noisy input (DNA ~30 dB, CYTO ~21 dB PSNR) on which Noise2Void gains ~10 dB
# (tests/test_denoise.py).
GAIN = {"BF": 3000.0, "DNA": 100.0, "CYTO": 62.5, "DAMAGE": 75.0}
READ_NOISE = {"BF": 4.0, "DNA": 3.0, "CYTO": 3.0, "DAMAGE": 3.0}
BACKGROUND = {"BF": 0.0, "DNA": 0.3, "CYTO": 0.3, "DAMAGE": 0.3}
DARK_OFFSET = 100.0


def flat_field(size: int, centre: tuple[float, float], corner_ratio: float,
               tilt: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Smooth vignetting: (1 + r^2/L^2)^-2 around an off-centre optical axis times a gentle tilt,
    L chosen so that the mean corner value / image-centre value equals `corner_ratio`; normalised
    to mean 1. `centre` is (y, x) as a fraction of the image size."""
    cy, cx = centre

    def field(y, x, length):
        r2 = (y - cy) ** 2 + (x - cx) ** 2
        return (1.0 + r2 / length**2) ** -2 * (1.0 + tilt[0] * (y - 0.5) + tilt[1] * (x - 0.5))

    corners_y, corners_x = np.array([0.0, 0.0, 1.0, 1.0]), np.array([0.0, 1.0, 0.0, 1.0])
    low, high = math.log(0.05), math.log(50.0)
    for _ in range(60):  # bisection on log L: the ratio grows monotonically with L
        mid = 0.5 * (low + high)
        ratio = field(corners_y, corners_x, math.exp(mid)).mean() / field(0.5, 0.5, math.exp(mid))
        low, high = (mid, high) if ratio < corner_ratio else (low, mid)
    coords = np.linspace(0.0, 1.0, size)
    flat = field(coords[:, None], coords[None, :], math.exp(0.5 * (low + high)))
    return (flat / flat.mean()).astype(np.float32)


@dataclass(frozen=True)
class ChannelOptics:
    flat: np.ndarray = field(repr=False)  # float32, mean 1: the multiplicative field applied
    dark: float  # ADU added to every pixel
    gain: float  # photons per clean unit
    read_noise: float  # ADU, Gaussian
    background: float  # clean units added everywhere before illumination (autofluorescence)
    batch_factor: float  # multiplicative batch effect
    centre: tuple[float, float]  # optical axis (y, x), fraction of the image
    corner_ratio: float  # mean corner / image centre of the flat field


def batch_factors(seed: int, batch: str) -> dict[str, float]:
    """Per-channel intensity factor of a batch (lamp, stain lot, exposure): 0.8..1.25."""
    rng = keyed_rng(seed, "batch", batch)
    return {ch: float(np.exp(rng.uniform(math.log(0.8), math.log(1.25)))) for ch in CHANNELS}


@lru_cache(maxsize=16)
def plate_optics(spec: ScreenSpec, plate: str) -> dict[str, ChannelOptics]:
    """Illumination, dark offset, gain and batch factor of every channel of a plate."""
    plate_spec = next(p for p in spec.plates if p.plate == plate)
    batch = batch_factors(spec.seed, plate_spec.batch)
    optics = {}
    for ch in CHANNELS:
        rng = keyed_rng(spec.seed, "illumination", plate, ch)
        centre = (0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12))
        ratio = rng.uniform(0.6, 0.8)
        tilt = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))
        flat = flat_field(spec.size, centre, ratio, tilt)
        flat.setflags(write=False)  # cached and shared: nobody may change the truth in place
        background = BACKGROUND[ch] * plate_spec.stain_background  # brightfield's is 0
        optics[ch] = ChannelOptics(flat, DARK_OFFSET, GAIN[ch], READ_NOISE[ch], background,
                                   batch[ch], centre, float(ratio))
    return optics


def add_noise(rng: np.random.Generator, clean: np.ndarray, optics: ChannelOptics) -> np.ndarray:
    """Camera image: Poisson photons of gain * (clean + background) * flat * batch, Gaussian read
    noise, dark offset; rounded and clipped to uint16."""
    signal = np.clip(clean, 0, None) + np.float32(optics.background)
    expected = signal * np.float32(optics.gain * optics.batch_factor) * optics.flat
    counts = rng.poisson(expected).astype(np.float32)
    counts += rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(optics.read_noise)
    counts += np.float32(optics.dark)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)

