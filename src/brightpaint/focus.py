"""In-focus plane selection and blur QC for brightfield z-stacks.

Why several scores: brightfield cells are nearly transparent phase objects. Off focus they show large
phase halos (contrast inverts through focus), so measures of plain contrast such as the normalised
variance peak on a DEFOCUSED plane. Where the cells also absorb (stained, thick or granular cells, 40x
optics), their fine detail still peaks at focus; where they are thin phase objects (cultured cells
at 20x, JUMP's Phenix brightfield), the focal plane has the LEAST contrast of every kind, fine detail
included, and every sharpness score ranks it lowest. Every score is kept in the table, so a plate can
be re-decided without re-reading its images.

The default chooser, ``contrast_inversion`` (`inversion_plane`), uses what both kinds share: in the
transport-of-intensity picture the phase term of the intensity is odd in defocus, I(dz) ~ A - dz
laplace(phi), so the planes on either side of focus show mirror-image halos. The focus is an interior
plane whose two neighbours' band-passed detail (`DETAIL_BAND`) is anti-correlated (flank correlation
<= -`MIN_ANTICORRELATION`) and whose own band energy is a local minimum (the contrast dip between
the flanking halo maxima). Where no plane is so flanked (absorption-dominated stacks, widely spaced
planes, stacks that do not bracket focus), it takes the sharpest plane by ``var_laplacian``. Measured
(`bench/focus_kinds.py`), exact-plane rate on 24 generated sites per row (demo scenes of both cell
types, its camera noise, true focus within +-0.2 planes of a plane) and on the real stacks:

| stack (planes 1 apart; 3 planes: -1 / 0 / +2)         | var_laplacian | plls   | contrast_inversion |
|--------------------------------------------------------|---------------|--------|--------------------|
| demo optics (absorbing + phase), 3 / 5 / 13 planes     | 100 %         | 100 %  | 100 %              |
| absorption x 0.3, 3 / 5 / 13 planes                    | 42-46 %       | 100 %  | 100 %              |
| absorption x 0.1 or x 0 (phase objects), 3 / 5 / 13    | 0 %           | 100 %  | 100 %              |
| no phase term (a pure absorber), 3 / 5 / 13 planes     | 100 %         | 100 %  | 100 % (fallback)   |
| real: sephace 40x triplets (+-10, +-25 um)             | 4 of 4        | 4 of 4 | 4 of 4 (fallback)  |
| real: JUMP Phenix 20x (-4 / 0 / +7 um)                 | wrong (+7)    | wrong  | right (0 um)       |

PLLS's perfect generated rows rest on the generator: its phase-object focal plane is almost pure
camera noise, whose flat spectrum PLLS takes for sharpness; on the real JUMP field PLLS is wrong too.

A stack whose focus is its first or last plane has no flanked plane: it falls back to the sharpest
plane, right for absorbing cells (100 %, 46 % at absorption x 0.3) and the wrong end for phase objects
(0-4 %); such sites are flagged ``not_bracketed`` either way.

Scores, one per plane (`focus_scores`); higher = sharper for all four (`DIRECTIONS`):

* ``var_laplacian``: variance of the Laplacian of the Gaussian-smoothed plane (sigma 0.5 px, see
  `LAPLACIAN_SIGMA`: the suggested sigma ~1 picks a phase-halo plane on half of the demo's dense
  sites). The default chooser's fallback: right on all demo sites with cells and on absorbing real
  brightfield (4 of 4 sephace triplets, where normalised variance is wrong on 4 of 4), wrong on
  phase-dominant stacks (JUMP), where it ranks the focal plane lowest.
* ``plls``: power-spectrum log-log slope: slope of log(radially averaged power) against log(spatial
  frequency) over a band in cycles per pixel (`PLLS_BAND`, 0.01-0.2). Its direction is NOT
  universal. Measured here (demo: 24-48 sites per setting at 128, 256 and 512 px; sephace: 4
  triplets at full size and 2x / 4x binned):

  - band 0.01-0.2 (low and mid frequencies): the in-focus plane has the SHALLOWEST (least negative)
    slope on demo and real data alike (every site, every binning) - the direction of the HTS QC
    literature, and the one used here.
  - bands above ~0.15 (where defocused planes are white noise, slope ~ 0): the in-focus plane has
    the MOST negative slope on both, as only it still carries structure falling into the noise
    floor. That rests on the noise, and fails on 4x binned real data.
  - mid band 0.05-0.2 alone: the data sets DISAGREE (demo: in focus shallowest; real 40x data, whose
    optics cut off below its pixels' Nyquist frequency: in focus most negative).

  So the band must reach down to where phase halos live and stay below the frequency at which
  defocused planes hit the noise floor; check it on new optics before relying on ``plls``.
* ``norm_variance``: variance / mean: plain contrast, which on brightfield peaks on a defocused plane
  (kept as the documented wrong answer and for fluorescence-like data).
* ``tenengrad``: mean squared Sobel gradient magnitude of the raw plane (within +-1 plane on the
  demo, exact on real data; noise and halos pull it off the exact plane on the demo).

Blur QC (`blur_qc`): a site is flagged ``not_bracketed`` when the chosen plane is the first or last
of the stack (focus may lie outside it), and ``out_of_focus`` when a plane chosen as the sharpest is
no sharper than the stack's typical plane: its `prominence` (PLLS of the chosen plane minus the
stack's median PLLS, `focus_prominence`) is below `min_prominence`. A plane chosen by contrast
inversion is bracketed by mirror-image halos, which a stack with no plane in focus does not show
(its planes all lie on one side of focus, their detail correlates positively): its prominence is
that anti-correlation (minus the flank correlation, >= `MIN_ANTICORRELATION`), and the row's
``basis`` says which rule chose the plane. A flat profile means no plane is in focus (or
an empty field); a chosen plane that PLLS ranks low means the chooser and PLLS disagree - both worth
a look. Blank (constant) planes and planes with NaN / infinite pixels are flagged and never chosen;
a stack of one plane is flagged "single plane: cannot choose".

Planes in the plate table (`plate_focus`) are the store's z indices of the brightfield channel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.fft
from scipy import ndimage

from .ingest import StoreLayout, read_field, stored_sites
from .io import PLATE_ROWS, well_row_column

METHODS = ("var_laplacian", "plls", "norm_variance", "tenengrad")  # sharpness scores, one per plane
# per plane too, but from the plane's neighbours: the evidence of the contrast-inversion chooser
INVERSION_SCORES = ("band_energy", "flank_correlation")
SCORE_COLUMNS = (*METHODS, *INVERSION_SCORES)  # the columns of `focus_scores`
INVERSION = "contrast_inversion"
CHOOSERS = (INVERSION, *METHODS)
DEFAULT_METHOD = INVERSION
# the sharpness score a contrast-inversion chooser falls back to where no plane is flanked by halos
FALLBACK_METHOD = "var_laplacian"
# px, (fine, coarse) Gaussian sigmas of the band-pass in which halos are compared. Phase halos of
# planes +-1 fill it on the demo (2 px of blur per plane), at 20x (JUMP, 0.6 um pixels) and at 40x
# (sephace): the study's results are the same for (1, 8), (1, 4), (0.7, 5) and (2, 16) on the real
# stacks.
DETAIL_BAND = (1.0, 8.0)
# Planes either side of a phase-object focus: -0.9 (demo optics), -0.54 (JUMP, -4 / +7 um), -0.34
# (sephace +-10 um); planes on one side of focus, or blurred copies of one absorbing image: > 0.
MIN_ANTICORRELATION = 0.2
# +1: a higher score means sharper; -1: a lower one does. PLLS: see the module docstring.
DIRECTIONS = {"var_laplacian": 1, "plls": 1, "norm_variance": 1, "tenengrad": 1}
# Scores that are positive ratios of energies: their prominence is measured in log units, so it does
# not depend on brightness, gain or image size. PLLS is already a log-log slope.
LOG_SCORES = {"var_laplacian", "norm_variance", "tenengrad"}
# px. Small on purpose: the demo's in-focus detail is at the pixel scale (as in 20x HTS imaging)
# while the phase halos of planes +-1 fill the band a wider filter passes. Exact-plane rate on 336
# demo sites with cells (128 and 256 px): sigma 0.5 100 %, 0.6 98.5 %, 0.7 94 %, 1.0 ~50 % (dense
# cells); real 40x data (sephace) is right at every sigma 0 - 1.5, with a wider margin at larger ones.
LAPLACIAN_SIGMA = 0.5
PLLS_BAND = (0.01, 0.2)  # cycles per pixel
# Blur QC is judged by PLLS whatever chooses the plane: its prominence separates stacks with a
# plane in focus from defocused-only ones by a wide margin (demo sites with cells >= 0.33, real
# triplets 0.24-1.24; stacks whose planes are all 2.5-4 planes off focus <= 0.08), while the energy
# scores' ratios are squeezed by the noise floor on sparse sites (demo >= 0.003 vs defocused 0.03).
QC_METHOD = "plls"
MIN_PROMINENCE = 0.15  # PLLS slope units

TABLE_COLUMNS = ["well", "site", "plane", "window", "method", "basis", "prominence", "flag", "reason"]


# ---------------------------------------------------------------------------------------------
# Scores of one plane
# ---------------------------------------------------------------------------------------------


def var_laplacian(plane: np.ndarray, sigma: float = LAPLACIAN_SIGMA) -> float:
    """Variance of the Laplacian of the Gaussian-smoothed plane: energy of fine detail, which only
    the in-focus plane has. Smoothing first, then the exact zero-sum 5-point Laplacian: scipy's
    `gaussian_laplace` kernel does not sum to zero at small sigma (-0.56 at sigma 0.5), which
    leaks plain contrast (highest off focus on brightfield) into the score."""
    data = np.asarray(plane, dtype=np.float32)
    smooth = ndimage.gaussian_filter(data, sigma) if sigma > 0 else data
    return float(ndimage.laplace(smooth).var(dtype=np.float64))


def normalised_variance(plane: np.ndarray) -> float:
    """Variance / mean: overall contrast independent of brightness (wrong on brightfield, where
    phase halos make defocused planes more contrasted; kept as a reference)."""
    data = np.asarray(plane, dtype=np.float64)
    mean = data.mean()
    return float(data.var() / mean) if mean != 0 else math.nan


def tenengrad(plane: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude: edge energy, higher when edges are sharp."""
    data = np.asarray(plane, dtype=np.float32)
    gy, gx = ndimage.sobel(data, 0), ndimage.sobel(data, 1)
    np.square(gy, out=gy)
    gy += np.square(gx, out=gx)
    return float(gy.mean(dtype=np.float64))


