"""The demo screen's specification: channels, plates (batch, cell type, role) and screen size."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from numbers import Integral

from ..io import PLATE_COLUMNS, PLATE_ROWS, ROLES

BRIGHTFIELD = "BF"
FLUORESCENCE = ("DNA", "CYTO", "DAMAGE")
CHANNELS = (BRIGHTFIELD, *FLUORESCENCE)
CELL_TYPE_NAMES = ("flat", "dense")  # parameters in cells.CELL_TYPES
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
    # the cells' brightfield absorption relative to the demo's (granules, membranes, chromatin); the
    # phase (optical thickness) is unchanged. Below ~0.3 the cells are phase objects, as thin
    # cultured cells are at 20x: the focal plane has the least contrast of the stack.
    bf_absorption: float = 1.0
    # the stains' uniform background (autofluorescence, unbound dye) relative to the demo's; 0: the
    # stains sit at the camera offset outside cells, as clean or sparse stains do
    stain_background: float = 1.0

    def __post_init__(self):
        if not isinstance(self.bf_contrast, int | float) or not 0 < self.bf_contrast <= 10:
            raise ValueError(f"bf_contrast: {self.bf_contrast!r} of plate {self.plate} must be a "
                             "number in (0, 10]")
        for name in ("bf_absorption", "stain_background"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 10:
                raise ValueError(f"{name}: {value!r} of plate {self.plate} must be a number in [0, 10]")
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
