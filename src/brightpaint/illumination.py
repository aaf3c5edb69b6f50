"""Illumination correction: one flat field (and dark field) per plate and channel.

Model of an acquired image: ``image = dark + flat * signal``; the corrected image is
``(image - dark) / flat`` (`correct_illumination`). ``flat`` is normalised (mean 1 by default,
``rescale=``), so corrected images keep the raw intensity scale.

Two methods, chosen with ``method=``:

``"cellprofiler"`` (no extra dependency) -- CellProfiler's CorrectIlluminationCalculate family
    ("Regular" intensities, "All" images): average every usable image, smooth at a large scale,
    normalise. ``average``: ``"trimmed"`` (default: per pixel, the mean of the middle half of the
    images -- robust to debris and bright cells like a median, less noisy than one), ``"mean"``
    (CellProfiler's Regular), ``"median"`` or ``"background"`` (CellProfiler's "Background"
    intensity choice, made robust: per block, the mean over the ``background_fraction`` (0.15) of
    the images whose neighbouring blocks are darkest there, i.e. where the block shows only the
    stain's background -- autofluorescence, unbound dye. For fluorescence: the cells' own signal
    averages out only over thousands of sites (on a 48-site demo plate the mean cell-body stain
    still varies +-30 % at the scale of the function), while the background is lit by the same
    field and sampled wherever cells are not). Each image is first clipped at its own
    ``clip_percentile`` (99.9). ``smoothing``:

    * ``"spline"`` (default): least-squares cubic tensor spline, knots every ``size`` px. Local,
      and without the edge bias of a filter -- which matters for vignetting: a Gaussian of sigma =
      width/16 applied to the demo's *true* flat field already leaves 5 % error in the corners
      (13 % at width/8, 4-6 % for CellProfiler's median filter of size width/4 on real averages),
      the spline ~1 %.
    * ``"polynomial"``: 2-D polynomial of ``degree`` (2 = CellProfiler's "Fit Polynomial").
    * ``"gaussian"``: normalised Gaussian convolution, sigma = ``size`` / 2.35, edges handled as
      CellProfiler does (divided by the smoothed mask). CellProfiler's "Gaussian Filter".
    * ``"median"``: median over a disk of radius ``size`` / 2.35 that ignores pixels outside the
      image. CellProfiler's "Median Filter" (with ``average="mean"`` it reproduces
      CellProfiler 5 on its own example images: Pearson r = 0.9999).
    * ``"none"``.

    ``size`` is in image pixels (default: a sixth of the longer image side, inside the 1/4-1/8 range
    JUMP uses; a third with the background average, whose blocks are noisier). CellProfiler has
    no dark offset: pass the camera's offset as ``dark=`` (ADU, subtracted before averaging and
    kept in the function), or use BaSiC. ``rescale``: ``"mean"``
    (default), ``"median"`` (CellProfiler's "Median") or ``"minimum"`` (CellProfiler's "Yes": divide
    by the 2nd percentile, nothing below 1).

``"basic"`` -- BaSiC (BaSiCPy 2.0.0): low-rank + sparse decomposition that also estimates a dark
    field (``darkfield=True``). It needs site-to-site brightness variation to tell dark from flat:
    on brightfield (nearly constant brightness) its dark field is undetermined -- on the demo 740-
    940 ADU for a true 120 and a 12-14 % flat-field error -- so `plate_illumination` turns it off for
    the brightfield role unless asked. Like any background-based method it cannot see a flat field
    that only sparse objects sample (the demo's fluorescence, whose background is pure dark).

Both methods work on a reduced copy of each image: block means on a grid of at most
``working_size`` cells along the longer side (64 by default), saturated pixels left out. The
function is smooth at a far larger scale than a block, so nothing is lost; it is brought back to
full resolution by the spline / polynomial itself or by a bicubic spline through the blocks.
Memory is bounded: at most ``max_images`` reduced images are kept (a seeded uniform reservoir
sample; 2000 x 64 x 64 float32 = 33 MB; BaSiC 200), plus one number per image.

Images that are not used (counted in ``n_excluded``, reasons in ``params["excluded"]``):

* non-finite pixels (NaN / inf): left out (``on_nonfinite="error"`` raises instead);
* blank: constant images;
* saturated: more than ``max_saturated`` (0.5) of the pixels at the saturation value (the dtype
  maximum of integer images, or ``saturation=``); fewer saturated pixels are masked, not used;
* nearly empty: mean signal (after ``dark``) at most ``min_signal`` (0.1) x the median signal of
  the usable images (empty wells, failed acquisitions).

No usable image left: ``ValueError`` saying "no usable image" and naming the channel (``name=``).

The camera offset from the data: every image's `dark_level` (the 1st percentile of its 4 x 4-pixel
means: the offset plus the least background it has) is recorded, their median per channel in
``params["darkest_level"]``; the smallest over a plate's channels bounds its camera offset from above
(`camera_offset_estimate`), which the report shows beside the configured ``dark``. Where more than
`DARK_ABOVE_DATA` of the pixels lie below ``dark``, ``params["offset_check"]`` says the offset is too
high.

A flat field the images cannot support is replaced by the identity (flat 1, the dark offset still
subtracted), with the reason in ``params["fallback"]``, rather than stopping the screen. Checks,
from the data: (1) the average is not positive although the images have signal: the stain has no
background to sample (it sits at the dark offset outside cells: an offset-subtracted export, a sparse
foci stain); (2) split-half check (``cellprofiler`` method, >= 8 images): the function estimated from
the even images must remove at least half the shading of the one from the odd images
(``params["split_half"]``: the 1st..99th percentile range of their ratio, and of each), i.e. the
estimate is reproducible rather than noise, and the halves may not both vary more than
`MAX_SHADING` (no illumination does).
Measured on the demo (48 sites of one plate): stains with their background give split-half ranges
of 0.02-0.08 against shading of 0.26-0.45 (kept); the same stains with no background 4.9-3000
against 1.5-42 (identity: the estimates' residual shading was 1.2-10.9, worse than the 0.30-0.51
of no correction); the trimmed average of the demo's cell-body stain 0.58 against 0.78 (identity:
its estimate was worse than none, 0.47 against 0.35); real BBBC016 (72 images) 0.19-0.37 against
0.88-0.97 (kept). BaSiC (``basic``) is not checked.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import interpolate, ndimage

from .ingest import read_plane, stored_sites

LOGGER = logging.getLogger("brightpaint")

METHODS = ("cellprofiler", "basic")
SMOOTHING = ("spline", "polynomial", "gaussian", "median", "none")
AVERAGES = ("trimmed", "mean", "median", "background")
TRIM = 0.25  # "trimmed": mean of the middle half of the values (interquartile mean)
RESCALING = ("mean", "median", "minimum")
ROBUST_MINIMUM = 0.02  # CellProfiler's "Rescale: Yes" divides by the 2nd percentile
FLAT_FLOOR = 0.01  # flat values below this fraction of the mean are clipped (never divide by ~0)
# split-half check: a half's function must leave at most this fraction of the other half's shading
SPLIT_HALF_MAX = 0.5
SPLIT_HALF_MIN_IMAGES = 8  # below this, halves are too small to judge: the check is skipped
# and no illumination field varies this much (`shading_range`, 1st..99th percentile relative to the
# mean): strong real vignetting (BBBC016, corner / centre 0.32) is 0.93, the demo's fields 0.27-0.46,
# while "flat fields" of stains with no background (the cells' density) were 1.5-42
MAX_SHADING = 2.0
# The dark offset against the data: a stain without background has about half its background pixels
# below a right offset (read noise is symmetric), so more than this share of all pixels below it
# says the offset is too high (`params["offset_check"]`)
DARK_ABOVE_DATA = 0.6

_COMMON = {"dark": 0.0, "working_size": None, "max_images": None, "clip_percentile": 99.9,
           "saturation": None, "max_saturated": 0.5, "min_signal": 0.1, "on_nonfinite": "exclude",
           "rescale": "mean", "seed": 0, "name": "images"}
_DEFAULTS = {
    "cellprofiler": {**_COMMON, "working_size": 64, "max_images": 2000, "average": "trimmed",
                     "smoothing": "spline", "size": None, "degree": 2,
                     "background_fraction": 0.15},
    "basic": {**_COMMON, "working_size": 64, "max_images": 200, "darkfield": True,
              "smoothness_flatfield": None, "smoothness_darkfield": None, "max_iterations": 500},
}


@dataclass(frozen=True)
class IlluminationFunction:
    """flat: float32 (Y, X), normalised (see ``params["rescale"]``); dark: float32 (Y, X) in the
    images' units, subtracted before dividing (zeros when none); n_images: images the function was
    computed from (after sampling and exclusions); n_excluded: images left out as unusable; params:
    every setting used plus ``excluded`` (reason -> count) and ``n_seen``."""

    flat: np.ndarray
    dark: np.ndarray
    method: str
    n_images: int
    n_excluded: int
    params: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Reducing one image
# ---------------------------------------------------------------------------------------------


def _grid_edges(shape: tuple[int, int], working_size: int) -> tuple[np.ndarray, np.ndarray]:
    scale = min(1.0, working_size / max(shape))
    edges = []
    for n in shape:
        cells = max(1, min(n, int(round(n * scale))))
        edges.append(np.round(np.linspace(0, n, cells + 1)).astype(np.int64))
    return edges[0], edges[1]


def _block_sums(a: np.ndarray, ey: np.ndarray, ex: np.ndarray) -> np.ndarray:
    return np.add.reduceat(np.add.reduceat(a, ey[:-1], axis=0, dtype=np.float64), ex[:-1], axis=1)


@dataclass
class _Reduced:
    grid: np.ndarray  # float32 block means of the valid pixels (NaN where a block has none)
    weight: np.ndarray  # float32 valid pixels per block
    signal: float  # mean of the valid pixels after dark subtraction
    darkest: float  # dark_level of the raw image
    below_dark: float  # fraction of the raw pixels below the dark offset (dark 0: at or below 0)


def dark_level(image: np.ndarray, block: int = 4, percentile: float = 1.0) -> float:
    """The level of an image's darkest areas: the `percentile` of its block x block means. The
    means cut the read noise `block` times, so this is the camera offset plus the least
    background the image has (a stain without background: the offset itself), not a noise tail."""
    data = np.asarray(image, dtype=np.float32)
    ny, nx = data.shape[0] // block, data.shape[1] // block
    if ny == 0 or nx == 0:
        return float(np.percentile(data, percentile))
    means = data[:ny * block, :nx * block].reshape(ny, block, nx, block).mean(axis=(1, 3))
    return float(np.percentile(means, percentile))


def _reduce(image: np.ndarray, index: int, p: dict, edges) -> _Reduced | str:
    """The image's reduced form, or the reason it is excluded."""
    raw = np.asarray(image)
    if raw.dtype.kind in "iu":
        top = np.iinfo(raw.dtype).max if p["saturation"] is None else p["saturation"]
        saturated = raw >= top
    else:
        saturated = raw >= p["saturation"] if p["saturation"] is not None else None
    data = raw.astype(np.float32)
    if raw.dtype.kind == "f" and not np.isfinite(data).all():
        if p["on_nonfinite"] == "error":
            raise ValueError(f"{p['name']}: image {index} has non-finite pixels (NaN or inf)")
        return "non-finite pixels"
    if data.min() == data.max():
        return "blank (constant image)"
    valid = None
    if saturated is not None and saturated.any():
        if saturated.mean() > p["max_saturated"]:
            return "saturated"
        valid = ~saturated
    darkest = dark_level(data)
    # below the offset; with none (dark 0), at or below 0: an offset-subtracted export clips its
    # background there, a raw frame with an offset never reaches it
    below = data < p["dark"] if p["dark"] else data <= 0
    below_dark = float(np.count_nonzero(below) / data.size)
    if p["clip_percentile"] is not None and p["clip_percentile"] < 100:
        step = max(1, int(math.sqrt(data.size / 65536)))  # percentile of a ~64k-pixel subsample
        sample = data[::step, ::step]
        sample = sample[valid[::step, ::step]] if valid is not None else sample
        if sample.size:
            np.minimum(data, np.percentile(sample, p["clip_percentile"]), out=data)
    if p["dark"]:
        data -= np.float32(p["dark"])
    ey, ex = edges
    if valid is None:
        weight = _block_sums(np.ones(data.shape, np.float32), ey, ex)
        sums = _block_sums(data, ey, ex)
    else:
        weight = _block_sums(valid.astype(np.float32), ey, ex)
        sums = _block_sums(np.where(valid, data, 0), ey, ex)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = sums / weight
    signal = float(sums.sum() / weight.sum())
    return _Reduced(grid.astype(np.float32), weight.astype(np.float32), signal, darkest, below_dark)