def radial_power_spectrum(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (cycles per pixel) and the power averaged over rings of that frequency,
    DC left out. Rings are 1/min(h, w) wide so non-square images are binned like square ones."""
    data = np.asarray(plane, dtype=np.float32)
    data = data - data.mean(dtype=np.float64)
    power = np.abs(scipy.fft.rfft2(data)) ** 2
    h, w = data.shape
    step = 1.0 / min(h, w)
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    ring = np.rint(radius / step).astype(np.int64).ravel()
    n_rings = min(h, w) // 2 + 1  # up to Nyquist along the shorter side
    keep = ring < n_rings
    total = np.bincount(ring[keep], power.ravel()[keep], n_rings)
    count = np.bincount(ring[keep], minlength=n_rings)
    return np.arange(1, n_rings) * step, total[1:] / np.maximum(count[1:], 1)


def plls(plane: np.ndarray, band: tuple[float, float] = PLLS_BAND) -> float:
    """Power-spectrum log-log slope over `band` (cycles per pixel); NaN when the plane has no
    power (blank) or the band holds fewer than 3 frequency rings (image too small)."""
    frequency, power = radial_power_spectrum(plane)
    use = (frequency >= band[0]) & (frequency <= band[1]) & (power > 0)
    if use.sum() < 3:
        return math.nan
    return float(np.polyfit(np.log(frequency[use]), np.log(power[use]), 1)[0])


SCORERS = {"var_laplacian": var_laplacian, "plls": plls, "norm_variance": normalised_variance,
           "tenengrad": tenengrad}


def band_detail(plane: np.ndarray, band: tuple[float, float] = DETAIL_BAND) -> np.ndarray:
    """The plane's detail between the two scales of `band` (difference of Gaussians), relative to
    its mean brightness, so planes of one stack compare whatever the exposure."""
    data = np.asarray(plane, dtype=np.float32)
    mean = float(data.mean(dtype=np.float64))
    detail = ndimage.gaussian_filter(data, band[0]) - ndimage.gaussian_filter(data, band[1])
    return detail / mean if mean > 0 else np.full_like(detail, np.nan)


def _correlation(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return math.nan
    a, b = a - a.mean(dtype=np.float64), b - b.mean(dtype=np.float64)
    norm = math.sqrt(float(np.vdot(a, a)) * float(np.vdot(b, b)))
    return float(np.vdot(a, b)) / norm if norm > 0 else math.nan


def inversion_scores(stack: np.ndarray, band: tuple[float, float] = DETAIL_BAND) -> pd.DataFrame:
    """Per plane: ``band_energy`` (variance of `band_detail`) and ``flank_correlation`` (correlation
    of the detail of the planes either side; NaN for the first and last plane, or where a
    neighbour is blank or has non-finite pixels). Three planes' detail in memory at a time."""
    stack = check_stack(stack)
    n = stack.shape[0]
    bad = set(nonfinite_planes(stack)) | set(blank_planes(stack))

    def detail(z: int) -> np.ndarray | None:
        return None if z in bad else band_detail(stack[z], band)

    energy, flank = np.full(n, math.nan), np.full(n, math.nan)
    previous, current = None, detail(0)
    for z in range(n):
        following = detail(z + 1) if z + 1 < n else None
        if current is not None:
            energy[z] = float(current.var(dtype=np.float64))
        if 0 < z < n - 1:
            flank[z] = _correlation(previous, following)
        previous, current = current, following
    return pd.DataFrame({"band_energy": energy, "flank_correlation": flank},
                        index=pd.RangeIndex(n, name="plane"))


# ---------------------------------------------------------------------------------------------
# Scores of a stack and the choice
# ---------------------------------------------------------------------------------------------


def check_stack(stack: np.ndarray) -> np.ndarray:
    """The stack as a (z, y, x) array, or a ValueError that says what is wrong with it."""
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"focus: expected a z-stack of shape (z, y, x), got shape {stack.shape}")
    if stack.shape[0] == 0 or stack.shape[1] < 3 or stack.shape[2] < 3:
        raise ValueError(f"focus: empty or too small z-stack of shape {stack.shape}")
    if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
        raise ValueError(f"focus: z-stack must hold numbers, got dtype {stack.dtype}")
    return stack


