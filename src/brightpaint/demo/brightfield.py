"""The brightfield z-stack: absorption and optical thickness (phase) of a cell scene, and the
transmitted intensity through focus (transport-of-intensity approximation, Gaussian defocus blur)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .cells import Cells, Labels, per_label

# optics of the brightfield z-stack
GRANULE_DENSITY = 1 / 12  # fraction of cytoplasm pixels holding a granule (vesicles, organelles)
GRANULE_ABSORPTION = 0.12
MEMBRANE_ABSORPTION = 0.08
ENVELOPE_ABSORPTION = 0.10
CHROMATIN_ABSORPTION = 0.05
NUCLEOLUS_ABSORPTION = 0.15
PSF_SIGMA = 0.5  # px, in-focus blur
PHASE_SMOOTHING = 2.0  # px: optical thickness varies smoothly (no sharp steps in a cell)
DEFOCUS_BLUR = 2.0  # px of extra Gaussian blur per plane of defocus
PHASE_CONTRAST = 5.0  # kappa: intensity change per plane per unit Laplacian of the phase


def optical_thickness(cells: Cells, labels: Labels, nucleoli: np.ndarray) -> np.ndarray:
    """Phase map (rad): cytoplasm dome + denser nucleus + nucleoli, smoothed by the optics."""
    cell_dome = np.sqrt(np.clip(1 - labels.cell_radius**2, 0, 1))
    nucleus_dome = np.sqrt(np.clip(1 - labels.nucleus_radius**2, 0, 1))
    phase = (per_label(cells.cell_thickness, labels, labels.cells) * cell_dome
             + per_label(cells.nucleus_thickness, labels, labels.nuclei) * nucleus_dome
             + 0.4 * nucleoli)
    return ndimage.gaussian_filter(phase.astype(np.float32), PHASE_SMOOTHING)


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels of an object that touch another label (or background): 1-px outlines."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def absorption_map(rng: np.random.Generator, labels: Labels, phase: np.ndarray,
                   texture: np.ndarray, nucleoli: np.ndarray) -> np.ndarray:
    """Weak, sharp absorption (fraction of light lost): membranes, nuclear envelope, cytoplasmic
    granules, nucleoli and chromatin - the fine detail that is only visible in focus."""
    in_nucleus = labels.nuclei > 0
    cytoplasm = (labels.cells > 0) & ~in_nucleus
    granules = cytoplasm & (rng.random(cytoplasm.shape, dtype=np.float32) < GRANULE_DENSITY)
    absorption = (MEMBRANE_ABSORPTION * _boundaries(labels.cells)
                  + ENVELOPE_ABSORPTION * _boundaries(labels.nuclei))
    absorption = absorption + granules * rng.uniform(0.5, 1.5, cytoplasm.shape) * GRANULE_ABSORPTION
    chromatin = in_nucleus * np.clip(CHROMATIN_ABSORPTION * (1 + 0.8 * texture), 0, None)
    absorption += NUCLEOLUS_ABSORPTION * nucleoli + chromatin + 0.015 * phase
    return absorption.astype(np.float32)



def defocus_series(absorption: np.ndarray, phase: np.ndarray, defocus: list[float]
                   ) -> np.ndarray:
    """Transmitted-light intensity (background 1) at each defocus dz (planes; > 0 = above focus):
    I(dz) = G_s(dz) * [1 - A - kappa dz laplace(phi)], s(dz)^2 = PSF_SIGMA^2 + (DEFOCUS_BLUR dz)^2
    (transport-of-intensity approximation with Gaussian defocus blur)."""
    size = absorption.shape[0]
    widest = max(abs(dz) for dz in defocus)
    pad = int(math.ceil(3 * math.hypot(PSF_SIGMA, DEFOCUS_BLUR * widest))) + 2
    pad = min(pad, size - 1)  # reflect padding keeps the blur from wrapping around
    a_hat = np.fft.rfft2(np.pad(absorption, pad, mode="reflect"))
    p_hat = np.fft.rfft2(np.pad(phase, pad, mode="reflect"))
    n = size + 2 * pad
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    f2 = fy**2 + fx**2
    # symbol of the 5-point discrete Laplacian, so the contrast term is exactly laplace(phase)
    laplacian_p_hat = -4 * (np.sin(np.pi * fy) ** 2 + np.sin(np.pi * fx) ** 2) * p_hat
    stack = np.empty((len(defocus), size, size), dtype=np.float32)
    for i, dz in enumerate(defocus):
        sigma2 = PSF_SIGMA**2 + (DEFOCUS_BLUR * dz) ** 2
        blur = np.exp(-2 * np.pi**2 * sigma2 * f2)
        loss = np.fft.irfft2(blur * (a_hat + PHASE_CONTRAST * dz * laplacian_p_hat), s=(n, n))
        stack[i] = 1 - loss[pad:pad + size, pad:pad + size]
    return stack


def brightfield_stack(absorption: np.ndarray, phase: np.ndarray, focus_position: float,
                      z_planes: int) -> np.ndarray:
    """Clean brightfield planes z = 0..z_planes-1 with the true focus at `focus_position`."""
    return defocus_series(absorption, phase, [z - focus_position for z in range(z_planes)])


def in_focus_brightfield(absorption: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Clean brightfield exactly at focus: absorption only, the phase term vanishes."""
    return defocus_series(absorption, phase, [0.0])[0]

