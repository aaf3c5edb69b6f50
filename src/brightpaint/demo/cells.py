"""Cell scenes and their masks: cell types, cell placement and shapes, instance labels of nuclei
and cell bodies (cell k always contains nucleus k)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .treatments import BASE_TEXTURE, Phenotype


@dataclass(frozen=True)
class CellType:
    name: str
    cells_per_site: float  # mean number of cells on a 256 x 256 px site (untreated)
    min_spacing: float  # px between nucleus centres (contact inhibition)
    nucleus_radius: float  # px, geometric mean of the semi-axes
    nucleus_aspect: float  # major / minor axis
    cell_radius: float  # px, geometric mean of the semi-axes before Voronoi competition
    cell_aspect: float
    cell_irregularity: float  # amplitude of the boundary harmonics (ruffled, spread cells)
    aligned: bool  # neighbouring cells share an orientation (confluent spindle cells)
    cell_thickness: float  # optical thickness of the cytoplasm at the cell centre (rad)
    nucleus_thickness: float  # extra optical thickness of the nucleus (rad)


CELL_TYPES = {
    # large, spread, sparse epithelial-like cells with round nuclei
    "flat": CellType("flat", 20, 26.0, 9.5, 1.1, 30.0, 1.25, 0.18, False, 0.35, 1.1),
    # small, elongated, densely packed fibroblast-like cells with small oval nuclei
    "dense": CellType("dense", 80, 14.0, 6.0, 1.7, 16.0, 2.2, 0.10, True, 0.6, 0.9),
}


N_HARMONICS = 3  # boundary harmonics m = 2, 3, 4


def place_cells(rng: np.random.Generator, size: int, n: int, min_distance: float) -> np.ndarray:
    """Up to n centres (y, x) uniformly in the image, at least min_distance apart (dart throwing;
    returns fewer when the field is full)."""
    candidates = rng.uniform(0, size, size=(max(8 * n, 1), 2))
    accepted = np.empty((n, 2))
    count = 0
    for c in candidates:
        if count == n:
            break
        if count == 0 or np.min(np.sum((accepted[:count] - c) ** 2, axis=1)) >= min_distance**2:
            accepted[count] = c
            count += 1
    return accepted[:count]


@dataclass
class Cells:
    """Per-cell shape and stain parameters (arrays over cells)."""

    nucleus_yx: np.ndarray  # (n, 2)
    nucleus_axes: np.ndarray  # (n, 2) semi-axes a >= b, px
    nucleus_angle: np.ndarray
    nucleus_harmonics: np.ndarray  # (n, N_HARMONICS, 2): amplitude, phase
    cell_yx: np.ndarray
    cell_axes: np.ndarray
    cell_angle: np.ndarray
    cell_harmonics: np.ndarray
    pyknotic: np.ndarray  # bool
    dna_level: np.ndarray
    texture_amplitude: np.ndarray
    cyto_level: np.ndarray
    damage_background: np.ndarray
    cell_thickness: np.ndarray  # rad
    nucleus_thickness: np.ndarray  # rad

    def __len__(self) -> int:
        return len(self.nucleus_yx)


def draw_cells(rng: np.random.Generator, cell_type: CellType, phenotype: Phenotype,
               size: int) -> Cells:
    """Draw the cells of one site: number, positions, shapes and stain levels."""
    ct, ph = cell_type, phenotype
    mean_count = ct.cells_per_site * (size / 256) ** 2 * ph.density
    spacing = ct.min_spacing * math.sqrt(max(ph.nucleus_area, 1.0))
    centres = place_cells(rng, size, int(rng.poisson(mean_count)), spacing)
    n = len(centres)
    pyknotic = rng.random(n) < ph.pyknotic_fraction

    def axes(radius, aspect):
        return np.stack([radius * np.sqrt(aspect), radius / np.sqrt(aspect)], axis=1)

    def harmonics(amplitude):
        amp = amplitude * rng.uniform(0, 1, (n, N_HARMONICS)) / np.arange(2, 2 + N_HARMONICS)
        return np.stack([amp, rng.uniform(0, 2 * np.pi, (n, N_HARMONICS))], axis=2)

    # nuclei: G2 cells (20%) are 1.3x larger with 1.6x the DNA
    g2 = rng.random(n) < 0.2
    nuc_radius = (ct.nucleus_radius * math.sqrt(ph.nucleus_area) * np.where(g2, 1.14, 1.0)
                  * rng.lognormal(0, 0.1, n))
    nuc_aspect = 1 + (ct.nucleus_aspect - 1) * ph.nucleus_elongation * rng.uniform(0.6, 1.4, n)
    cell_radius = ct.cell_radius * math.sqrt(ph.cell_area) * rng.lognormal(0, 0.15, n)
    cell_aspect = 1 + (ct.cell_aspect - 1) * ph.cell_elongation * rng.uniform(0.6, 1.4, n)
    if ct.aligned:  # confluent spindle cells align with their neighbours
        cell_angle = rng.uniform(0, np.pi) + rng.normal(0, 0.3, n)
    else:
        cell_angle = rng.uniform(0, np.pi, n)
    nucleus_angle = cell_angle + rng.normal(0, 0.2 if ct.aligned else 1.0, n)
    dna_level = ph.dna_intensity * np.where(g2, 1.6, 1.0) * rng.lognormal(0, 0.12, n)
    texture = np.full(n, BASE_TEXTURE * ph.chromatin_texture)
    cyto_level = 0.5 * ph.cyto_intensity * rng.lognormal(0, 0.15, n)
    damage_background = np.full(n, 0.08)
    cell_thickness = ct.cell_thickness * rng.lognormal(0, 0.1, n)
    nucleus_thickness = ct.nucleus_thickness * rng.lognormal(0, 0.1, n)

    # apoptotic (pyknotic) cells: small round bright condensed nuclei, shrunken round thick cells,
    # pan-nuclear DNA-damage signal
    nuc_radius = np.where(pyknotic, 0.55 * ct.nucleus_radius * rng.uniform(0.8, 1.1, n),
                          nuc_radius)
    nuc_aspect = np.where(pyknotic, 1.05, nuc_aspect)
    cell_radius = np.where(pyknotic, 0.55 * ct.cell_radius * rng.uniform(0.8, 1.1, n),
                           cell_radius)
    cell_aspect = np.where(pyknotic, 1.1, cell_aspect)
    dna_level = np.where(pyknotic, 2.5 * dna_level, dna_level)
    texture = np.where(pyknotic, 0.05, texture)
    damage_background = np.where(pyknotic, 0.6, damage_background)
    cell_thickness = np.where(pyknotic, 2.0 * cell_thickness, cell_thickness)
    nucleus_thickness = np.where(pyknotic, 1.6 * nucleus_thickness, nucleus_thickness)

    nucleus_axes = axes(nuc_radius, nuc_aspect)
    cell_axes = axes(cell_radius, cell_aspect)
    # the nucleus sits off the cell centre, but inside it (room = minor cell minus major nucleus)
    room = np.clip(cell_axes[:, 1] - nucleus_axes[:, 0], 0, None)
    shift = room * rng.uniform(0, 0.5, n)
    direction = rng.uniform(0, 2 * np.pi, n)
    cell_yx = centres + np.stack([shift * np.sin(direction), shift * np.cos(direction)], axis=1)
    return Cells(centres, nucleus_axes, nucleus_angle, harmonics(0.05), cell_yx, cell_axes,
                 cell_angle, harmonics(ct.cell_irregularity), pyknotic, dna_level, texture,
                 cyto_level, damage_background, cell_thickness, nucleus_thickness)


def _shape_distance(yy, xx, centre, axes, angle, harmonics) -> np.ndarray:
    """Shape-normalised distance: < 1 inside a (wavy-rimmed) ellipse, 1 on its rim."""
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    u = (c * dx + s * dy) / axes[0]
    v = (-s * dx + c * dy) / axes[1]
    theta = np.arctan2(v, u)
    scale = np.ones_like(theta)
    for m, (amplitude, phase) in enumerate(harmonics, start=2):
        scale += amplitude * np.cos(m * theta + phase)
    return np.hypot(u, v) / scale


def _box(centre, axes, harmonics, size) -> tuple[slice, slice]:
    reach = axes[0] * (1 + np.abs(harmonics[:, 0]).sum()) + 1
    y0, y1 = max(int(centre[0] - reach), 0), min(int(centre[0] + reach) + 2, size)
    x0, x1 = max(int(centre[1] - reach), 0), min(int(centre[1] + reach) + 2, size)
    return slice(y0, y1), slice(x0, x1)


@dataclass
class Labels:
    nuclei: np.ndarray  # uint16 instance labels
    cells: np.ndarray  # uint16, cell k contains nucleus k
    nucleus_radius: np.ndarray  # float32 shape-normalised distance inside nuclei (0 centre, 1 rim)
    cell_radius: np.ndarray  # float32 same for cell bodies
    kept: np.ndarray  # index into Cells of label 1, 2, ...


def _compete(shapes, size) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel goes to the shape with the smallest normalised distance, if that is < 1."""
    best = np.full((size, size), np.inf, dtype=np.float32)
    label = np.zeros((size, size), dtype=np.int32)
    for k, (centre, axes, angle, harmonics) in enumerate(shapes):
        sy, sx = _box(centre, axes, harmonics, size)
        if sy.start >= sy.stop or sx.start >= sx.stop:
            continue
        yy, xx = np.mgrid[sy, sx].astype(np.float32)
        d = _shape_distance(yy, xx, centre, axes, angle, harmonics)
        win = (d < 1) & (d < best[sy, sx])
        best[sy, sx][win] = d[win]
        label[sy, sx][win] = k + 1
    return label, best