def nonfinite_planes(stack: np.ndarray) -> list[int]:
    """Planes with NaN or infinite pixels (only float stacks can have them)."""
    if not np.issubdtype(stack.dtype, np.floating):
        return []
    return [z for z in range(stack.shape[0]) if not np.isfinite(stack[z]).all()]


def blank_planes(stack: np.ndarray) -> list[int]:
    """Constant planes (all zero, or any one value): nothing to score, e.g. a missed exposure."""
    return [z for z in range(stack.shape[0])
            if np.isfinite(stack[z]).all() and stack[z].min() == stack[z].max()]


def focus_scores(stack: np.ndarray, methods: Sequence[str] = METHODS) -> pd.DataFrame:
    """One row per plane (index = plane index in the stack), one column per score method, then the
    `INVERSION_SCORES`. Planes with non-finite pixels score NaN everywhere (a NaN would otherwise
    poison the filters); blank planes keep their (zero or NaN) scores and are excluded by
    `usable_scores`."""
    stack = check_stack(stack)
    unknown = [m for m in methods if m not in SCORERS]
    if unknown:
        raise ValueError(f"focus: unknown score method(s) {unknown}; known: {list(METHODS)}")
    bad = set(nonfinite_planes(stack))
    rows = []
    for z in range(stack.shape[0]):
        plane = stack[z]
        rows.append({m: math.nan if z in bad else SCORERS[m](plane) for m in methods})
    scores = pd.DataFrame(rows, index=pd.RangeIndex(stack.shape[0], name="plane"), columns=list(methods))
    return pd.concat([scores, inversion_scores(stack)], axis=1)


