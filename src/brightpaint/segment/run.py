"""Running Cellpose on sites: inputs scaled like Cellpose's own normalisation, site quality, the
network at a diameter, diameter estimation, and `Segmenter` (both networks and the object rules)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from ..inference import tiles_per_pass
from .objects import RelatedObjects, equivalent_diameters, filter_sizes, relate_objects, touching_border
from .settings import SegmentError, SegmentSettings


def scale_channel(image: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """One channel to [0, 1] by its 1st-99th percentile (Cellpose's normalisation), then ** gamma.
    A constant (or empty) channel becomes zeros. NaN or infinite pixels are an error."""
    image = np.asarray(image, np.float32)
    if not np.isfinite(image).all():
        raise SegmentError("image has NaN or infinite pixels")
    low, high = np.percentile(image, [1, 99])
    if high <= low:
        return np.zeros_like(image)
    scaled = np.clip((image - low) / (high - low), 0, 1)
    return scaled if gamma == 1 else scaled ** np.float32(gamma)


def cellpose_input(main: np.ndarray, second: np.ndarray | None = None, gamma: float = 1.0) -> np.ndarray:
    """(2, Y, X) float32: the channel to segment and the helper channel (nuclei for cells; zeros
    for nuclei), each scaled by `scale_channel`."""
    first = scale_channel(main, gamma)
    other = np.zeros_like(first) if second is None else scale_channel(second, gamma)
    return np.stack([first, other])


def site_quality(image: np.ndarray) -> str:
    """Why a site's segmentation input cannot be trusted ('' when it can): blank or saturated."""
    image = np.asarray(image)
    if not np.isfinite(image).all():
        return "NaN or infinite pixels"
    if np.issubdtype(image.dtype, np.integer):
        at_top = float(np.mean(image == np.iinfo(image.dtype).max))
        if at_top > 0.5:
            return f"saturated: {100 * at_top:.1f}% of pixels at the dtype maximum"
    if float(np.ptp(image)) == 0:
        return f"blank image (constant value {float(image.flat[0]):g})"
    return ""


def run_cellpose(model, inputs: np.ndarray, *, diameter: float, settings: SegmentSettings,
                 min_size: int) -> np.ndarray:
    """Labels (N, Y, X) int32 of N same-size inputs (N, 2, Y, X), already scaled. The sites go
    through Cellpose as one stack, so its tiles are batched across sites. `diameter` 0 runs at the
    network's own scale."""
    inputs = np.asarray(inputs, np.float32)
    if inputs.ndim != 4 or inputs.shape[1] != 2:
        raise SegmentError(f"Cellpose input must be (sites, 2, Y, X), got {inputs.shape}")
    rescale = model.diam_mean / diameter if diameter > 0 else 1.0
    masks, _, _ = model.eval(inputs, channel_axis=1, z_axis=0, normalize=False, rescale=rescale,
                             diameter=None, batch_size=tiles_per_pass(settings.batch, model.device),
                             bsize=cellpose_tile(inputs.shape[-2:], rescale, settings.tile),
                             flow_threshold=settings.flow_threshold,
                             cellprob_threshold=settings.cellprob_threshold, min_size=min_size,
                             do_3D=False, stitch_threshold=0.0)
    return np.asarray(masks, np.int32).reshape(inputs.shape[0], *inputs.shape[2:])


def cellpose_tile(shape: tuple[int, int], rescale: float, tile: int) -> int:
    """Cellpose's tile size (`bsize`): `tile`, or with 0 the side of the site as Cellpose's network
    sees it (rescaled, then padded by Cellpose's own rule), so the whole site is one tile."""
    if tile:
        return int(tile)
    from cellpose.transforms import get_pad_yx  # Cellpose's modules are heavy to import (~1 s)

    height, width = (int(s * rescale) for s in shape)
    y1, y2, x1, x2 = get_pad_yx(height, width)
    return max(height + y1 + y2, width + x1 + x2)


# The assumptions tried: half-octave steps from half to four times the network's own diameter.
DIAMETER_STEPS = 2.0 ** np.arange(-1, 2.5, 0.5)
# Scales whose objects cover the image's foreground worse than the best scale by more than this
# (Dice) are not considered: on the generated and real images with truth tried (docs/segmentation.md),
# the scale chosen lay within 0.00-0.03 of the best.
FOREGROUND_TOLERANCE = 0.05


# The estimate's sample, in pixels: every scale's Cellpose run sees up to 4x as many (at the smallest
# assumed diameter), so without a bound the estimate's cost grows with the sites. A real screen's 8 sample
# sites of 1080^2 would take ~6 CPU-min per estimate and model (4 per plate), of 2048^2 ~20. Beyond it,
# `estimate_sample` crops sites around their centres to ESTIMATE_CROP px and takes fewer of them.
ESTIMATE_PIXELS = 2 ** 20
ESTIMATE_CROP = 512


def estimate_sample(inputs: np.ndarray, max_pixels: int = ESTIMATE_PIXELS,
                    crop: int = ESTIMATE_CROP) -> np.ndarray:
    """The sample inputs (N, 2, Y, X) the diameter estimate runs on: all of them when they hold at
    most `max_pixels` pixels, else as many sites as `max_pixels` allows (at least one), spread evenly
    over the sample (a plate's sample comes in plate order: not only its first wells), each cut to
    its central `crop` x `crop` px (less where the site is smaller)."""
    count, _, height, width = inputs.shape
    if count * height * width <= max_pixels:
        return inputs
    rows, columns = min(height, crop), min(width, crop)
    top, left = (height - rows) // 2, (width - columns) // 2
    keep = max(1, min(count, max_pixels // (rows * columns)))
    chosen = np.unique(np.linspace(0, count - 1, keep).round().astype(int))
    return inputs[chosen, :, top:top + rows, left:left + columns]


def image_foreground(inputs: np.ndarray) -> np.ndarray:
    """(N, Y, X) bool: where each input's channel to segment (N, 2, Y, X, scaled) lies above its Otsu
    threshold after a 1 px Gaussian blur (which keeps single noisy pixels out); nothing where the
    channel is constant."""
    out = np.zeros((inputs.shape[0], *inputs.shape[2:]), bool)
    for index, image in enumerate(np.asarray(inputs, np.float32)[:, 0]):
        blurred = ndimage.gaussian_filter(image, 1.0)
        if np.ptp(blurred) > 0:
            out[index] = blurred > threshold_otsu(blurred)
    return out


def foreground_dice(labels: np.ndarray, foreground: np.ndarray) -> float:
    """Dice of the objects' union (any label > 0) with the foreground; 0 when both are empty."""
    objects = labels > 0
    total = int(objects.sum()) + int(foreground.sum())
    return 2.0 * int((objects & foreground).sum()) / total if total else 0.0


def estimate_diameter(model, inputs: np.ndarray, settings: SegmentSettings, min_size: int,
                      max_pixels: int = ESTIMATE_PIXELS) -> float:
    """Median object diameter (px) in sample inputs (N, 2, Y, X, scaled). Cellpose runs assuming
    diameters from half to four times the network's own (half-octave steps), and two checks pick
    the answer among them:

    - the foreground: how well the union of a scale's objects covers the image's foreground
      (`image_foreground`, Dice). Shown objects far larger than its scale, a network cuts them into
      fragments (nucleoli, chromatin texture) that cover a fraction of them; far smaller, it misses
      them. Scales within FOREGROUND_TOLERANCE of the best Dice are kept.
    - self-agreement: of those, the scale whose objects' median size is nearest the size it assumed
      (log ratio); the answer is that median size.

    Self-agreement alone is not enough: on real 40x DAPI (nuclei ~46 px) the nuclei network found
    fragments of about the size it assumed at every scale from 17 px up, and a walk from its own scale
    stopped at 16 px, where its objects matched the foreground with a Dice of 0.47 (0.93 at 48 px).
    So every scale is run, on at most `max_pixels` pixels of the sample (`estimate_sample`). Falls
    back to the network's diameter when nothing is found at any scale."""
    inputs = estimate_sample(np.asarray(inputs, np.float32), max_pixels)
    foreground = image_foreground(inputs)
    runs = []  # (Dice, |log(found / assumed)|, found)
    for step in DIAMETER_STEPS:
        assumed = float(model.diam_mean * step)
        labels = run_cellpose(model, inputs, diameter=assumed, settings=settings, min_size=min_size)
        found = np.concatenate([equivalent_diameters(site) for site in labels])
        if len(found):
            size = float(np.median(found))
            runs.append((foreground_dice(labels, foreground), abs(float(np.log(size / assumed))), size))
    if not runs:
        return float(model.diam_mean)
    best = max(dice for dice, _, _ in runs)
    kept = [(error, size) for dice, error, size in runs if dice >= best - FOREGROUND_TOLERANCE]
    return min(kept)[1]


@dataclass
class Segmenter:
    """The two Cellpose models and the settings of a run, with the diameters fixed for a plate."""

    nuclei_model: object
    cell_model: object
    settings: SegmentSettings
    nuclei_diameter: float = 0.0
    cell_diameter: float = 0.0

    def calibrate(self, sample: Sequence[tuple[np.ndarray, np.ndarray]]) -> Segmenter:
        """Diameters from the settings, or estimated once from sample (nuclei, cell body) images."""
        s = self.settings
        nuclei_d, cell_d = s.nuclei_diameter, s.cell_diameter
        if sample and nuclei_d == 0:
            inputs = np.stack([cellpose_input(n, None, s.gamma) for n, _ in sample])
            nuclei_d = estimate_diameter(self.nuclei_model, inputs, s, s.min_nucleus_area)
        if sample and cell_d == 0:
            inputs = np.stack([cellpose_input(c, n, s.gamma) for n, c in sample])
            cell_d = estimate_diameter(self.cell_model, inputs, s, s.min_cell_area)
        return Segmenter(self.nuclei_model, self.cell_model, s, nuclei_d, cell_d)

    def segment(self, sites: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[RelatedObjects]:
        """Related nuclei / cells / cytoplasm of same-size sites given as (nuclei, cell body)
        images, run through each network as one batch."""
        if not sites:
            return []
        s = self.settings
        nuclei_in = np.stack([cellpose_input(n, None, s.gamma) for n, _ in sites])
        cell_in = np.stack([cellpose_input(c, n, s.gamma) for n, c in sites])
        nuclei = run_cellpose(self.nuclei_model, nuclei_in, diameter=self.nuclei_diameter, settings=s,
                              min_size=s.min_nucleus_area)
        cells = run_cellpose(self.cell_model, cell_in, diameter=self.cell_diameter, settings=s,
                             min_size=s.min_cell_area)
        return [relate_objects(filter_sizes(n, s.min_nucleus_area, s.max_nucleus_area),
                               filter_sizes(c, s.min_cell_area, s.max_cell_area), s.exclude_border)
                for n, c in zip(nuclei, cells, strict=True)]

    def segment_nuclei(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Nuclei alone (no cell model: half the cost) of same-size nuclei-channel images, size
        filtered and, with exclude_border, without the objects touching the edge."""
        if not images:
            return []
        s = self.settings
        inputs = np.stack([cellpose_input(image, None, s.gamma) for image in images])
        found = run_cellpose(self.nuclei_model, inputs, diameter=self.nuclei_diameter, settings=s,
                             min_size=s.min_nucleus_area)
        out = []
        for labels in found:
            labels = filter_sizes(labels, s.min_nucleus_area, s.max_nucleus_area)
            if s.exclude_border:
                labels = np.where(np.isin(labels, touching_border(labels)), 0, labels)
            out.append(labels.astype(np.int32))
        return out

    def describe(self) -> dict:
        return {"nuclei_diameter": float(self.nuclei_diameter), "cell_diameter": float(self.cell_diameter),
                **asdict(self.settings)}