# ---------------------------------------------------------------------------------------------
# Smoothing and resampling on the grid
# ---------------------------------------------------------------------------------------------


def _cell_centres(edges: np.ndarray) -> np.ndarray:
    return (edges[:-1] + edges[1:] - 1) / 2.0


def _unit_coords(centres: np.ndarray, n: int) -> np.ndarray:
    return (2.0 * centres / max(n - 1, 1)) - 1.0


def _poly_terms(y: np.ndarray, x: np.ndarray, degree: int) -> list[np.ndarray]:
    return [y**i * x**j for i in range(degree + 1) for j in range(degree + 1 - i)]


def _bspline_design(coords: np.ndarray, n: int, intervals: int) -> np.ndarray:
    """Cubic B-spline basis on [-0.5, n - 0.5] with `intervals` equal knot intervals."""
    lo, hi = -0.5, n - 0.5
    knots = np.r_[[lo] * 3, np.linspace(lo, hi, intervals + 1), [hi] * 3]
    return interpolate.BSpline.design_matrix(np.clip(coords, lo, hi), knots, 3).toarray()


def _fit_spline(avg, weight, edges, shape, size):
    """Weighted least-squares tensor-product cubic spline with knots every ~`size` px, evaluated
    at every pixel. Local (unlike a polynomial) and without the edge bias of a filter."""
    ey, ex = edges
    ok = np.isfinite(avg) & (weight > 0)
    intervals = [max(1, int(round(n / size))) for n in shape]
    by = _bspline_design(_cell_centres(ey), shape[0], intervals[0])
    bx = _bspline_design(_cell_centres(ex), shape[1], intervals[1])
    design = np.einsum("ia,jb->ijab", by, bx).reshape(ok.size, -1)[ok.ravel()]
    w = np.sqrt(weight[ok] / weight[ok].max())
    coef, *_ = np.linalg.lstsq(design * w[:, None], avg[ok] * w, rcond=None)
    coef = coef.reshape(by.shape[1], bx.shape[1])
    full_y = _bspline_design(np.arange(shape[0], dtype=np.float64), shape[0], intervals[0])
    full_x = _bspline_design(np.arange(shape[1], dtype=np.float64), shape[1], intervals[1])
    return full_y @ coef @ full_x.T