def _method_scores(scores: pd.DataFrame | Mapping[str, Sequence[float]] | Sequence[float],
                   method: str) -> np.ndarray:
    if method not in DIRECTIONS and method not in INVERSION_SCORES:
        raise ValueError(f"focus: unknown method {method!r}; known: {list(METHODS)}")
    if isinstance(scores, pd.DataFrame | Mapping):
        if method not in scores:
            raise ValueError(f"focus: scores have no column {method!r} (have {list(scores.keys())})")
        values = scores[method]
    else:
        values = scores
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"focus: expected one {method} score per plane, got shape {values.shape}")
    return values


def inversion_plane(scores: pd.DataFrame | Mapping[str, Sequence[float]],
                    min_anticorrelation: float = MIN_ANTICORRELATION) -> int | None:
    """The plane about which brightfield contrast inverts: of the planes whose neighbours' detail
    is anti-correlated (flank correlation <= -`min_anticorrelation`) and whose band energy is no
    higher than either neighbour's, the most anti-correlated one; None when no plane is so flanked."""
    energy = _method_scores(scores, "band_energy")
    flank = _method_scores(scores, "flank_correlation")
    candidates = [z for z in range(1, len(flank) - 1)
                  if flank[z] <= -min_anticorrelation
                  and energy[z] <= energy[z - 1] and energy[z] <= energy[z + 1]]
    return min(candidates, key=lambda z: flank[z]) if candidates else None


