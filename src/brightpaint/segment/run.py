"""Running Cellpose on sites: inputs scaled like Cellpose's own normalisation, site quality, the
network at a diameter, diameter estimation, and `Segmenter` (both networks and the object rules)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

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


def estimate_diameter(model, inputs: np.ndarray, settings: SegmentSettings, min_size: int, *,
                      exhaustive: bool = False) -> float:
    """Median object diameter (px) in sample inputs. Cellpose runs assuming diameters from half to
    four times the network's own (half-octave steps); the answer is the median size found at the
    assumption that agrees best with what it finds (a network shown objects far from its size cuts
    them up or misses them, so a single run at its own scale can be far off); scales that find fewer
    than half the objects of the most fruitful one are not considered. Falls back to the network's
    diameter when nothing is found at any scale.

    The assumptions are walked from the network's own diameter towards the sizes it finds, and the
    walk stops once the found size changes side (found above the assumption after below, or the
    reverse) or the agreement gets worse: past that point every smaller step would have to agree
    better with objects it already finds too large (or too small), and the small assumptions, which
    upsample the images, cost the most (a half-size assumption four times the pixels). Typically two
    or three of the seven runs; `exhaustive` runs them all (tests compare the two), and so does a
    sample in which the network's own scale finds nothing."""
    grid = [float(model.diam_mean * step) for step in DIAMETER_STEPS]
    runs: dict[int, tuple[float, float, int]] = {}  # index -> (log(found / assumed), found, count)
    tried: set[int] = set()

    def run(index: int) -> tuple[float, float, int] | None:
        tried.add(index)
        labels = run_cellpose(model, inputs, diameter=grid[index], settings=settings, min_size=min_size)
        found = np.concatenate([equivalent_diameters(site) for site in labels])
        if len(found):
            runs[index] = (float(np.log(np.median(found) / grid[index])), float(np.median(found)), len(found))
        return runs.get(index)

    index = int(np.argmin(np.abs(DIAMETER_STEPS - 1.0)))
    first = None if exhaustive else run(index)
    if first is None:  # asked for, or nothing at the network's own scale: no direction to walk in
        for other in range(len(grid)):
            if other not in tried:
                run(other)
    else:
        direction = 0 if first[0] == 0 else (1 if first[0] > 0 else -1)
        previous = first
        while direction and 0 <= index + direction < len(grid):
            index += direction
            current = run(index)
            if current is None or np.sign(current[0]) != direction or abs(current[0]) >= abs(previous[0]):
                break
            previous = current
    # a scale that finds only a few stray objects agrees with itself by chance: ignore it
    most = max((r[2] for r in runs.values()), default=0)
    kept = [(abs(error), size, count) for error, size, count in runs.values() if count >= 0.5 * most]
    best = min(kept)[1] if kept else 0.0
    return best if best > 0 else float(model.diam_mean)


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