def _fit_polynomial(avg, weight, edges, shape, degree):
    """Weighted least-squares polynomial on the grid, evaluated at every pixel."""
    ey, ex = edges
    gy, gx = np.meshgrid(_unit_coords(_cell_centres(ey), shape[0]),
                         _unit_coords(_cell_centres(ex), shape[1]), indexing="ij")
    ok = np.isfinite(avg) & (weight > 0)
    design = np.stack([t[ok] for t in _poly_terms(gy, gx, degree)], axis=1)
    w = np.sqrt(weight[ok] / weight[ok].max())
    coef, *_ = np.linalg.lstsq(design * w[:, None], avg[ok] * w, rcond=None)
    py = _unit_coords(np.arange(shape[0], dtype=np.float64), shape[0])
    px = _unit_coords(np.arange(shape[1], dtype=np.float64), shape[1])
    out = np.zeros(shape, np.float64)
    k = 0
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            out += coef[k] * np.outer(py**i, px**j)
            k += 1
    return out


def _smooth_gaussian(avg, ok, sigma):
    filled = np.where(ok, avg, 0.0)
    mask = ok.astype(np.float64)
    top = ndimage.gaussian_filter(filled, sigma, mode="constant", cval=0.0)
    bottom = ndimage.gaussian_filter(mask, sigma, mode="constant", cval=0.0)
    return top / np.maximum(bottom, np.finfo(float).eps)