def choose_focus_plane(scores: pd.DataFrame | Mapping[str, Sequence[float]] | Sequence[float],
                       method: str = DEFAULT_METHOD) -> tuple[int, str]:
    """The chosen plane and the rule that chose it (its `basis`): for ``contrast_inversion`` the
    `inversion_plane`, or else the sharpest plane by `FALLBACK_METHOD`; for a sharpness score, the
    sharpest plane by it (each method's direction is in `DIRECTIONS`). NaN scores (unusable planes)
    are skipped; a ValueError when no plane has a finite score. `scores`: the table of
    `focus_scores`, a mapping method -> scores, or (sharpness scores only) the method's scores alone."""
    if method not in CHOOSERS:
        raise ValueError(f"focus: unknown method {method!r}; known: {list(CHOOSERS)}")
    if method == INVERSION:
        plane = inversion_plane(scores)
        if plane is not None:
            return plane, INVERSION
        method = FALLBACK_METHOD
    values = DIRECTIONS[method] * _method_scores(scores, method)
    if not np.isfinite(values).any():
        raise ValueError(f"focus: no plane has a finite {method} score (blank or NaN planes)")
    return int(np.nanargmax(np.where(np.isfinite(values), values, np.nan))), method


def select_focus_plane(scores: pd.DataFrame | Mapping[str, Sequence[float]] | Sequence[float],
                       method: str = DEFAULT_METHOD) -> int:
    """Index of the chosen plane by `method` (see `choose_focus_plane`)."""
    return choose_focus_plane(scores, method)[0]


def focus_prominence(scores: pd.DataFrame | Mapping[str, Sequence[float]] | Sequence[float],
                     plane: int | None = None, method: str = QC_METHOD) -> float:
    """How far `plane` (default: the best plane by `method`) stands out: its score minus the median
    score of the stack's usable planes, in `method`'s sharper direction; after log for the
    positive energy scores (0.1 = 10 % above the median, whatever the brightness), in slope units
    for PLLS. A flat profile (every plane equally blurred) gives ~0. NaN with < 2 usable planes or
    when `plane` has no usable score."""
    values = _method_scores(scores, method)
    if method in LOG_SCORES:
        values = np.log(np.where(values > 0, values, math.nan))
    values = DIRECTIONS[method] * values
    if plane is None:
        if not np.isfinite(values).any():
            return math.nan
        plane = int(np.nanargmax(np.where(np.isfinite(values), values, np.nan)))
    usable = values[np.isfinite(values)]
    if usable.size < 2 or not np.isfinite(values[plane]):
        return math.nan
    return float(values[plane] - np.median(usable))


def focus_window(plane: int, n_planes: int, half_width: int) -> list[int]:
    """Planes plane-half_width .. plane+half_width (2*half_width+1 of them) as input channels for
    virtual staining. At the stack's edges the edge plane is repeated rather than the window
    shifted, so channel k always means "focus + (k - half_width)" and the centre is the focus."""
    if n_planes < 1:
        raise ValueError(f"focus: a stack needs at least one plane, got n_planes={n_planes}")
    if not 0 <= plane < n_planes:
        raise ValueError(f"focus: plane {plane} is outside the stack's planes 0..{n_planes - 1}")
    if half_width < 0:
        raise ValueError(f"focus: half_width must be >= 0, got {half_width}")
    return [min(max(plane + k, 0), n_planes - 1) for k in range(-half_width, half_width + 1)]


