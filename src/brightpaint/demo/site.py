"""One site of the demo screen: its cell scene, clean images, brightfield z-stack and camera images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .brightfield import absorption_map, defocus_series, optical_thickness
from .camera import add_noise, plate_optics
from .cells import CELL_TYPES, Labels, draw_cells, label_cells
from .fluorescence import (
    FLUORESCENCE_PSF,
    bandpass_texture,
    render_cell_bodies,
    render_foci,
    render_nuclei,
    render_nucleoli,
)
from .seeds import seed_entropy
from .spec import BRIGHTFIELD, FLUORESCENCE, ScreenSpec
from .treatments import screen_well_phenotype

FOCUS_JITTER = 0.2  # the true focus lies within +-0.2 planes of the recorded focal plane


@dataclass
class Site:
    """Everything generated for one site (clean, noisy and truth)."""

    plate: str
    well: str
    site: int
    focal_plane: int
    focus_position: float
    labels: Labels
    clean: dict[str, np.ndarray]  # DNA, CYTO, DAMAGE, BF (in focus), float32
    phase: np.ndarray
    absorption: np.ndarray
    brightfield_clean: np.ndarray  # (z, y, x) float32 before illumination and noise
    images: dict[tuple[str, int], np.ndarray]  # (channel, z) -> uint16
    foci_counts: np.ndarray
    pyknotic: np.ndarray  # per label 1..m


def simulate_site(spec: ScreenSpec, plate: str, well: str, site: int,
                  fluorescence: bool = True) -> Site:
    """Render one site. `fluorescence=False` skips the noisy fluorescence images (apply plates);
    the clean images and truth are the same either way."""
    plate_spec = next(p for p in spec.plates if p.plate == plate)
    cell_type = CELL_TYPES[plate_spec.cell_type]
    phenotype, _ = screen_well_phenotype(spec, plate, well)
    scene_seq, noise_seq = np.random.SeedSequence(seed_entropy(spec.seed, "site", plate, well, site)
                                                  ).spawn(2)
    rng = np.random.default_rng(scene_seq)
    size = spec.size
    cells = draw_cells(rng, cell_type, phenotype, size)
    labels = label_cells(cells, size)
    dna_texture = bandpass_texture(rng, size, 0.7, 2.5)
    cyto_texture = bandpass_texture(rng, size, 1.5, 6.0)
    nucleoli = render_nucleoli(rng, cells, labels)
    dna = render_nuclei(cells, labels, dna_texture, nucleoli)
    cyto = render_cell_bodies(cells, labels, cyto_texture)
    damage, foci_counts = render_foci(rng, cells, labels, phenotype.foci_rate)
    dna, cyto, damage = (ndimage.gaussian_filter(image, FLUORESCENCE_PSF)
                         for image in (dna, cyto, damage))
    phase = optical_thickness(cells, labels, nucleoli)
    absorption = absorption_map(rng, labels, phase, dna_texture, nucleoli) * np.float32(
        plate_spec.bf_absorption)
    focal_plane = int(rng.integers(1, spec.z_planes - 1))  # >= 1 plane on each side of focus
    focus_position = focal_plane + float(rng.uniform(-FOCUS_JITTER, FOCUS_JITTER))
    # the z planes plus the exact focus (dz = 0) in one pass over the Fourier transforms
    planes = defocus_series(absorption, phase,
                            [z - focus_position for z in range(spec.z_planes)] + [0.0])
    if plate_spec.bf_contrast != 1.0:
        planes = 1.0 + np.float32(plate_spec.bf_contrast) * (planes - 1.0)
    stack = planes[:-1]
    clean = {"DNA": dna, "CYTO": cyto, "DAMAGE": damage, "BF": planes[-1]}

    optics = plate_optics(spec, plate)
    noise = np.random.default_rng(noise_seq)
    images = {(BRIGHTFIELD, z): add_noise(noise, stack[z], optics[BRIGHTFIELD])
              for z in range(spec.z_planes)}
    if fluorescence:
        for ch in FLUORESCENCE:
            images[(ch, 0)] = add_noise(noise, clean[ch], optics[ch])
    return Site(plate, well, site, focal_plane, focus_position, labels, clean, phase, absorption,
                stack, images, foci_counts, cells.pyknotic[labels.kept])
