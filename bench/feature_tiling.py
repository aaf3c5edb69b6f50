"""When tiling sites pays for CellProfiler: the split pipeline (site half site by site, tiled half on
tiles of several sites) against the whole pipeline site by site, by site size, on a finished plate.

    python bench/feature_tiling.py --plate-dir RUN/results/plates/C1 --sides 1080 720 540 360 256 \
        --megapixels 4.7 --out bench/results/feature_tiling.json

The plate's real-stain sites (and their label images) are cut into square pieces of each side,
whole objects and cut ones alike, label values renumbered from 1 in every piece (the same number
in nuclei, cells and cytoplasm), and about the same pixels (`--megapixels`) go through
`extract_features` both ways in this process. `split_to_whole_cpu` < 1 means tiling saves; the
side where it crosses 1, in sites per tile, is what `extract_features`' `min_sites_per_tile` rests
on. CPU seconds are this process's plus CellProfiler's (a child).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from features import timed
from report_json import emit
from skimage.segmentation import relabel_sequential

from brightpaint.features.extract import extract_features, measurable_sites, plate_site_readers
from brightpaint.features.pipelines import PIPELINE, SITE_PIPELINE, TILED_PIPELINE
from brightpaint.features.tiles import TILE_GAP, TILE_PIXELS
from brightpaint.layout import PlateFolder
from brightpaint.plate import open_plate_source

PIECES = 1000  # piece numbers of a site: site * PIECES + piece


def piece_readers(read_images, read_labels, side: int):
    """Readers of the pieces of `side` px of each site (site number site * PIECES + piece)."""
    images_of, labels_of = lru_cache(maxsize=2)(read_images), lru_cache(maxsize=2)(read_labels)

    def window(plate, well, site, kind):
        whole, piece = divmod(int(site), PIECES)
        height, width = next(iter(images_of(plate, well, whole, kind).values())).shape
        columns = width // side
        y, x = (piece // columns) * side, (piece % columns) * side
        if y + side > height:
            raise ValueError(f"piece {piece} of {side} px beyond the site")
        return whole, np.s_[y:y + side, x:x + side]

    def images(plate, well, site, kind):
        whole, crop = window(plate, well, site, kind)
        return {c: image[crop] for c, image in images_of(plate, well, whole, kind).items()}

    def labels(plate, well, site, kind):
        whole, crop = window(plate, well, site, kind)
        pieces = {o: np.asarray(label[crop]) for o, label in labels_of(plate, well, whole, kind).items()}
        # one renumbering for every compartment, so nucleus, cell and cytoplasm k stay one cell
        stacked = np.stack(list(pieces.values()))
        renumbered = relabel_sequential(stacked)[0]
        return {o: renumbered[i] for i, o in enumerate(pieces)}

    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plate-dir", type=Path, required=True)
    parser.add_argument("--sides", type=int, nargs="+", default=[1080, 720, 540, 360, 256])
    parser.add_argument("--megapixels", type=float, default=4.7, help="pixels measured per side and way")
    parser.add_argument("--tile-pixels", type=int, default=TILE_PIXELS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    folder = PlateFolder(args.plate_dir)
    source = open_plate_source(folder.sources_on_disk(), "BF")
    segment_sites = pd.read_csv(folder.segment_sites, keep_default_na=False)
    sites, _ = measurable_sites(source.plate, segment_sites, segment_sites["well"], ["real"])
    read_images, read_labels = plate_site_readers(source, folder.virtual, folder.labels)
    height, width = next(iter(read_images(*sites[0]).values())).shape
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-feature-tiling-") as work:
        work = Path(work)
        timed(extract_features, sites[:1], read_images, read_labels, PIPELINE, work / "warm")
        for side in args.sides:
            per_site = (height // side) * (width // side)
            wanted = max(1, round(args.megapixels * 1e6 / side ** 2))
            chosen = [(p, w, s * PIECES + i, k) for p, w, s, k in sites for i in range(per_site)][:wanted]
            readers = piece_readers(read_images, read_labels, side)
            (cells, _, _), split_cpu, split_wall = timed(
                extract_features, chosen, *readers, SITE_PIPELINE, work / f"split{side}",
                tiled_pipeline=TILED_PIPELINE, tile_pixels=args.tile_pixels)
            (whole, _, _), whole_cpu, whole_wall = timed(extract_features, chosen, *readers, PIPELINE,
                                                         work / f"whole{side}")
            if len(cells) != len(whole):
                raise SystemExit(f"{side} px: the split run measured {len(cells)} objects, "
                                 f"the whole one {len(whole)}")
            row = {"side": side, "sites": len(chosen), "cells": len(whole),
                   "sites_per_tile": args.tile_pixels // (side + TILE_GAP) ** 2,
                   "split_cpu_s_per_megapixel": round(split_cpu / (len(chosen) * side ** 2 / 1e6), 3),
                   "whole_cpu_s_per_megapixel": round(whole_cpu / (len(chosen) * side ** 2 / 1e6), 3),
                   "split_to_whole_cpu": round(split_cpu / whole_cpu, 3),
                   "split_wall_s": round(split_wall, 1), "whole_wall_s": round(whole_wall, 1)}
            print(row, flush=True)
            rows.append(row)
    emit({"host": platform.node(), "plate": source.plate, "site_shape": [height, width],
          "tile_pixels": args.tile_pixels, "by_side": rows}, args.out)


if __name__ == "__main__":
    main()
