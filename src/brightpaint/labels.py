"""Segmentation labels in OME-Zarr (NGFF 0.5 `labels`), readable by ome-zarr-py and napari.

A plate's labels.zarr is an HCS plate laid out like its other stores. Each field's image is the
plate's virtual-stain image (hard links to virtual.zarr's chunks: no pixels are copied, and every
plate has one), and its `labels` group holds one label image per object kind and input, named
`<objects>_<source>` (`nuclei_real`, `cells_virtual`, `cytoplasm_virtual`, ...). Label images have
the parent's axes (t, c, z, y, x) with one channel and one plane, uint32, 0 = background; object k
of `nuclei_<source>`, `cells_<source>` and `cytoplasm_<source>` is one cell.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from .ingest import AXES, field_path
from .io import well_row_column

LABEL_COLOURS = {"nuclei": (0, 128, 255, 255), "cells": (0, 200, 0, 255), "cytoplasm": (255, 160, 0, 255)}


def label_name(objects: str, source: str) -> str:
    return f"{objects}_{source}"


def write_field_labels(field: zarr.Group, labels: dict[str, np.ndarray], properties: dict | None = None
                       ) -> None:
    """Write 2-D label images into a field image group's `labels` group (created or extended)."""
    # at call time: ome_zarr takes ~0.6 s to import (see ingest.write_sites)
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    group = field.require_group("labels")
    names = list(dict.fromkeys([*group.attrs.get("ome", {}).get("labels", []), *labels]))
    for name, image in labels.items():
        image = np.asarray(image)
        if image.ndim != 2 or not np.issubdtype(image.dtype, np.integer) or (image.size and image.min() < 0):
            raise ValueError(f"labels {name!r}: need a 2-D image of non-negative integers, got "
                             f"{image.dtype} {image.shape}")
        label_group = group.require_group(name)
        array = label_group.create_array("0", shape=(1, 1, 1, *image.shape), dtype="uint32",
                                         chunks=(1, 1, 1, *image.shape), fill_value=0, overwrite=True,
                                         dimension_names=[a["name"] for a in AXES])
        array[0, 0, 0] = image.astype(np.uint32)
        write_multiscales_metadata(
            label_group, datasets=[{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0, 1.0]}]}],
            fmt=FormatV05(), axes=AXES, name=name)
        colour = LABEL_COLOURS.get(name.split("_")[0], (255, 255, 255, 255))
        write_label_metadata(group, name, colors=[{"label-value": 0, "rgba": [0, 0, 0, 0]}],
                             fmt=FormatV05(), source={"image": "../../"},
                             **({"properties": [properties]} if properties else {}))
        group[name].attrs.update({"brightpaint": {"colour": list(colour), "objects": int(image.max())}})
    attrs = dict(group.attrs)
    attrs["ome"] = {"version": FormatV05().version, "labels": names}
    group.attrs.update(attrs)


def _field(store: str | Path, well: str, site: int) -> Path:
    row, column = well_row_column(well)
    return Path(store) / row / column / field_path(site)


def label_names(store: str | Path, well: str, site: int) -> list[str]:
    """Names of the label images of a site (empty when it has none)."""
    path = _field(store, well, site) / "labels"
    if not path.is_dir():
        return []
    return list(zarr.open_group(str(path), mode="r").attrs.get("ome", {}).get("labels", []))


def read_labels(store: str | Path, well: str, site: int, name: str) -> np.ndarray:
    """One 2-D label image of a site."""
    path = _field(store, well, site) / "labels" / name / "0"
    if not path.is_dir():
        raise KeyError(f"{store}: well {well} site {site} has no labels {name!r} "
                       f"(has {label_names(store, well, site)})")
    return np.asarray(zarr.open_array(str(path), mode="r")[0, 0, 0], np.int32)