def format_window(planes: Sequence[int]) -> str:
    """Window as text "1,2,3": one string column stores in parquet and CSV alike."""
    return ",".join(str(int(p)) for p in planes)


def parse_window(text: str) -> list[int]:
    """The planes of a window column value ("" = no plane could be chosen)."""
    return [int(p) for p in str(text).split(",") if p.strip()]


# ---------------------------------------------------------------------------------------------
# Blur QC
# ---------------------------------------------------------------------------------------------


@dataclass
class SiteFocus:
    """The decision for one stack: plane index (-1 if none could be chosen), QC flags and reasons."""

    plane: int
    window: list[int]
    prominence: float
    scores: pd.DataFrame
    flags: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    basis: str = ""  # the rule that chose the plane: contrast_inversion or a sharpness score

    @property
    def flag(self) -> str:
        return ";".join(self.flags)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def usable_scores(scores: pd.DataFrame, unusable: Sequence[int]) -> pd.DataFrame:
    """Scores with the unusable planes (blank, non-finite) set to NaN, so no chooser can pick one."""
    scores = scores.copy()
    if len(unusable):
        scores.loc[list(unusable), :] = math.nan
    return scores


def blur_qc(scores: pd.DataFrame, plane: int, min_prominence: float = MIN_PROMINENCE,
            basis: str = FALLBACK_METHOD) -> tuple[float, list[str], list[str]]:
    """Prominence of the chosen plane, flags and human-readable reasons: the stack does not bracket
    focus (chosen plane first or last: focus may lie outside the stack), or a plane chosen as the
    sharpest is no sharper than the stack's typical plane (`QC_METHOD` prominence <
    `min_prominence`). A plane chosen by contrast inversion (`basis`) is flanked by mirror-image
    halos, the evidence of a bracketed focus: its prominence is that anti-correlation."""
    n_planes = len(scores)
    flags, reasons = [], []
    if basis == INVERSION:
        return -float(scores["flank_correlation"].iloc[plane]), flags, reasons
    if plane in (0, n_planes - 1):
        side = "first" if plane == 0 else "last"
        flags.append("not_bracketed")
        reasons.append(f"stack does not bracket focus: best plane {plane} is the {side} of {n_planes} "
                       "(focus may lie outside the stack)")
    prominence = focus_prominence(scores, plane, QC_METHOD)
    if not math.isnan(prominence) and prominence < min_prominence:
        flags.append("out_of_focus")
        reasons.append(f"still out of focus: the chosen plane's {QC_METHOD} is only {prominence:.3f} "
                       f"above the stack's median (< {min_prominence:g}): no plane is sharp (blurred "
                       f"stack or empty field), or the chooser took a plane {QC_METHOD} ranks low")
    return prominence, flags, reasons


def assess_stack(stack: np.ndarray, method: str = DEFAULT_METHOD, half_width: int = 1,
                 min_prominence: float = MIN_PROMINENCE) -> SiteFocus:
    """Scores, chosen plane, window and QC flags for one z-stack. Problems of the input (one plane,
    blank or NaN planes) become flags, not exceptions, so one bad site never stops a plate; only a
    stack that is not (z, y, x) numbers raises."""
    if method not in CHOOSERS:
        raise ValueError(f"focus: unknown method {method!r}; known: {list(CHOOSERS)}")
    stack = check_stack(stack)
    n_planes = stack.shape[0]
    scores = focus_scores(stack)
    flags, reasons = [], []
    nonfinite, blank = nonfinite_planes(stack), blank_planes(stack)
    if nonfinite:
        flags.append("nonfinite")
        reasons.append(f"NaN or infinite pixels in plane(s) {nonfinite}: not scored")
    if blank:
        flags.append("blank")
        reasons.append(f"blank plane(s) {blank} (constant value): not scored")
    usable = usable_scores(scores, sorted(set(nonfinite) | set(blank)))
    sharpness = FALLBACK_METHOD if method == INVERSION else method
    if not np.isfinite(usable[sharpness].to_numpy()).any():
        flags.append("no_plane")
        reasons.append(f"no plane has a usable {sharpness} score: cannot choose")
        return SiteFocus(-1, [], math.nan, scores, flags, reasons)
    plane, basis = choose_focus_plane(usable, method)
    window = focus_window(plane, n_planes, half_width)
    if n_planes == 1:
        flags.append("single_plane")
        reasons.append("single plane: cannot choose (the stack has one plane)")
        return SiteFocus(plane, window, math.nan, scores, flags, reasons, basis)
    prominence, qc_flags, qc_reasons = blur_qc(usable, plane, min_prominence, basis)
    return SiteFocus(plane, window, prominence, scores, flags + qc_flags, reasons + qc_reasons, basis)


