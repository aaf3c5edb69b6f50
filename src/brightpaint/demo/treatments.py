"""The demo screen's biology per well: compounds, mechanisms of action, doses and phenotypes,
and the plate layout (used wells and plate map, identical on every plate)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
import pandas as pd

from ..io import PLATE_COLUMNS, PLATE_ROWS, PLATEMAP_COLUMNS
from .seeds import keyed_rng
from .spec import MAX_WELLS, ScreenSpec


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


def screen_well_phenotype(spec: ScreenSpec, plate: str, well: str) -> tuple[Phenotype, pd.Series]:
    """Phenotype (with its well-to-well variation) and plate-map row of a well of a screen."""
    row = _plate_map_cached(spec.wells).set_index("well").loc[well]
    rng = keyed_rng(spec.seed, "well", plate, well)
    return well_phenotype(row.perturbation, float(row.dose), float(row.dose_level), rng), row


@lru_cache(maxsize=4)
def _plate_map_cached(n_wells: int) -> pd.DataFrame:
    return plate_map(n_wells)
