"""Public paired data the virtual-staining tests and study train and score on: the
`sephace-bf-zstack-dapi` set (two 40x fields, a brightfield z-stack and DAPI of the same cells; its
layout: `tiff/<field>_fine_*-Z<um>.tif` at focus -10 / 0 / +10 um, `tiff/<field>_init_*-Z<um>.tif`
the wider -25 / +25 um planes, `tiff/<field>_fl.tif` the DAPI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

SEPHACE_FIELDS = ("Set1", "Set2")
_CROP = (slice(0, 1024), slice(0, 1344))  # the fields' common size


def _stage_z(path: Path) -> float:
    return float(path.stem.split("-Z")[1])


def sephace_field(folder: str | Path, field: str, half_width: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One field at half resolution: (brightfield planes, DAPI) as float32, the planes (focus +- 10
    um; with `half_width` 2 also +- 25 um) scaled by the focus plane's mean and SD, the DAPI by its
    median and 99.5th percentile. Halved because at 40x a 128 px training patch would hold a
    fraction of a nucleus; at half size it holds whole ones, as at 20x."""
    tiff = Path(folder) / "tiff"
    planes = sorted(tiff.glob(f"{field}_fine_*.tif"), key=_stage_z)
    if half_width == 2:
        wide = sorted(tiff.glob(f"{field}_init_*.tif"), key=_stage_z)
        planes = [wide[0], *planes, wide[-1]]
    elif half_width != 1:
        raise ValueError(f"the sephace fields have focus +- 1 or +- 2 planes, not +- {half_width}")
    if len(planes) != 2 * half_width + 1:
        raise FileNotFoundError(f"{tiff}: {len(planes)} brightfield planes of field {field}, "
                                f"expected {2 * half_width + 1}")
    stack = np.stack([tifffile.imread(p).astype(np.float32)[_CROP] for p in planes])
    focus = stack[half_width]
    dapi = tifffile.imread(tiff / f"{field}_fl.tif").astype(np.float32)[_CROP]
    median, high = np.quantile(dapi, [0.5, 0.995])
    inputs = ndimage.zoom((stack - focus.mean()) / focus.std(), (1, 0.5, 0.5), order=1)
    dapi = ndimage.zoom((dapi - median) / (high - median), 0.5, order=1)
    return inputs.astype(np.float32), dapi.astype(np.float32)