# ---------------------------------------------------------------------------------------------
# A plate in an OME-Zarr store
# ---------------------------------------------------------------------------------------------


def brightfield_channel(layout: StoreLayout) -> tuple[int, list[int]]:
    """Channel index and z planes of the plate's brightfield channel (role "brightfield")."""
    names = [c for c, role in layout.roles.items() if role == "brightfield"]
    if not names:
        raise ValueError(f"plate {layout.plate}: no channel has the role 'brightfield' "
                         f"(roles: {layout.roles})")
    name = names[0]
    return layout.channels.index(name), list(layout.planes[name])


def score_columns(methods: Sequence[str], planes: Sequence[int]) -> list[str]:
    """Wide-table score columns, e.g. var_laplacian_z0 .. (z = the store's z index)."""
    return [f"{m}_z{z}" for m in methods for z in planes]


def site_row(well: str, site: int, result: SiteFocus, planes: Sequence[int], method: str) -> dict:
    """One table row: stack indices translated to the store's z indices."""
    row = {"well": well, "site": int(site),
           "plane": int(planes[result.plane]) if result.plane >= 0 else -1,
           "window": format_window([planes[i] for i in result.window]), "method": method,
           "basis": result.basis, "prominence": result.prominence, "flag": result.flag,
           "reason": result.reason}
    for m in SCORE_COLUMNS:
        for i, z in enumerate(planes):
            row[f"{m}_z{z}"] = float(result.scores.at[i, m])
    return row


def plate_focus(store: str | Path, wells: Sequence[str], layout: StoreLayout,
                method: str = DEFAULT_METHOD, half_width: int = 1,
                min_prominence: float = MIN_PROMINENCE) -> pd.DataFrame:
    """Focus decision for every site of `wells` in a plate store, one site in memory at a time.

    One row per site: well, site, plane (chosen z, -1 if none), window (z indices as "1,2,3", "" if
    none), method (as asked), basis (the rule that chose the plane, "" if none), prominence, flag
    (";"-joined codes, "" if ok: not_bracketed, out_of_focus, blank, nonfinite, single_plane,
    no_plane), reason (human-readable), then every score per plane as
    `{score}_z{z}` columns for all `SCORE_COLUMNS` (wide, so the table is one parquet file)."""
    if method not in CHOOSERS:
        raise ValueError(f"focus: unknown method {method!r}; known: {list(CHOOSERS)}")
    if half_width < 0:
        raise ValueError(f"focus: half_width must be >= 0, got {half_width}")
    channel, planes = brightfield_channel(layout)
    rows = []
    for well, site in stored_sites(store, wells):
        stack = read_field(store, well, site)[0, channel][planes]
        result = assess_stack(stack, method, half_width, min_prominence)
        rows.append(site_row(well, site, result, planes, method))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS + score_columns(SCORE_COLUMNS, planes))
    return table.astype({"well": str, "site": np.int64, "plane": np.int64, "window": str, "method": str,
                         "basis": str, "prominence": np.float64, "flag": str, "reason": str}
                        | {c: np.float64 for c in score_columns(SCORE_COLUMNS, planes)})


# ---------------------------------------------------------------------------------------------
# Plate heatmap
# ---------------------------------------------------------------------------------------------


def _site_grid(max_site: int) -> int:
    """Side of the square of small cells that holds one well's sites."""
    return max(1, math.ceil(math.sqrt(max_site)))


