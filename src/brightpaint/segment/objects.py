"""Objects from label images: sizes, the image border, nuclei related to cells (shared object
numbers, cytoplasm) and consecutive numbering."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .settings import SegmentError

OBJECTS = ("nuclei", "cells", "cytoplasm")


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """Diameter of the circle of each object's area, for every object of a label image."""
    counts = np.bincount(np.asarray(labels).ravel())[1:]
    return 2 * np.sqrt(counts[counts > 0] / np.pi)


def filter_sizes(labels: np.ndarray, min_area: int = 0, max_area: int = 0) -> np.ndarray:
    """Remove objects smaller than `min_area` or (when > 0) larger than `max_area` pixels."""
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel())
    drop = areas < min_area
    if max_area > 0:
        drop |= areas > max_area
    drop[0] = False
    if not drop.any():
        return labels
    out = labels.copy()
    out[drop[labels]] = 0
    return out


def touching_border(labels: np.ndarray) -> np.ndarray:
    """Label ids of the objects with a pixel on the image edge."""
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.unique(edge[edge > 0])


def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label in a, label in b, pixels in common) for every overlapping pair."""
    both = (a > 0) & (b > 0)
    pairs = np.stack([a[both], b[both]]).astype(np.int64)
    if pairs.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    unique, counts = np.unique(pairs, axis=1, return_counts=True)
    return unique[0], unique[1], counts


def _best_partner(ids: np.ndarray, partners: np.ndarray, counts: np.ndarray) -> dict[int, int]:
    """For each id, the partner it shares most pixels with (ties: the lower partner id)."""
    order = np.lexsort((partners, -counts, ids))
    best: dict[int, int] = {}
    for i in order:
        best.setdefault(int(ids[i]), int(partners[i]))
    return best


@dataclass(frozen=True)
class RelatedObjects:
    nuclei: np.ndarray  # int32, object k = nucleus of cell k
    cells: np.ndarray
    cytoplasm: np.ndarray  # cell k minus nucleus k
    counts: dict  # objects found and dropped, by reason


def relate_objects(nuclei: np.ndarray, cells: np.ndarray, exclude_border: bool = True) -> RelatedObjects:
    """One nucleus per cell, one cell per nucleus, shared object numbers 1..n.

    A cell keeps the nucleus it overlaps most, provided that nucleus overlaps this cell more than any
    other; the nucleus is clipped to the cell. Cells without a nucleus and nuclei without a cell are
    dropped (counted). With `exclude_border`, a pair is dropped when its cell or nucleus touches the
    image edge."""
    nuclei, cells = np.asarray(nuclei), np.asarray(cells)
    if nuclei.shape != cells.shape:
        raise SegmentError(f"nuclei {nuclei.shape} and cells {cells.shape} differ in shape")
    nucleus_ids = np.unique(nuclei[nuclei > 0])
    cell_ids = np.unique(cells[cells > 0])
    n_ids, c_ids, common = _overlaps(nuclei, cells)
    nucleus_of_cell = _best_partner(c_ids, n_ids, common)
    cell_of_nucleus = _best_partner(n_ids, c_ids, common)
    pairs = sorted((c, n) for c, n in nucleus_of_cell.items() if cell_of_nucleus.get(n) == c)
    border = set()
    if exclude_border:
        border = set(touching_border(cells).tolist()) | {-int(n) for n in touching_border(nuclei)}
    kept = [(c, n) for c, n in pairs if c not in border and -n not in border]
    cell_lut = np.zeros(int(cells.max()) + 1, np.int32)
    nucleus_lut = np.zeros(int(nuclei.max()) + 1, np.int32)
    for new, (c, n) in enumerate(kept, start=1):
        cell_lut[c] = new
        nucleus_lut[n] = new
    new_cells = cell_lut[cells]
    new_nuclei = nucleus_lut[nuclei]
    new_nuclei[new_nuclei != new_cells] = 0  # a nucleus is clipped to its own cell
    cytoplasm = np.where(new_nuclei > 0, 0, new_cells).astype(np.int32)
    paired_cells = {c for c, _ in pairs}
    paired_nuclei = {n for _, n in pairs}
    counts = {"nuclei_found": len(nucleus_ids), "cells_found": len(cell_ids), "objects": len(kept),
              "cells_without_nucleus": int(len(set(cell_ids.tolist()) - paired_cells)),
              "nuclei_without_cell": int(len(set(nucleus_ids.tolist()) - paired_nuclei)),
              "border_objects": len(pairs) - len(kept)}
    return RelatedObjects(new_nuclei, new_cells, cytoplasm, counts)


def consecutive_labels(labels: np.ndarray) -> np.ndarray:
    """The same objects numbered 1..n (Cellpose's metrics index objects by label value)."""
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32)
    return inverse if labels.min() == 0 else inverse + 1