def _smooth_median(avg, ok, radius):
    r = max(1, int(radius + 0.5))
    padded = np.pad(np.where(ok, avg, np.nan), r, constant_values=np.nan)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (yy**2 + xx**2) <= r * r
    windows = np.lib.stride_tricks.sliding_window_view(padded, disk.shape)[..., disk]
    return np.nanmedian(windows, axis=-1)


def _to_full(grid: np.ndarray, edges, shape) -> np.ndarray:
    """Bicubic spline through the cell centres, evaluated at every pixel (identity when the grid is
    the image)."""
    if grid.shape == tuple(shape):
        return grid.astype(np.float64)
    ey, ex = edges
    cy, cx = _cell_centres(ey), _cell_centres(ex)
    ky, kx = min(3, len(cy) - 1), min(3, len(cx) - 1)
    if ky < 1 or kx < 1:
        return np.full(shape, float(np.nanmean(grid)))
    spline = interpolate.RectBivariateSpline(cy, cx, grid, kx=ky, ky=kx,
                                             bbox=[0, shape[0] - 1, 0, shape[1] - 1])
    return spline(np.arange(shape[0]), np.arange(shape[1]))


class NoImageSignal(ValueError):
    """The averaged images minus the dark offset are not positive."""


def shading_range(field: np.ndarray) -> float:
    """1st..99th percentile range of a field relative to its mean, lightly smoothed (Gaussian sigma
    2 px): how much shading it holds (0 for a uniform field)."""
    field = np.asarray(field, dtype=np.float64)
    smooth = ndimage.gaussian_filter(field / field.mean(), 2, mode="nearest")
    low, high = np.percentile(smooth, [1, 99])
    return float(high - low)


def split_half(flat_a: np.ndarray, flat_b: np.ndarray) -> dict:
    """How well two independent estimates of one flat field agree: the shading left when one
    corrects the other (`shading_range` of their ratio) against the shading each holds."""
    return {"disagreement": round(shading_range(flat_a / flat_b), 4),
            "shading": round(min(shading_range(flat_a), shading_range(flat_b)), 4)}


