"""Pixel-level agreement between a real image and a prediction of it (level 1 of the virtual-staining
evaluation): PCC, SSIM, PSNR, NRMSE and N-MAE.

Both images are compared as they are (callers put them on one intensity scale first). The range that
PSNR, SSIM, NRMSE and N-MAE are relative to is the real image's robust range, its 0.1-99.9 percentile
span: a hot pixel or a saturated speck in the real image then does not inflate every score.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

METRICS = ("pcc", "ssim", "psnr", "nrmse", "nmae")
RANGE_PERCENTILES = (0.1, 99.9)


def robust_range(real: np.ndarray) -> float:
    """The 0.1-99.9 percentile span of the real image (1.0 for a constant image, so scores stay
    finite and the constant case is still scored)."""
    low, high = np.percentile(real, RANGE_PERCENTILES)
    span = float(high - low)
    return span if span > 0 else 1.0


def _pair(real: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real = np.asarray(real, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if real.shape != predicted.shape or real.ndim != 2:
        raise ValueError(f"metrics: need two 2-D images of one shape, got {real.shape} and "
                         f"{predicted.shape}")
    if not (np.isfinite(real).all() and np.isfinite(predicted).all()):
        raise ValueError("metrics: images contain NaN or infinite values")
    return real, predicted


def pearson(real: np.ndarray, predicted: np.ndarray) -> float:
    """Pearson correlation of the pixels (NaN when either image is constant)."""
    real, predicted = _pair(real, predicted)
    a, b = real - real.mean(), predicted - predicted.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def ssim(real: np.ndarray, predicted: np.ndarray) -> float:
    """Mean structural similarity (scikit-image, 7 x 7 window, Gaussian weights as in Wang 2004)
    with the real image's robust range as data range."""
    real, predicted = _pair(real, predicted)
    return float(structural_similarity(real, predicted, data_range=robust_range(real),
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def psnr(real: np.ndarray, predicted: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB relative to the real image's robust range (inf if equal)."""
    real, predicted = _pair(real, predicted)
    mse = float(np.mean((real - predicted) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(robust_range(real) ** 2 / mse))


def nrmse(real: np.ndarray, predicted: np.ndarray) -> float:
    """Root-mean-square error divided by the real image's robust range."""
    real, predicted = _pair(real, predicted)
    return float(np.sqrt(np.mean((real - predicted) ** 2)) / robust_range(real))


def nmae(real: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute error divided by the real image's robust range."""
    real, predicted = _pair(real, predicted)
    return float(np.mean(np.abs(real - predicted)) / robust_range(real))


def image_metrics(real: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Every level-1 metric of one image pair, keyed by METRICS."""
    return {"pcc": pearson(real, predicted), "ssim": ssim(real, predicted), "psnr": psnr(real, predicted),
            "nrmse": nrmse(real, predicted), "nmae": nmae(real, predicted)}