def label_cells(cells: Cells, size: int) -> Labels:
    """Instance labels of nuclei and cell bodies (distance-limited Voronoi growth)."""
    n = len(cells)
    nuclei, nuc_r = _compete(zip(cells.nucleus_yx, cells.nucleus_axes, cells.nucleus_angle,
                                 cells.nucleus_harmonics, strict=True), size)
    bodies, cell_r = _compete(zip(cells.cell_yx, cells.cell_axes, cells.cell_angle,
                                  cells.cell_harmonics, strict=True), size)
    in_nucleus = nuclei > 0
    bodies[in_nucleus] = nuclei[in_nucleus]  # a nucleus always belongs to its own cell
    cell_r[in_nucleus] = np.minimum(cell_r[in_nucleus], 0.9)
    # keep only the part of each cell body that is connected to its nucleus
    for k in range(1, n + 1):
        sy, sx = _box(cells.cell_yx[k - 1], cells.cell_axes[k - 1], cells.cell_harmonics[k - 1],
                      size)
        region = bodies[sy, sx] == k
        parts, n_parts = ndimage.label(region)
        if n_parts > 1:
            own = np.unique(parts[nuclei[sy, sx] == k])
            bodies[sy, sx][region & ~np.isin(parts, own[own > 0])] = 0
    # consecutive ids 1..m for the nuclei that are visible; cells without a nucleus vanish
    present = np.flatnonzero(np.bincount(nuclei.ravel(), minlength=n + 1)[1:]) + 1
    lut = np.zeros(n + 1, dtype=np.uint16)
    lut[present] = np.arange(1, len(present) + 1)
    nuclei, bodies = lut[nuclei], lut[bodies]
    nuc_r = np.where(nuclei > 0, nuc_r, 1).astype(np.float32)
    cell_r = np.where(bodies > 0, np.minimum(cell_r, 1), 1).astype(np.float32)
    return Labels(nuclei, bodies, nuc_r, cell_r, present - 1)


def per_label(values: np.ndarray, labels: Labels, which: np.ndarray) -> np.ndarray:
    """Per-pixel value of a per-cell parameter (0 on background)."""
    lut = np.zeros(len(labels.kept) + 1, dtype=np.float32)
    lut[1:] = values[labels.kept]
    return lut[which]