def _rescale(flat: np.ndarray, how: str, name: str, dark: float) -> np.ndarray:
    positive = flat[flat > 0]
    if how == "mean":
        scale = positive.mean() if positive.size else 0.0
    elif how == "median":
        scale = np.median(positive) if positive.size else 0.0
    else:  # CellProfiler "Yes": robust minimum, nothing below 1
        scale = np.sort(positive)[int(positive.size * ROBUST_MINIMUM)] if positive.size else 0.0
        flat = np.maximum(flat, scale)
    if not scale > 0:
        raise NoImageSignal(f"{name}: no usable image signal: the averaged images minus the dark offset "
                            f"({dark:g}) are not positive (is the dark offset too high?)")
    return flat / scale


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _settings(method: str, params: dict) -> dict:
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {METHODS}")
    defaults = _DEFAULTS[method]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) {unknown}; known: {sorted(defaults)}")
    p = {**defaults, **params}
    for key, allowed in (("smoothing", SMOOTHING), ("average", AVERAGES), ("rescale", RESCALING),
                         ("on_nonfinite", ("exclude", "error"))):
        if key in p and p[key] not in allowed:
            raise ValueError(f"{key}: {p[key]!r} is not one of {allowed}")
    for key in ("working_size", "max_images"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 2:
            raise ValueError(f"{key}: must be an integer >= 2, got {p[key]!r}")
    if method == "cellprofiler" and not (isinstance(p["degree"], int) and 0 <= p["degree"] <= 8):
        raise ValueError(f"degree: must be an integer 0..8, got {p['degree']!r}")
    if method == "cellprofiler" and not 0 < p["background_fraction"] <= 1:
        raise ValueError(f"background_fraction: must be in (0, 1], got {p['background_fraction']!r}")
    if not 0 <= p["min_signal"] < 1:
        raise ValueError(f"min_signal: must be in [0, 1), got {p['min_signal']!r}")
    return p


def _collect(images: Iterable[np.ndarray], p: dict):
    """Stream the images once: reduce each, keep a seeded reservoir of at most max_images reduced
    images plus every image's signal. Returns (kept list of (index, _Reduced), signals dict,
    excluded reasons, n_seen, shape, edges)."""
    rng = np.random.default_rng(p["seed"])
    reservoir: list[tuple[int, _Reduced]] = []
    signals: dict[int, float] = {}
    excluded: dict[str, int] = {}
    shape = edges = None
    n_seen = 0
    for index, image in enumerate(images):
        n_seen += 1
        array = np.asarray(image)
        if array.ndim != 2:
            raise ValueError(f"{p['name']}: image {index} has {array.ndim} dimensions; "
                             "expected one 2-D plane (Y, X)")
        if shape is None:
            shape = array.shape
            edges = _grid_edges(shape, p["working_size"])
        elif array.shape != shape:
            raise ValueError(f"{p['name']}: image {index} has shape {array.shape}, the first "
                             f"image {shape}; all images of a channel must have one shape")
        reduced = _reduce(array, index, p, edges)
        if isinstance(reduced, str):
            excluded[reduced] = excluded.get(reduced, 0) + 1
            continue
        signals[index] = reduced.signal
        # reservoir sampling (Algorithm R): a uniform sample of the usable images, any count
        usable = len(signals)
        if len(reservoir) < p["max_images"]:
            reservoir.append((index, reduced))
        else:
            slot = int(rng.integers(0, usable))
            if slot < p["max_images"]:
                reservoir[slot] = (index, reduced)
    return reservoir, signals, excluded, n_seen, shape, edges


def illumination_function(images: Iterable[np.ndarray], method: str = "cellprofiler",
                          **params) -> IlluminationFunction:
    """The illumination function of a stream of 2-D images of one channel (any iterable: images
    are read once, one at a time). See the module docstring for ``method`` and ``params``."""
    p = _settings(method, params)
    reservoir, signals, excluded, n_seen, shape, edges = _collect(images, p)
    name = p["name"]
    if not signals:
        reasons = ", ".join(f"{n} {r}" for r, n in excluded.items()) or "no images given"
        raise ValueError(f"{name}: no usable image for the illumination function "
                         f"({n_seen} seen: {reasons})")
    reference = float(np.median(list(signals.values())))
    if not reference > 0:
        darkest = float(np.median([r.darkest for _, r in reservoir]))
        raise ValueError(f"{name}: no usable image for the illumination function: the median "
                         f"signal above the dark offset ({p['dark']}) is {reference:g} (the images' "
                         f"darkest areas are at {darkest:.4g}: is illumination.dark the camera's "
                         "offset?)")
    empty = {i for i, s in signals.items() if s <= p["min_signal"] * reference}
    if empty:
        excluded["nearly empty"] = len(empty)
    kept = [r for i, r in reservoir if i not in empty]
    if not kept:
        raise ValueError(f"{name}: no usable image for the illumination function "
                         f"(all {n_seen} images excluded: {excluded})")
    grids = np.stack([r.grid for r in kept])
    weights = np.stack([r.weight for r in kept])

    if method == "cellprofiler":
        flat, dark = _cellprofiler(grids, weights, p, shape, edges)
    else:
        flat, dark = _basic(grids, weights, p, shape, edges)

    fallback, halves = "", None
    try:
        flat = _rescale(flat, p["rescale"], name, p["dark"])
    except NoImageSignal:
        fallback = (f"no flat field: the images have signal above the dark offset ({p['dark']:g}) but "
                    f"their {p.get('average', method)} average does not: the stain has no background "
                    "to sample (offset-subtracted export or a sparse stain)")
    if not fallback and method == "cellprofiler" and len(kept) >= SPLIT_HALF_MIN_IMAGES:
        try:
            halves = split_half(*(_rescale(_cellprofiler(grids[k::2], weights[k::2], p, shape, edges)[0],
                                           p["rescale"], name, p["dark"]) for k in (0, 1)))
        except NoImageSignal:
            halves = {"disagreement": None, "shading": None}
            fallback = (f"no flat field: the {p.get('average', method)} average of half of the images "
                        f"is not above the dark offset ({p['dark']:g}): too little background to sample")
        else:
            if not halves["shading"] <= MAX_SHADING:
                fallback = (f"no flat field: estimated from either half of the images it varies by "
                            f"{halves['shading']:.3g} x its mean (> {MAX_SHADING:g}), which no illumination "
                            "does: it is the cells' own signal (a stain with too little background)")
            elif not halves["disagreement"] <= SPLIT_HALF_MAX * halves["shading"]:
                fallback = (f"no flat field: estimated from half of the {len(kept)} images it leaves "
                            f"{halves['disagreement']:.3g} of shading in the other half's, whose own is "
                            f"{halves['shading']:.3g}: the estimate is noise, not the field (too few "
                            "sites, or a stain with little background)")
    if fallback:
        LOGGER.warning("%s: %s; identity flat used", name, fallback)
        flat = np.ones(shape, np.float64)
    floor = FLAT_FLOOR * float(flat.mean())
    n_clipped = int((flat < floor).sum())
    flat = np.maximum(flat, floor)
    darkest = float(np.median([r.darkest for _, r in reservoir]))
    below_dark = float(np.median([r.below_dark for _, r in reservoir]))
    offset_check = ""
    if p["dark"] and below_dark > DARK_ABOVE_DATA:
        offset_check = (f"the dark offset ({p['dark']:g}) is above most pixels ({below_dark:.0%} of them "
                        f"lie below it; the darkest areas are at {darkest:.4g}): is it the camera's "
                        "offset? (illumination.dark)")
        LOGGER.warning("%s: %s", name, offset_check)
    settings = {k: v for k, v in p.items() if k != "name"}
    settings.update({"darkest_level": darkest, "below_dark_fraction": below_dark,
                     "offset_check": offset_check,
                     "excluded": excluded, "n_seen": n_seen, "n_usable": len(signals),
                     "n_nearly_empty_in_sample": len(reservoir) - len(kept),
                     "grid": list(grids.shape[1:]), "flat_clipped_pixels": n_clipped,
                     "channel": name, "fallback": fallback, "split_half": halves})
    return IlluminationFunction(flat.astype(np.float32), dark.astype(np.float32), method,
                                len(kept), sum(excluded.values()), settings)


def _trimmed_mean(grids: np.ndarray, trim: float) -> np.ndarray:
    """Per block: mean of the values between the `trim` and 1 - `trim` quantiles across images
    (NaN blocks ignored)."""
    ordered = np.sort(grids.astype(np.float64), axis=0)  # NaN last
    n = np.isfinite(ordered).sum(axis=0)
    low = np.floor(n * trim).astype(np.int64)
    high = n - low
    cumulative = np.concatenate([np.zeros((1, *ordered.shape[1:])),
                                 np.cumsum(np.nan_to_num(ordered), axis=0)])
    upper = np.take_along_axis(cumulative, high[None], axis=0)[0]
    lower = np.take_along_axis(cumulative, low[None], axis=0)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (upper - lower) / (high - low), np.nan)


