"""Seeded synthetic high-throughput screen (the "demo screen") in the input contract, with truth.

Physical model of one site (every number is recorded in the truth files):

* Cells: seeds are dart-thrown at a density set by cell type and treatment. Nuclei are ellipses
  with a wavy rim; cell bodies grow from them by a distance-limited Voronoi competition in each
  cell's own shape-normalised distance, so cell k always contains nucleus k (same label id).
* Fluorescence (clean, arbitrary units ~0..1): DNA = nuclear thickness profile x band-pass
  chromatin texture, darker nucleoli; CYTO = cell-body dome; DAMAGE = dim nuclear background +
  Poisson(rate) diffraction-limited foci per nucleus (rate set by the MoA); each seen through the
  widefield PSF (Gaussian, FLUORESCENCE_PSF px), so zero outside objects but for that blur.
* Brightfield: cells are thin, nearly transparent phase objects. Following the transport-of-
  intensity approximation, the intensity at defocus dz (in planes) is
      I(dz) = G_s * [1 - A - kappa * dz * Laplacian(phi)],   s^2 = s0^2 + (beta * dz)^2
  with A a weak, sharp absorption map (membranes, granules, nuclear envelope, nucleoli, chromatin)
  and phi a smooth optical-thickness map (cell dome, denser nucleus, nucleoli). Contrast inverts
  through focus; fine detail exists only near focus, so variance-of-Laplacian peaks there while
  the (larger, blurred) phase contrast peaks off focus, as on real data.
* Acquisition, per plate and channel: ADU = Poisson(gain * (clean + background) * flat * batch)
  + N(0, read^2) + dark, rounded and clipped to uint16. `background` is a uniform
  autofluorescence / unbound-dye level (fluorescence only, not in the clean truth), lit by the same
  field as the cells; `flat` is a smooth off-centre vignetting field (mean 1, corner/centre
  0.6-0.8); `batch` is a per-batch, per-channel multiplicative factor; `dark` is the camera's
  offset (DARK_OFFSET, the same for every plate and channel: one camera). The fluorescence is dim
  (tens of photons per clean unit, a short HTS exposure), so its shot noise is what Noise2Void is
  for.

Every random draw comes from a numpy SeedSequence keyed by (seed, plate, well, site) (or by plate,
batch, channel for plate-level fields), so output is byte-identical for any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage

from .io import MANIFEST_COLUMNS, PLATE_COLUMNS, PLATE_ROWS, PLATEMAP_COLUMNS, ROLES, SHEET_COLUMNS

# ---------------------------------------------------------------------------------------------
# Screen specification
# ---------------------------------------------------------------------------------------------

BRIGHTFIELD = "BF"
FLUORESCENCE = ("DNA", "CYTO", "DAMAGE")
CHANNELS = (BRIGHTFIELD, *FLUORESCENCE)
CELL_TYPE_NAMES = ("flat", "dense")  # parameters in CELL_TYPES below
MAX_WELLS = len(PLATE_ROWS) * PLATE_COLUMNS
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # usable as a folder name


@dataclass(frozen=True)
class PlateSpec:
    plate: str
    batch: str
    cell_type: str
    role: str  # "train" (real stains), "apply" (brightfield only) or "both"
    # brightfield contrast relative to the demo's optics (another condenser aperture or objective):
    # the in-focus transmission's deviation from 1 is scaled by it. Tests use it for a plate
    # outside the stain model's domain.
    bf_contrast: float = 1.0

    def __post_init__(self):
        if not isinstance(self.bf_contrast, int | float) or not 0 < self.bf_contrast <= 10:
            raise ValueError(f"bf_contrast: {self.bf_contrast!r} of plate {self.plate} must be a "
                             "number in (0, 10]")
        for name in ("plate", "batch"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _SAFE_ID.match(value):
                raise ValueError(f"{name}: {value!r} must be a non-empty id of letters, digits, "
                                 "'_', '-', '.' (it names folders)")
        if self.cell_type not in CELL_TYPE_NAMES:
            raise ValueError(f"cell_type: {self.cell_type!r} of plate {self.plate} is not one of "
                             f"{CELL_TYPE_NAMES}")
        if self.role not in ROLES:
            raise ValueError(f"role: {self.role!r} of plate {self.plate} is not one of {ROLES}")


DEFAULT_PLATES = (
    PlateSpec("P1", "B1", "flat", "train"),
    PlateSpec("P2", "B1", "dense", "train"),
    PlateSpec("P3", "B2", "flat", "both"),
    PlateSpec("P4", "B2", "dense", "apply"),
)


@dataclass(frozen=True)
class ScreenSpec:
    plates: tuple[PlateSpec, ...] = DEFAULT_PLATES
    wells: int = 24  # wells per plate, 1..384 (384 = a full plate)
    sites: int = 2  # sites per well
    size: int = 256  # image height = width in px
    z_planes: int = 5  # brightfield planes per site
    seed: int = 0

    def __post_init__(self):
        plates = self.plates
        if isinstance(plates, PlateSpec) or not isinstance(plates, tuple | list):
            raise ValueError("plates: must be a sequence of PlateSpec")
        plates = tuple(PlateSpec(**p) if isinstance(p, dict) else p for p in plates)
        if not plates or not all(isinstance(p, PlateSpec) for p in plates):
            raise ValueError("plates: must be a non-empty sequence of PlateSpec")
        ids = [p.plate for p in plates]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"plates: duplicated plate id(s) {duplicated}")
        object.__setattr__(self, "plates", plates)
        limits = {"wells": (1, MAX_WELLS), "sites": (1, None), "size": (64, None),
                  "z_planes": (5, None), "seed": (0, None)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise ValueError(f"{name}: must be an integer, got {value!r}")
            if value < low or (high is not None and value > high):
                bound = f"{low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"{name}: {value} is out of range (must be {bound})")
            object.__setattr__(self, name, int(value))


def spec_from_config(cfg: dict) -> ScreenSpec:
    """ScreenSpec from a config mapping (keys as ScreenSpec fields; missing keys -> defaults)."""
    cfg = dict(cfg or {})
    known = {f.name for f in fields(ScreenSpec)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; known: {sorted(known)}")
    if "plates" in cfg:
        plates = cfg["plates"]
        if not isinstance(plates, list | tuple):
            raise ValueError("plates: must be a list of {plate, batch, cell_type, role}")
        parsed = []
        for i, entry in enumerate(plates):
            if isinstance(entry, PlateSpec):
                parsed.append(entry)
                continue
            keys = {"plate", "batch", "cell_type", "role"}
            if not isinstance(entry, dict) or not keys <= set(entry) <= keys | {"bf_contrast"}:
                raise ValueError(f"plates[{i}]: needs the keys {sorted(keys)} (and optionally "
                                 f"bf_contrast), got {entry!r}")
            parsed.append(PlateSpec(**{k: v if k == "bf_contrast" else str(v) for k, v in entry.items()}))
        cfg["plates"] = tuple(parsed)
    return ScreenSpec(**cfg)


def screen_layout(spec: ScreenSpec) -> dict[str, dict[str, str]]:
    """Plate -> manifest and plate-map paths, relative to the screen folder (sheet: plates.tsv)."""
    return {p.plate: {"manifest": f"{p.plate}/manifest.csv",
                      "platemap": f"{p.plate}/platemap.csv"} for p in spec.plates}


# ---------------------------------------------------------------------------------------------
# Biology: cell types, compounds, phenotypes
# ---------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Compound:
    name: str
    moa: str
    target: str
    doses: tuple[float, ...]  # uM, increasing
    potency: float  # scales the MoA effect (compounds of one MoA are not identical)
    toxic_doses: tuple[float, ...] = ()


# Per-MoA phenotype at full effect: multiplicative factors on the cell type's untreated values
# (elongation factors scale `aspect - 1`). The effect at a dose is factor ** (potency * level)
# with level 0.5 (low dose) or 1.0 (high dose).
MOA_EFFECTS = {
    # DNA double-strand breaks -> gamma-H2AX foci, G2 arrest -> larger nuclei and cells
    "topoisomerase inhibitor": {"foci_rate": 12.0, "nucleus_area": 1.4, "cell_area": 1.2,
                                "density": 0.8},
    # mitotic arrest -> rounded small cells, condensed bright textured chromatin
    "tubulin polymerization inhibitor": {"cell_area": 0.45, "cell_elongation": 0.3,
                                         "nucleus_area": 0.75, "nucleus_elongation": 0.5,
                                         "dna_intensity": 1.5, "chromatin_texture": 2.2},
    # chromatin decondensation -> larger, dimmer, smoother nuclei
    "HDAC inhibitor": {"nucleus_area": 1.3, "chromatin_texture": 0.35, "dna_intensity": 0.75,
                       "cyto_intensity": 1.3, "foci_rate": 2.0},
    # G1 arrest -> no proliferation (fewer cells) that keep growing (large flat cells)
    "CDK inhibitor": {"density": 0.5, "cell_area": 1.7, "nucleus_area": 1.15,
                      "cyto_intensity": 0.8},
    # positive control: pan-kinase inhibition, apoptosis
    "protein kinase inhibitor": {"density": 0.6, "cell_area": 0.6, "foci_rate": 2.0},
}
COMPOUNDS = (
    Compound("etoposide", "topoisomerase inhibitor", "TOP2A", (1.0, 10.0), 1.0),
    Compound("camptothecin", "topoisomerase inhibitor", "TOP1", (0.1, 1.0), 1.1, (1.0,)),
    Compound("nocodazole", "tubulin polymerization inhibitor", "TUBB", (0.1, 1.0), 1.0),
    Compound("colchicine", "tubulin polymerization inhibitor", "TUBB", (0.03, 0.3), 0.9, (0.3,)),
    Compound("vorinostat", "HDAC inhibitor", "HDAC1", (1.0, 10.0), 0.9),
    Compound("trichostatin A", "HDAC inhibitor", "HDAC1", (0.03, 0.3), 1.0),
    Compound("palbociclib", "CDK inhibitor", "CDK4", (0.3, 3.0), 1.0),
    Compound("abemaciclib", "CDK inhibitor", "CDK6", (0.3, 3.0), 1.1),
)
POSITIVE_CONTROL = Compound("staurosporine", "protein kinase inhibitor", "PRKCA", (1.0,), 1.0,
                            (1.0,))
NEGATIVE_CONTROL = "DMSO"
DOSE_LEVELS = (0.5, 1.0)  # effect level of the low and high dose
TOXIC_DENSITY = 0.45  # surviving fraction of cells in a toxic well
TOXIC_PYKNOTIC = 0.35  # fraction of pyknotic (apoptotic) cells in a toxic well
BASE_FOCI_RATE = 0.4  # mean DAMAGE foci per untreated nucleus
BASE_TEXTURE = 0.25  # chromatin texture amplitude of untreated nuclei
WELL_JITTER = 0.03  # log-sd of well-to-well biological variation of each factor

# The 24-well block (4 rows x 6 columns of the chosen wells, row-major): D = DMSO, P = poscon,
# T = the next treatment. Controls are spread over the block, not bunched in a corner.
_BLOCK = "DTTTPT" "TTDTTD" "TDTTTT" "TPTDTD"


def _treatment_order() -> list[tuple[Compound, int]]:
    """The 16 treatments in block order: low doses first, MoAs interleaved."""
    by_moa: dict[str, list[Compound]] = {}
    for c in COMPOUNDS:
        by_moa.setdefault(c.moa, []).append(c)
    order = []
    for dose_index in range(len(DOSE_LEVELS)):
        for compound_index in range(2):
            for moa_compounds in by_moa.values():
                order.append((moa_compounds[compound_index], dose_index))
    return order


def plate_wells(n_wells: int) -> list[str]:
    """The n wells used on every plate: an evenly spaced rows x columns sub-grid of the 384 plate
    (24 wells -> rows C, G, K, O x columns 03, 07, 11, 15, 19, 23), row-major, first n."""
    if not 1 <= n_wells <= MAX_WELLS:
        raise ValueError(f"wells: {n_wells} is out of range (must be 1..{MAX_WELLS})")
    n_rows = min(len(PLATE_ROWS), math.ceil(math.sqrt(n_wells * 2 / 3)))
    n_cols = math.ceil(n_wells / n_rows)
    rows = [int((i + 0.5) * len(PLATE_ROWS) / n_rows) for i in range(n_rows)]
    cols = [int((j + 0.5) * PLATE_COLUMNS / n_cols) for j in range(n_cols)]
    wells = [f"{PLATE_ROWS[r]}{c + 1:02d}" for r in rows for c in cols]
    return wells[:n_wells]


def plate_map(n_wells: int) -> pd.DataFrame:
    """The plate map (identical on every plate) plus a `dose_level` column (0 for DMSO, 0.5 low,
    1 high dose). Well i takes block slot (i + 5 * (i // 24)) % 24, so replicate blocks on larger
    plates are rotated and controls do not line up in columns."""
    treatments = _treatment_order()
    block = []
    t = 0
    for slot in _BLOCK:
        if slot == "D":
            block.append((NEGATIVE_CONTROL, 0.0, "negcon", "", "", 0.0))
        elif slot == "P":
            c = POSITIVE_CONTROL
            block.append((c.name, c.doses[0], "poscon", c.moa, c.target, DOSE_LEVELS[-1]))
        else:
            c, dose_index = treatments[t]
            t += 1
            block.append((c.name, c.doses[dose_index], "trt", c.moa, c.target,
                          DOSE_LEVELS[dose_index]))
    rows = []
    for i, well in enumerate(plate_wells(n_wells)):
        slot = (i + 5 * (i // len(block))) % len(block)
        rows.append((well, *block[slot]))
    df = pd.DataFrame(rows, columns=[*PLATEMAP_COLUMNS, "dose_level"])
    return df


def _compound(name: str) -> Compound | None:
    for c in (*COMPOUNDS, POSITIVE_CONTROL):
        if c.name == name:
            return c
    return None


@dataclass(frozen=True)
class Phenotype:
    """Per-well phenotype parameters (factors relative to the cell type's untreated values)."""

    density: float = 1.0
    nucleus_area: float = 1.0
    nucleus_elongation: float = 1.0
    cell_area: float = 1.0
    cell_elongation: float = 1.0
    dna_intensity: float = 1.0
    chromatin_texture: float = 1.0
    cyto_intensity: float = 1.0
    foci_rate: float = BASE_FOCI_RATE  # absolute: mean foci per (non-pyknotic) nucleus
    pyknotic_fraction: float = 0.0
    toxic: bool = False


def well_phenotype(perturbation: str, dose: float, dose_level: float,
                   rng: np.random.Generator | None = None) -> Phenotype:
    """Phenotype of a well from its treatment; `rng` adds small well-to-well variation."""
    factors = {f.name: 1.0 for f in fields(Phenotype) if f.name not in ("pyknotic_fraction",
                                                                          "toxic")}
    compound = _compound(perturbation)
    toxic = False
    if compound is not None:
        strength = compound.potency * dose_level
        for name, full in MOA_EFFECTS[compound.moa].items():
            factors[name] = full ** strength
        toxic = any(math.isclose(dose, d) for d in compound.toxic_doses)
    if rng is not None:
        for name in ("density", "nucleus_area", "cell_area", "dna_intensity", "cyto_intensity",
                     "chromatin_texture", "foci_rate"):
            factors[name] *= float(np.exp(rng.normal(0.0, WELL_JITTER)))
    if toxic:
        factors["density"] *= TOXIC_DENSITY
    pyknotic = TOXIC_PYKNOTIC if toxic else 0.0
    if compound is POSITIVE_CONTROL:
        pyknotic = 0.6
    factors["foci_rate"] *= BASE_FOCI_RATE
    return Phenotype(**factors, pyknotic_fraction=pyknotic, toxic=toxic)


# ---------------------------------------------------------------------------------------------
# Acquisition: illumination, batch, noise
# ---------------------------------------------------------------------------------------------

# photons per clean unit, read noise (ADU), uniform background (clean units: autofluorescence
# and unbound dye) per channel, and the camera's offset (ADU). Fluorescence at 1/8 of a bright
# exposure: noisy input (DNA ~30 dB, CYTO ~21 dB PSNR) on which Noise2Void gains ~10 dB
# (tests/test_denoise.py).
GAIN = {"BF": 3000.0, "DNA": 100.0, "CYTO": 62.5, "DAMAGE": 75.0}
READ_NOISE = {"BF": 4.0, "DNA": 3.0, "CYTO": 3.0, "DAMAGE": 3.0}
BACKGROUND = {"BF": 0.0, "DNA": 0.3, "CYTO": 0.3, "DAMAGE": 0.3}
DARK_OFFSET = 100.0
FLUORESCENCE_PSF = 1.0  # px, Gaussian sigma of the widefield fluorescence PSF


def _key(*parts) -> list[int]:
    """Stable 32-bit integers for SeedSequence entropy (str hash() is salted per process)."""
    out = []
    for part in parts:
        if isinstance(part, Integral):
            out.append(int(part))
        else:
            out.append(int.from_bytes(hashlib.sha256(str(part).encode()).digest()[:4], "little"))
    return out


def _rng(seed: int, *parts) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(_key(seed, *parts)))


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
    rng = _rng(seed, "batch", batch)
    return {ch: float(np.exp(rng.uniform(math.log(0.8), math.log(1.25)))) for ch in CHANNELS}


@lru_cache(maxsize=16)
def plate_optics(spec: ScreenSpec, plate: str) -> dict[str, ChannelOptics]:
    """Illumination, dark offset, gain and batch factor of every channel of a plate."""
    plate_spec = next(p for p in spec.plates if p.plate == plate)
    batch = batch_factors(spec.seed, plate_spec.batch)
    optics = {}
    for ch in CHANNELS:
        rng = _rng(spec.seed, "illumination", plate, ch)
        centre = (0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12))
        ratio = rng.uniform(0.6, 0.8)
        tilt = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))
        flat = flat_field(spec.size, centre, ratio, tilt)
        flat.setflags(write=False)  # cached and shared: nobody may change the truth in place
        optics[ch] = ChannelOptics(flat, DARK_OFFSET, GAIN[ch], READ_NOISE[ch], BACKGROUND[ch],
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


# ---------------------------------------------------------------------------------------------
# Geometry: cells and labels
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Rendering: clean fluorescence, optical thickness, absorption, brightfield
# ---------------------------------------------------------------------------------------------


def bandpass_texture(rng: np.random.Generator, size: int, fine: float, coarse: float
                     ) -> np.ndarray:
    """Unit-variance band-pass noise (difference of Gaussians of white noise)."""
    white = rng.standard_normal((size, size), dtype=np.float32)
    texture = ndimage.gaussian_filter(white, fine) - ndimage.gaussian_filter(white, coarse)
    return texture / (texture.std() + 1e-12)


def _per_label(values: np.ndarray, labels: Labels, which: np.ndarray) -> np.ndarray:
    """Per-pixel value of a per-cell parameter (0 on background)."""
    lut = np.zeros(len(labels.kept) + 1, dtype=np.float32)
    lut[1:] = values[labels.kept]
    return lut[which]


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
    level = _per_label(cells.dna_level, labels, labels.nuclei)
    amplitude = _per_label(cells.texture_amplitude, labels, labels.nuclei)
    dna = level * profile * (1 + amplitude * texture) * (1 - 0.6 * nucleoli)
    return np.clip(dna, 0, None).astype(np.float32)


def render_cell_bodies(cells: Cells, labels: Labels, texture: np.ndarray) -> np.ndarray:
    """Clean CYTO stain: dome over the cell body (thicker centre), dimmer over the nucleus."""
    inside = labels.cells > 0
    profile = 0.3 + 0.7 * np.sqrt(np.clip(1 - labels.cell_radius**2, 0, 1))
    level = _per_label(cells.cyto_level, labels, labels.cells)
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
    background = _per_label(cells.damage_background, labels, labels.nuclei) * profile
    damage = np.where(inside, background + foci, 0)
    return damage.astype(np.float32), counts


def optical_thickness(cells: Cells, labels: Labels, nucleoli: np.ndarray) -> np.ndarray:
    """Phase map (rad): cytoplasm dome + denser nucleus + nucleoli, smoothed by the optics."""
    cell_dome = np.sqrt(np.clip(1 - labels.cell_radius**2, 0, 1))
    nucleus_dome = np.sqrt(np.clip(1 - labels.nucleus_radius**2, 0, 1))
    phase = (_per_label(cells.cell_thickness, labels, labels.cells) * cell_dome
             + _per_label(cells.nucleus_thickness, labels, labels.nuclei) * nucleus_dome
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


# ---------------------------------------------------------------------------------------------
# One site
# ---------------------------------------------------------------------------------------------

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


def _well_phenotype(spec: ScreenSpec, plate: str, well: str) -> tuple[Phenotype, pd.Series]:
    row = _plate_map_cached(spec.wells).set_index("well").loc[well]
    rng = _rng(spec.seed, "well", plate, well)
    return well_phenotype(row.perturbation, float(row.dose), float(row.dose_level), rng), row


@lru_cache(maxsize=4)
def _plate_map_cached(n_wells: int) -> pd.DataFrame:
    return plate_map(n_wells)


def simulate_site(spec: ScreenSpec, plate: str, well: str, site: int,
                  fluorescence: bool = True) -> Site:
    """Render one site. `fluorescence=False` skips the noisy fluorescence images (apply plates);
    the clean images and truth are the same either way."""
    plate_spec = next(p for p in spec.plates if p.plate == plate)
    cell_type = CELL_TYPES[plate_spec.cell_type]
    phenotype, _ = _well_phenotype(spec, plate, well)
    scene_seq, noise_seq = np.random.SeedSequence(_key(spec.seed, "site", plate, well, site)
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
    absorption = absorption_map(rng, labels, phase, dna_texture, nucleoli)
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


# ---------------------------------------------------------------------------------------------
# Writing the screen
# ---------------------------------------------------------------------------------------------


def _image_name(well: str, site: int, channel: str, z: int) -> str:
    return f"images/{well}_s{site}_{channel}_z{z:02d}.tif"


def _write_tiff(path: Path, image: np.ndarray, compress: bool = False) -> None:
    # no datetime/software tags vary between runs, so identical arrays give identical bytes
    if compress:
        tifffile.imwrite(path, image, compression="zlib", compressionargs={"level": 1})
    else:
        tifffile.imwrite(path, image)


def _write_well(outdir: str, spec: ScreenSpec, plate: str, well: str) -> tuple[list, list]:
    """Render and write all sites of one well; returns the site and cell truth rows."""
    plate_spec = next(p for p in spec.plates if p.plate == plate)
    with_fluorescence = plate_spec.role != "apply"
    plate_dir = Path(outdir) / plate
    truth_dir = Path(outdir) / "truth" / plate
    site_rows, cell_rows = [], []
    for site in range(1, spec.sites + 1):
        s = simulate_site(spec, plate, well, site, fluorescence=with_fluorescence)
        for (channel, z), image in s.images.items():
            _write_tiff(plate_dir / _image_name(well, site, channel, z), image)
        for channel, image in s.clean.items():
            _write_tiff(truth_dir / "clean" / f"{well}_s{site}_{channel}.tif", image, True)
        _write_tiff(truth_dir / "masks" / f"{well}_s{site}_nuclei.tif", s.labels.nuclei, True)
        _write_tiff(truth_dir / "masks" / f"{well}_s{site}_cells.tif", s.labels.cells, True)
        m = len(s.labels.kept)
        nucleus_area = np.bincount(s.labels.nuclei.ravel(), minlength=m + 1)[1:]
        cell_area = np.bincount(s.labels.cells.ravel(), minlength=m + 1)[1:]
        centroids = ndimage.center_of_mass(np.ones_like(s.labels.nuclei), s.labels.nuclei,
                                           np.arange(1, m + 1)) if m else []
        site_rows.append({
            "well": well, "site": site, "focal_plane": s.focal_plane,
            "focus_position": round(s.focus_position, 4),
            "focus_offset": round(s.focus_position - s.focal_plane, 4),
            "n_cells": m, "n_pyknotic": int(s.pyknotic.sum()),
            "mean_nucleus_area": float(nucleus_area.mean()) if m else 0.0,
            "mean_cell_area": float(cell_area.mean()) if m else 0.0,
            "mean_foci": float(s.foci_counts[1:].mean()) if m else 0.0,
        })
        for i in range(m):
            cell_rows.append((well, site, i + 1, round(centroids[i][0], 2),
                              round(centroids[i][1], 2), int(nucleus_area[i]), int(cell_area[i]),
                              int(s.foci_counts[i + 1]), bool(s.pyknotic[i])))
    return site_rows, cell_rows


def _write_well_task(args):
    return _write_well(*args)


def _write_table(df: pd.DataFrame, path: Path, sep: str = ",") -> None:
    """Write-then-rename, so a reader never sees half a table."""
    partial = path.with_name(f".{path.name}.partial")
    df.to_csv(partial, sep=sep, index=False, float_format="%.6g", lineterminator="\n")
    os.replace(partial, path)


TRUTH_FILES = {
    "screen.json": "this file: the spec, seed, channel list, acquisition model, cell types, "
                   "compounds/MoAs/targets and a description of every truth file",
    "{plate}/sites.csv": "per site: focal_plane (integer brightfield plane nearest the true "
                         "focus, never the first or last), focus_position (true focus in plane "
                         "units), focus_offset, n_cells, n_pyknotic, mean_nucleus_area, "
                         "mean_cell_area (px, from the masks), mean_foci (DAMAGE foci per nucleus)",
    "{plate}/cells.csv": "per cell: well, site, label (id in both masks), nucleus centroid y/x, "
                         "nucleus_area, cell_area (px), n_foci, pyknotic",
    "{plate}/platemap_truth.csv": "plate map + dose_level (0.5 low, 1 high), toxic flag, the "
                                  "phenotype parameters used per well (pheno_*: factors relative "
                                  "to the untreated cell type; pheno_foci_rate = mean foci per "
                                  "nucleus, pheno_pyknotic_fraction), batch, cell_type and the "
                                  "per-channel batch factors (batch_factor_*)",
    "{plate}/illumination.json": "per channel: dark offset (ADU), gain (photons per clean "
                                 "unit), read noise (ADU), background (clean units), batch "
                                 "factor, flat-field centre and corner/centre ratio; ADU = "
                                 "Poisson(gain*(clean+background)*flat*batch) + "
                                 "N(0, read_noise^2) + dark, rounded, clipped to uint16",
    "{plate}/flatfield_{channel}.npy": "float32, mean 1: the exact multiplicative illumination "
                                       "field applied to that channel (all channels, all plates)",
    "{plate}/clean/{well}_s{site}_{channel}.tif": "float32 clean image before background, "
                                                  "illumination, batch and noise (DNA, CYTO, "
                                                  "DAMAGE, through the PSF; BF = "
                                                  "exactly in focus, background 1); zlib TIFF",
    "{plate}/masks/{well}_s{site}_nuclei.tif": "uint16 nucleus instance labels (0 background)",
    "{plate}/masks/{well}_s{site}_cells.tif": "uint16 cell instance labels; cell k contains "
                                              "nucleus k",
}


def simulate_screen(outdir: str | os.PathLike, spec: ScreenSpec | None = None,
                    workers: int = 1) -> Path:
    """Write the demo screen (images, manifests, plate maps, truth) under `outdir` and return the
    path of its screen sheet, `outdir/plates.tsv`, which is written last."""
    spec = spec if spec is not None else ScreenSpec()
    if not isinstance(spec, ScreenSpec):
        raise ValueError("spec: must be a ScreenSpec (see spec_from_config)")
    if isinstance(workers, bool) or not isinstance(workers, Integral) or workers < 1:
        raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sheet = outdir / "plates.tsv"
    if sheet.exists():  # a crash below must not leave an old sheet pointing at new files
        sheet.unlink()

    layout = screen_layout(spec)
    wells = plate_wells(spec.wells)
    pmap = plate_map(spec.wells)
    for p in spec.plates:
        for sub in (outdir / p.plate / "images", outdir / "truth" / p.plate / "clean",
                    outdir / "truth" / p.plate / "masks"):
            sub.mkdir(parents=True, exist_ok=True)

    tasks = [(str(outdir), spec, p.plate, w) for p in spec.plates for w in wells]
    if workers == 1 or len(tasks) == 1:
        results = [_write_well_task(t) for t in tasks]
    else:
        # fork where the OS has it: workers start fast and callers need no __main__ guard.
        # Every draw is keyed by (seed, plate, well, site), so the process count cannot change
        # the output.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            chunk = max(1, len(tasks) // (8 * workers))
            results = list(pool.map(_write_well_task, tasks, chunksize=chunk))

    cell_columns = ["well", "site", "label", "nucleus_y", "nucleus_x", "nucleus_area",
                    "cell_area", "n_foci", "pyknotic"]
    for i, p in enumerate(spec.plates):
        plate_results = results[i * len(wells):(i + 1) * len(wells)]
        plate_dir, truth_dir = outdir / p.plate, outdir / "truth" / p.plate
        channels = CHANNELS if p.role != "apply" else (BRIGHTFIELD,)
        manifest = [(p.plate, w, s, ch, z, _image_name(w, s, ch, z))
                    for w in wells for s in range(1, spec.sites + 1) for ch in channels
                    for z in (range(spec.z_planes) if ch == BRIGHTFIELD else (0,))]
        _write_table(pd.DataFrame(manifest, columns=MANIFEST_COLUMNS),
                     plate_dir / "manifest.csv")
        _write_table(pmap[PLATEMAP_COLUMNS], plate_dir / "platemap.csv")

        optics = plate_optics(spec, p.plate)
        truth_rows = []
        for w in wells:
            ph, row = _well_phenotype(spec, p.plate, w)
            phenotype = {f"pheno_{k}": v for k, v in asdict(ph).items() if k != "toxic"}
            truth_rows.append({**row.to_dict(), "well": w, "toxic": ph.toxic, **phenotype,
                               "batch": p.batch,
                               "cell_type": p.cell_type,
                               **{f"batch_factor_{ch}": optics[ch].batch_factor
                                  for ch in CHANNELS}})
        truth = pd.DataFrame(truth_rows)
        truth = truth[["well", *[c for c in truth.columns if c != "well"]]]
        _write_table(truth, truth_dir / "platemap_truth.csv")
        _write_table(pd.DataFrame([r for sites, _ in plate_results for r in sites]),
                     truth_dir / "sites.csv")
        _write_table(pd.DataFrame([r for _, cells in plate_results for r in cells],
                                  columns=cell_columns), truth_dir / "cells.csv")
        illumination = {}
        for ch, o in optics.items():
            np.save(truth_dir / f"flatfield_{ch}.npy", o.flat)
            illumination[ch] = {"dark_offset": o.dark, "gain": o.gain,
                                "read_noise": o.read_noise, "background": o.background,
                                "batch_factor": o.batch_factor,
                                "flatfield": f"flatfield_{ch}.npy",
                                "optical_centre_yx": [round(c, 4) for c in o.centre],
                                "corner_centre_ratio": round(o.corner_ratio, 4)}
        (truth_dir / "illumination.json").write_text(json.dumps(
            {"model": TRUTH_FILES["{plate}/illumination.json"], "channels": illumination},
            indent=2) + "\n")

    screen = {
        "spec": asdict(spec),
        "seed": spec.seed,
        "channels": {"brightfield": BRIGHTFIELD, "fluorescence": list(FLUORESCENCE)},
        "wells": wells,
        "dose_unit": "uM",
        "fluorescence": {"psf_sigma_px": FLUORESCENCE_PSF},
        "brightfield": {"psf_sigma_px": PSF_SIGMA, "defocus_blur_px_per_plane": DEFOCUS_BLUR,
                        "phase_contrast_kappa": PHASE_CONTRAST, "focus_jitter": FOCUS_JITTER},
        "cell_types": {k: asdict(v) for k, v in CELL_TYPES.items()},
        "compounds": [asdict(c) for c in (*COMPOUNDS, POSITIVE_CONTROL)],
        "moa_effects": MOA_EFFECTS,
        "truth_files": TRUTH_FILES,
    }
    (outdir / "truth" / "screen.json").write_text(json.dumps(screen, indent=2) + "\n")

    rows = [(p.plate, layout[p.plate]["manifest"], layout[p.plate]["platemap"], p.batch,
             p.cell_type, p.role) for p in spec.plates]
    _write_table(pd.DataFrame(rows, columns=SHEET_COLUMNS), sheet, sep="\t")
    return sheet


def describe_screen(outdir: str | os.PathLike, n_plates: int, wells: int = MAX_WELLS, sites: int = 9,
                    z_planes: int = 5, fluorescence: tuple[str, ...] = ("DNA", "CYTO", "DAMAGE"),
                    brightfield: str = "BF", train_every: int = 10) -> Path:
    """A screen's description without pixels: sheet, manifests and plate maps of `n_plates` plates
    (every `train_every`-th has fluorescence and role train, the others apply), for planning a
    workflow of that size (`snakemake -n`) without writing one image. Returns the sheet's path."""
    out = Path(outdir)
    platemap = plate_map(wells).drop(columns="dose_level")
    well_ids = list(platemap["well"])
    rows = []
    for i in range(n_plates):
        plate = f"S{i + 1:03d}"
        role = "train" if i % train_every == 0 else "apply"
        channels = [(brightfield, z) for z in range(z_planes)]
        if role == "train":
            channels += [(channel, 0) for channel in fluorescence]
        manifest = pd.DataFrame(
            [(plate, well, site, channel, z, f"images/{well}_s{site}_{channel}_z{z:02d}.tif")
             for well in well_ids for site in range(1, sites + 1) for channel, z in channels],
            columns=["plate", "well", "site", "channel", "z", "path"])
        (out / plate).mkdir(parents=True, exist_ok=True)
        manifest.to_csv(out / plate / "manifest.csv", index=False)
        platemap.to_csv(out / plate / "platemap.csv", index=False)
        rows.append((plate, f"{plate}/manifest.csv", f"{plate}/platemap.csv", f"B{i // 10 + 1}",
                     "flat", role))
    sheet = out / "plates.tsv"
    pd.DataFrame(rows, columns=["plate", "manifest", "platemap", "batch", "cell_type", "role"]).to_csv(
        sheet, sep="\t", index=False)
    return sheet