def _plane_grid(table: pd.DataFrame) -> tuple[np.ndarray, list[tuple[int, int]], range, range, int]:
    """Chosen plane per small site cell (NaN: no such site; -1: none chosen), the (y, x) cells of
    flagged sites, the plate rows and columns shown, and the side of a well's square of sites."""
    rows = [PLATE_ROWS.index(well_row_column(w)[0]) for w in table["well"]]
    columns = [int(well_row_column(w)[1]) - 1 for w in table["well"]]
    row_range = range(min(rows), max(rows) + 1)
    column_range = range(min(columns), max(columns) + 1)
    k = _site_grid(int(table["site"].max()))
    grid = np.full((len(row_range) * k, len(column_range) * k), np.nan)
    flagged = []
    for r, c, site, plane, flag in zip(rows, columns, table["site"], table["plane"], table["flag"],
                                       strict=True):
        dy, dx = divmod(int(site) - 1, k)
        y, x = (r - row_range.start) * k + dy, (c - column_range.start) * k + dx
        grid[y, x] = plane
        if flag:
            flagged.append((y, x))
    return grid, flagged, row_range, column_range, k


def focus_heatmap(table: pd.DataFrame, path: str | Path, plate: str | None = None) -> None:
    """PNG of the chosen plane per site as a plate map (rows A-P x columns 1-24, cropped to the wells
    present; each well a small square of site cells, white = no such site, grey = no plane chosen),
    flagged sites crossed out in red, so a tilted plate, a drifting autofocus or a blurred corner
    shows at a glance."""
    # Figure + Agg canvas directly: no global pyplot state or backend switch (safe in threads);
    # matplotlib is imported here, by the figure alone, as it is heavy and only figures need it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    title = f"{plate + ': ' if plate else ''}chosen focus plane"
    if table.empty:
        fig = Figure(figsize=(4, 2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no sites", ha="center", va="center")
        ax.set_axis_off()
        ax.set_title(title)
        fig.savefig(path, format="png")
        return
    grid, flagged, row_range, column_range, k = _plane_grid(table)
    fig = Figure(figsize=(min(2.5 + 0.4 * len(column_range), 12), min(1.5 + 0.4 * len(row_range), 8)),
                 dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    chosen = sorted(int(p) for p in table["plane"].unique() if p >= 0) or [0]
    levels = list(range(min(chosen), max(chosen) + 1))
    cmap = ListedColormap([_plane_colour(i, len(levels)) for i in range(len(levels))]
                          ).with_extremes(bad="white")
    norm = BoundaryNorm([v - 0.5 for v in levels] + [levels[-1] + 0.5], cmap.N)
    image = ax.imshow(np.where(grid >= 0, grid, np.nan), cmap=cmap, norm=norm, interpolation="nearest")
    none_chosen = ListedColormap(["#999999"]).with_extremes(bad=(0, 0, 0, 0))
    ax.imshow(np.where(grid < 0, 1.0, np.nan), cmap=none_chosen, vmin=0, vmax=1, interpolation="nearest")
    if flagged:
        ys, xs = zip(*flagged, strict=True)
        ax.scatter(xs, ys, marker="x", c="red", s=max(8, 120 / k), linewidths=1.2)
    ax.set_xticks([(i + 0.5) * k - 0.5 for i in range(len(column_range))],
                  [str(c + 1) for c in column_range], fontsize=7)
    ax.set_yticks([(i + 0.5) * k - 0.5 for i in range(len(row_range))],
                  [PLATE_ROWS[r] for r in row_range], fontsize=7)
    ax.tick_params(length=0)
    for i in range(len(column_range) + 1):
        ax.axvline(i * k - 0.5, color="#dddddd", linewidth=0.8)
    for i in range(len(row_range) + 1):
        ax.axhline(i * k - 0.5, color="#dddddd", linewidth=0.8)
    fig.colorbar(image, ax=ax, ticks=levels, label="plane (z)", fraction=0.04, pad=0.02)
    method = str(table["method"].iloc[0]) if "method" in table else ""
    n_flagged = int((table["flag"] != "").sum())
    ax.set_title(f"{title} ({method}); red x: flagged ({n_flagged} of {len(table)} sites), grey: none",
                 fontsize=9)
    fig.savefig(path, format="png", bbox_inches="tight")


def _plane_colour(i: int, n: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps  # heavy; only figures need it

    return colormaps["viridis"](i / max(n - 1, 1))
