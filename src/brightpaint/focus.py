"""In-focus plane selection and blur QC for brightfield z-stacks.

Why several scores: brightfield cells are nearly transparent phase objects. Off focus they show large
phase halos (contrast inverts through focus), so measures of plain contrast such as the normalised
variance peak on a DEFOCUSED plane; only measures of fine detail peak at focus. Every score is kept in
the table, so a plate can be re-decided without re-reading its images.

Scores, one per plane (`focus_scores`); higher = sharper for all four (`DIRECTIONS`):

* ``var_laplacian``: variance of the Laplacian of the Gaussian-smoothed plane (sigma 0.5 px, see
  `LAPLACIAN_SIGMA`: the suggested sigma ~1 picks a phase-halo plane on half of the demo's dense
  sites). The default chooser: right on all demo sites with cells and on real brightfield (4 of 4
  sephace triplets, where normalised variance is wrong on 4 of 4).
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
of the stack (focus may lie outside it), and ``out_of_focus`` when the chosen plane is no sharper
than the stack's typical plane: its `prominence` (PLLS of the chosen plane minus the stack's median
PLLS, `focus_prominence`) is below `min_prominence`. A flat profile means no plane is in focus (or
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

METHODS = ("var_laplacian", "plls", "norm_variance", "tenengrad")
DEFAULT_METHOD = "var_laplacian"
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

TABLE_COLUMNS = ["well", "site", "plane", "window", "method", "prominence", "flag", "reason"]


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
    """One row per plane (index = plane index in the stack), one column per score method. Planes
    with non-finite pixels score NaN everywhere (a NaN would otherwise poison the filters); blank
    planes keep their (zero or NaN) scores and are excluded by `usable_scores`."""
    stack = check_stack(stack)
    unknown = [m for m in methods if m not in SCORERS]
    if unknown:
        raise ValueError(f"focus: unknown score method(s) {unknown}; known: {list(METHODS)}")
    bad = set(nonfinite_planes(stack))
    rows = []
    for z in range(stack.shape[0]):
        plane = stack[z]
        rows.append({m: math.nan if z in bad else SCORERS[m](plane) for m in methods})
    return pd.DataFrame(rows, index=pd.RangeIndex(stack.shape[0], name="plane"), columns=list(methods))


def _method_scores(scores: pd.DataFrame | Mapping[str, Sequence[float]] | Sequence[float],
                   method: str) -> np.ndarray:
    if method not in DIRECTIONS:
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


def select_focus_plane(scores: pd.DataFrame | Mapping[str, Sequence[float]] | Sequence[float],
                       method: str = DEFAULT_METHOD) -> int:
    """Index of the sharpest plane by `method` (each method's direction is in `DIRECTIONS`). NaN
    scores (unusable planes) are skipped; a ValueError when no plane has a finite score. `scores`:
    the table of `focus_scores`, a mapping method -> scores, or the method's scores alone."""
    values = DIRECTIONS[method] * _method_scores(scores, method)
    if not np.isfinite(values).any():
        raise ValueError(f"focus: no plane has a finite {method} score (blank or NaN planes)")
    return int(np.nanargmax(np.where(np.isfinite(values), values, np.nan)))


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


def blur_qc(scores: pd.DataFrame, plane: int,
            min_prominence: float = MIN_PROMINENCE) -> tuple[float, list[str], list[str]]:
    """Prominence of the chosen plane (by `QC_METHOD`), flags and human-readable reasons: the stack
    does not bracket focus (chosen plane first or last: focus may lie outside the stack), or the
    chosen plane is no sharper than the stack's typical plane (prominence < `min_prominence`)."""
    n_planes = len(scores)
    flags, reasons = [], []
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
    if method not in DIRECTIONS:
        raise ValueError(f"focus: unknown method {method!r}; known: {list(METHODS)}")
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
    if not np.isfinite(usable[method].to_numpy()).any():
        flags.append("no_plane")
        reasons.append(f"no plane has a usable {method} score: cannot choose")
        return SiteFocus(-1, [], math.nan, scores, flags, reasons)
    plane = select_focus_plane(usable, method)
    window = focus_window(plane, n_planes, half_width)
    if n_planes == 1:
        flags.append("single_plane")
        reasons.append("single plane: cannot choose (the stack has one plane)")
        return SiteFocus(plane, window, math.nan, scores, flags, reasons)
    prominence, qc_flags, qc_reasons = blur_qc(usable, plane, min_prominence)
    return SiteFocus(plane, window, prominence, scores, flags + qc_flags, reasons + qc_reasons)


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
           "prominence": result.prominence, "flag": result.flag, "reason": result.reason}
    for m in METHODS:
        for i, z in enumerate(planes):
            row[f"{m}_z{z}"] = float(result.scores.at[i, m])
    return row


def plate_focus(store: str | Path, wells: Sequence[str], layout: StoreLayout,
                method: str = DEFAULT_METHOD, half_width: int = 1,
                min_prominence: float = MIN_PROMINENCE) -> pd.DataFrame:
    """Focus decision for every site of `wells` in a plate store, one site in memory at a time.

    One row per site: well, site, plane (chosen z, -1 if none), window (z indices as "1,2,3", "" if
    none), method, prominence, flag (";"-joined codes, "" if ok: not_bracketed, out_of_focus, blank,
    nonfinite, single_plane, no_plane), reason (human-readable), then every score per plane as
    `{method}_z{z}` columns for all methods (wide, so the table is one parquet file)."""
    if method not in DIRECTIONS:
        raise ValueError(f"focus: unknown method {method!r}; known: {list(METHODS)}")
    if half_width < 0:
        raise ValueError(f"focus: half_width must be >= 0, got {half_width}")
    channel, planes = brightfield_channel(layout)
    rows = []
    for well, site in stored_sites(store, wells):
        stack = read_field(store, well, site)[0, channel][planes]
        result = assess_stack(stack, method, half_width, min_prominence)
        rows.append(site_row(well, site, result, planes, method))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS + score_columns(METHODS, planes))
    return table.astype({"well": str, "site": np.int64, "plane": np.int64, "window": str, "method": str,
                         "prominence": np.float64, "flag": str, "reason": str}
                        | {c: np.float64 for c in score_columns(METHODS, planes)})


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