def _background_mean(grids: np.ndarray, fraction: float) -> np.ndarray:
    """Per block: the mean over the images in which the block lies in background, i.e. the
    `fraction` of the images whose 8 neighbouring blocks are darkest there. Selecting on the
    neighbours and averaging the block's own values keeps the selection independent of the block's
    own photon noise: choosing the darkest values of the block itself would bias it low by a
    multiple of the noise, more where the illumination is dim, and bend the function."""
    values = grids.astype(np.float64)
    valid = np.isfinite(values)
    ring = np.ones((1, 3, 3))
    ring[0, 1, 1] = 0.0
    total = ndimage.convolve(np.where(valid, values, 0.0), ring, mode="constant", cval=0.0)
    count = ndimage.convolve(valid.astype(np.float64), ring, mode="constant", cval=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        neighbours = np.where(valid & (count > 0), total / count, np.inf)
    order = np.argsort(neighbours, axis=0, kind="stable")
    n_valid = (neighbours < np.inf).sum(axis=0)
    keep = np.maximum(1, np.ceil(fraction * n_valid)).astype(np.int64)
    ranked = np.take_along_axis(np.where(valid, values, 0.0), order, axis=0)
    chosen = np.arange(len(values))[:, None, None] < keep[None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_valid > 0, (ranked * chosen).sum(axis=0) / keep, np.nan)


def _cellprofiler(grids, weights, p, shape, edges):
    total = weights.sum(axis=0)
    if p["average"] == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            avg = np.nansum(grids.astype(np.float64) * weights, axis=0) / total
    elif p["average"] == "median":
        avg = np.nanmedian(grids, axis=0).astype(np.float64)
    elif p["average"] == "background":
        avg = _background_mean(grids, p["background_fraction"])
    else:
        avg = _trimmed_mean(grids, TRIM)
    ok = np.isfinite(avg) & (total > 0)
    if not ok.any():
        raise ValueError(f"{p['name']}: no valid pixel in any image")
    # the background average draws on a fraction of the images, hence noisier blocks: a stiffer
    # spline (knots a third of the image apart; a cubic spline still follows vignetting) keeps their
    # photon noise out of the function (demo stains: worst residual shading 1.7 % against 2.1 % at a
    # quarter)
    default_size = max(shape) / (3.0 if p["average"] == "background" else 6.0)
    size = float(p["size"]) if p["size"] is not None else default_size
    block = max(shape) / max(avg.shape)  # image pixels per grid cell
    if p["smoothing"] == "spline":
        flat = _fit_spline(avg, np.where(ok, total, 0), edges, shape, size)
    elif p["smoothing"] == "polynomial":
        flat = _fit_polynomial(avg, np.where(ok, total, 0), edges, shape, p["degree"])
    else:
        if p["smoothing"] == "gaussian":
            smooth = _smooth_gaussian(avg, ok, size / 2.35 / block)
        elif p["smoothing"] == "median":
            smooth = _smooth_median(avg, ok, size / 2.35 / block)
        else:  # blocks without a valid pixel take their neighbourhood's value
            smooth = np.where(ok, avg, _smooth_gaussian(avg, ok, 2.0))
        flat = _to_full(smooth, edges, shape)
    dark = np.full(shape, float(p["dark"]))
    return flat, dark


def _basic(grids, weights, p, shape, edges):
    try:  # BaSiCPy is optional (method 'basic'), and heavy: imported only when asked for
        from basicpy import BaSiC
    except ImportError as err:  # pragma: no cover - the main environment has it
        raise ImportError("method='basic' needs BaSiCPy (pip install basicpy==2.0.0 --no-deps "
                          "plus torch-dct, pydantic, dask, pooch)") from err
    if len(grids) < 3:
        raise ValueError(f"{p['name']}: BaSiC needs at least 3 usable images, got {len(grids)}")
    # blocks with no valid pixel: the block's median over the other images, weight 0
    missing = ~np.isfinite(grids)
    if missing.any():
        fill = np.nanmedian(np.where(missing, np.nan, grids), axis=0)
        fill = np.where(np.isfinite(fill), fill, np.nanmedian(grids))
        grids = np.where(missing, fill[None], grids)
    fitting_weight = (weights > 0).astype(np.float32)
    options = {k: float(p[k]) for k in ("smoothness_flatfield", "smoothness_darkfield")
               if p[k] is not None}  # None: BaSiC's own automatic choice
    logger = logging.getLogger("basicpy.basicpy")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = BaSiC(get_darkfield=bool(p["darkfield"]), working_size=list(grids.shape[1:]),
                          max_iterations=p["max_iterations"], device="cpu", **options)
            model.fit(grids.astype(np.float32),
                      fitting_weight=fitting_weight if missing.any() else None)
    finally:
        logger.setLevel(level)
    flat = _to_full(np.asarray(model.flatfield, np.float64), edges, shape)
    dark = _to_full(np.asarray(model.darkfield, np.float64), edges, shape) + float(p["dark"])
    if not p["darkfield"]:
        dark = np.full(shape, float(p["dark"]))
    return flat, dark


def correct_illumination(image: np.ndarray, function: IlluminationFunction) -> np.ndarray:
    """(image - dark) / flat as float32. Raises if the shapes differ."""
    image = np.asarray(image)
    if image.shape[-2:] != function.flat.shape:
        raise ValueError(f"image shape {image.shape} does not match the illumination function's "
                         f"{function.flat.shape}")
    out = image.astype(np.float32)
    out -= function.dark
    out /= function.flat
    return out


def _plate_planes(layout, channel: str, planes) -> list[int]:
    available = list(layout.planes[channel])
    if planes == "all":
        return available
    if planes == "middle":
        return [available[len(available) // 2]]
    chosen = [int(z) for z in planes]
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise ValueError(f"{channel}: plane(s) {missing} are not in the store (planes: {available})")
    return chosen


def plate_illumination(store: str | Path, layout, channel: str, wells: Iterable[str] | None = None,
                       method: str = "cellprofiler", max_sites: int | None = None,
                       planes="all", fluorescence_average: str = "background",
                       **params) -> IlluminationFunction:
    """Illumination function of one channel of a plate store, streaming one plane at a time.

    ``max_sites``: use a seeded uniform sample of at most this many sites (read only those; the
    bound on time and IO for a full plate). ``planes`` ("all", "middle" or a list of z): which
    planes of a z-stack channel to use. Default "all": the illumination (condenser, camera) does not
    depend on the focal plane, while the cells' contrast does (it changes sign through focus), so
    every plane is another sample of the same field and averaging over planes evens out the cells
    (demo: 240 planes from 48 sites). "middle" reads a fifth of the data. Single-plane channels use
    their one plane. For the brightfield role, BaSiC's dark field is off unless ``darkfield=True``
    is passed: brightfield brightness barely changes from site to site, which leaves BaSiC's dark
    field undetermined (measured on the demo: 740-940 ADU for a true offset of 120). With the
    cellprofiler method, channels other than brightfield are averaged by ``fluorescence_average``
    (default "background": the stain's background samples the field wherever cells are not, while
    the cells' own signal needs thousands of sites to average out); brightfield, whose cells are
    phase objects on a lit background everywhere, by ``average`` (default "trimmed").
    """
    if max_sites is not None and (isinstance(max_sites, bool) or not isinstance(max_sites, int)
                                  or max_sites < 1):
        raise ValueError(f"max_sites: must be an integer >= 1 or None, got {max_sites!r}")
    if channel not in layout.channels:
        raise ValueError(f"channel {channel!r} is not in the store (channels: {layout.channels})")
    c = layout.channels.index(channel)
    zs = _plate_planes(layout, channel, planes)
    sites = stored_sites(store, wells)
    if max_sites is not None and len(sites) > max_sites:
        rng = np.random.default_rng(params.get("seed", 0))
        chosen = np.sort(rng.choice(len(sites), size=max_sites, replace=False))
        sites = [sites[i] for i in chosen]
    brightfield = layout.roles.get(channel) == "brightfield"
    if method == "basic" and brightfield:
        params.setdefault("darkfield", False)
    if method == "cellprofiler" and not brightfield:
        params.setdefault("average", fluorescence_average)
    params.setdefault("name", f"plate {layout.plate}, channel {channel}")

    def stream() -> Iterator[np.ndarray]:
        for well, site in sites:
            for z in zs:
                yield read_plane(store, well, site, c, z)

    function = illumination_function(stream(), method=method, **params)
    function.params.update({"plate": layout.plate, "planes": zs, "n_sites": len(sites),
                            "max_sites": max_sites})
    return function


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_illumination(function: IlluminationFunction, npy_path: str | Path,
                      png_path: str | Path | None = None, json_path: str | Path | None = None) -> None:
    """Write ``npy_path``: float32 array (2, Y, X) = [flat, dark] (all `correct_illumination`
    needs); optionally a PNG figure (flat field with colour bar, its profiles through the centre row
    and column, the dark field's range) and a JSON file with method, n_images, n_excluded and
    params -- name it like the .npy with suffix .json for `load_illumination` to find it."""
    np.save(Path(npy_path), np.stack([function.flat, function.dark]).astype(np.float32))
    if json_path is not None:
        meta = {"format": "brightpaint illumination function: .npy (2, Y, X) float32 = [flat, dark]; "
                          "corrected = (image - dark) / flat",
                "method": function.method, "n_images": function.n_images,
                "n_excluded": function.n_excluded, "params": _json_safe(function.params)}
        Path(json_path).write_text(json.dumps(meta, indent=2) + "\n")
    if png_path is not None:
        _figure(function, Path(png_path))


def load_illumination(path: str | Path) -> IlluminationFunction:
    """Read a function written by `save_illumination`; method, counts and params come from the
    .json of the same name when it exists (else method "unknown")."""
    path = Path(path)
    data = np.load(path, allow_pickle=False)
    if data.ndim != 3 or data.shape[0] != 2:
        raise ValueError(f"{path}: expected an array of shape (2, Y, X) [flat, dark], "
                         f"got {data.shape}")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return IlluminationFunction(data[0].astype(np.float32), data[1].astype(np.float32),
                                meta.get("method", "unknown"), int(meta.get("n_images", 0)),
                                int(meta.get("n_excluded", 0)), meta.get("params", {}))


def _figure(function: IlluminationFunction, png_path: Path) -> None:
    import matplotlib  # heavy; only this figure needs it

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    flat = function.flat
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_img, ax_line = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    shown = ax_img.imshow(flat, cmap="viridis")
    fig.colorbar(shown, ax=ax_img, label="flat field (relative)")
    cy, cx = flat.shape[0] // 2, flat.shape[1] // 2
    ax_img.axhline(cy, color="w", lw=0.8)
    ax_img.axvline(cx, color="w", lw=0.8, ls="--")
    title = function.params.get("channel", "")
    fallback = function.params.get("fallback", "")
    note = "\nIDENTITY FLAT (see the report)" if fallback else ""
    ax_img.set_title(f"{title}\n{function.method}: {function.n_images} images, "
                     f"{function.n_excluded} excluded{note}", fontsize=9,
                     color="red" if fallback else "black")
    ax_line.plot(flat[cy], label=f"row {cy}")
    ax_line.plot(flat[:, cx], ls="--", label=f"column {cx}")
    ax_line.set_xlabel("pixel")
    ax_line.set_ylabel("flat field")
    dark = function.dark
    ax_line.set_title(f"profiles; dark {dark.min():.4g}..{dark.max():.4g}", fontsize=9)
    ax_line.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)


def camera_offset_estimate(darkest_levels: dict[str, float], brightfield: str | None = None
                           ) -> tuple[str, float] | None:
    """(channel, level): the channel whose darkest areas are darkest, and their level, from each
    channel's ``params["darkest_level"]``; the brightfield (never dark) is left out. The camera
    adds its offset to every channel, so the offset is at most this level: equal to it where a
    stain has no background (sparse foci, offset-subtracted exports), above the offset by the
    least background otherwise. None without a fluorescence channel."""
    levels = {c: float(v) for c, v in darkest_levels.items() if c != brightfield and v is not None}
    if not levels:
        return None
    channel = min(levels, key=levels.get)
    return channel, levels[channel]


def residual_shading(estimated: np.ndarray, true: np.ndarray) -> float:
    """The shading an estimated flat field leaves against the true one: the 1st..99th percentile
    range of their ratio (each relative to its mean, smoothed by 2 px); 0 = perfect, and the
    identity's equals the true field's own shading. For tests and benchmarks with a known field."""
    ratio = (estimated / estimated.mean()) / (true / true.mean())
    ratio = ndimage.gaussian_filter(ratio.astype(np.float64), 2, mode="nearest")
    low, high = np.percentile(ratio, [1, 99])
    return float(high - low)
