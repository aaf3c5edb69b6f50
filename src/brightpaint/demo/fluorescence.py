"""Clean fluorescence of a cell scene: DNA (chromatin texture, nucleoli), CYTO (cell-body dome) and
DAMAGE (nuclear background and foci), before the widefield PSF and the camera."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .cells import Cells, Labels, per_label

FLUORESCENCE_PSF = 1.0  # px, Gaussian sigma of the widefield fluorescence PSF


def bandpass_texture(rng: np.random.Generator, size: int, fine: float, coarse: float
                     ) -> np.ndarray:
    """Unit-variance band-pass noise (difference of Gaussians of white noise)."""
    white = rng.standard_normal((size, size), dtype=np.float32)
    texture = ndimage.gaussian_filter(white, fine) - ndimage.gaussian_filter(white, coarse)
    return texture / (texture.std() + 1e-12)


def _points_in_nucleus(rng: np.random.Generator, cells: Cells, labels: Labels, k: int, label: int,
                       count: int, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """`count` uniform points in the inner `reach` fraction of nucleus k's ellipse, as pixel
    coordinates; points that fall outside the image or outside the drawn nucleus are dropped."""
    size = labels.nuclei.shape[0]
    rho = reach * np.sqrt(rng.uniform(0, 1, count))
    phi = rng.uniform(0, 2 * np.pi, count)
    a, b = cells.nucleus_axes[k]
    c, s = math.cos(cells.nucleus_angle[k]), math.sin(cells.nucleus_angle[k])
    u, v = a * rho * np.cos(phi), b * rho * np.sin(phi)
    y = np.rint(cells.nucleus_yx[k, 0] + s * u + c * v).astype(int)
    x = np.rint(cells.nucleus_yx[k, 1] + c * u - s * v).astype(int)
    ok = (y >= 0) & (y < size) & (x >= 0) & (x < size)
    ok[ok] &= labels.nuclei[y[ok], x[ok]] == label
    return y[ok], x[ok]


def render_nucleoli(rng: np.random.Generator, cells: Cells, labels: Labels) -> np.ndarray:
    """Nucleoli map (0..1): 1-3 blobs of ~1.3 px sigma inside each non-pyknotic nucleus."""
    size = labels.nuclei.shape[0]
    points = np.zeros((size, size), dtype=np.float32)
    for label, k in enumerate(labels.kept, start=1):
        if cells.pyknotic[k]:
            continue
        y, x = _points_in_nucleus(rng, cells, labels, k, label, rng.integers(1, 4), 0.55)
        points[y, x] = rng.uniform(0.7, 1.0, len(y))
    sigma = 1.3
    blobs = ndimage.gaussian_filter(points, sigma) * (2 * np.pi * sigma**2)
    return np.clip(blobs, 0, 1) * (labels.nuclei > 0)


def render_nuclei(cells: Cells, labels: Labels, texture: np.ndarray,
                  nucleoli: np.ndarray) -> np.ndarray:
    """Clean DNA stain: thickness profile x chromatin texture, nucleoli excluded; 0 outside."""
    inside = labels.nuclei > 0
    profile = np.where(inside, np.clip(1 - labels.nucleus_radius**2, 0, 1) ** 0.35, 0)
    level = per_label(cells.dna_level, labels, labels.nuclei)
    amplitude = per_label(cells.texture_amplitude, labels, labels.nuclei)
    dna = level * profile * (1 + amplitude * texture) * (1 - 0.6 * nucleoli)
    return np.clip(dna, 0, None).astype(np.float32)


def render_cell_bodies(cells: Cells, labels: Labels, texture: np.ndarray) -> np.ndarray:
    """Clean CYTO stain: dome over the cell body (thicker centre), dimmer over the nucleus."""
    inside = labels.cells > 0
    profile = 0.3 + 0.7 * np.sqrt(np.clip(1 - labels.cell_radius**2, 0, 1))
    level = per_label(cells.cyto_level, labels, labels.cells)
    cyto = level * profile * (1 + 0.2 * texture) * np.where(labels.nuclei > 0, 0.6, 1.0)
    return np.where(inside, np.clip(cyto, 0, None), 0).astype(np.float32)


def render_foci(rng: np.random.Generator, cells: Cells, labels: Labels, foci_rate: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Clean DAMAGE stain: dim nuclear background plus Poisson(foci_rate) diffraction-limited foci
    per non-pyknotic nucleus. Returns the image and the foci count per label (index 0 unused)."""
    size = labels.nuclei.shape[0]
    inside = labels.nuclei > 0
    counts = np.zeros(len(labels.kept) + 1, dtype=np.int64)
    points = np.zeros((size, size), dtype=np.float32)
    for label, k in enumerate(labels.kept, start=1):
        if cells.pyknotic[k]:
            continue
        count = rng.poisson(foci_rate)
        if count == 0:
            continue
        y, x = _points_in_nucleus(rng, cells, labels, k, label, count, 0.8)
        np.add.at(points, (y, x), rng.uniform(0.5, 1.0, len(y)).astype(np.float32))
        counts[label] = len(y)
    sigma = 1.0
    foci = ndimage.gaussian_filter(points, sigma) * (2 * np.pi * sigma**2)
    profile = np.clip(1 - labels.nucleus_radius**2, 0, 1) ** 0.35
    background = per_label(cells.damage_background, labels, labels.nuclei) * profile
    damage = np.where(inside, background + foci, 0)
    return damage.astype(np.float32), counts

