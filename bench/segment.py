"""Segmentation time per site (nuclei + cells + relating, the shipped Cellpose networks) at 256,
512 and 1080 px, on CPU and, where torch sees one, on the GPU.

    python bench/segment.py --out bench/results/segment.json [--device auto] [--threads 2] [--sites 4] \
        [--tiles 224 0] [--batches auto 8]

With several `--tiles` (Cellpose's tile side, `segment.tile`; 0: the whole site as one tile) or
`--batches` (tiles per forward pass, `segment.batch`) each size is timed with each, and the masks are
compared with the first combination's (objects matched at IoU 0.5). CPU seconds are the process's
user + system time.

Sites are rendered by the demo generator at each size (so object density is realistic) and go
through `Segmenter.segment` in one batch, as a shard does; the time includes Cellpose's mask
dynamics on the CPU. Diameters are fixed at the generator's (calibration is once per plate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from brightpaint.demo.site import simulate_site
from brightpaint.demo.spec import PlateSpec, ScreenSpec
from brightpaint.demo.treatments import plate_wells
from brightpaint.inference import resolve_device, torch_threads
from brightpaint.segment.evaluate import instance_metrics
from brightpaint.segment.run import Segmenter
from brightpaint.segment.settings import SegmentSettings
from brightpaint.segment.weights import load_cellpose_model

REPO = Path(__file__).resolve().parents[1]


def sites_at(size: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    spec = ScreenSpec(plates=(PlateSpec("BENCH", "B", "flat", "train"),), wells=384, sites=1, size=size,
                      seed=5)
    wells = plate_wells(384)[::37][:n]
    out = []
    for well in wells:
        site = simulate_site(spec, "BENCH", well, 1)
        out.append((site.images[("DNA", 0)].astype(np.float32), site.images[("CYTO", 0)].astype(np.float32)))
    return out


def time_device(device: torch.device, sizes: list[int], n_sites: int, threads: int,
                tiles: list[int], batches: list) -> list[dict]:
    models = tuple(load_cellpose_model(REPO / "resources" / "cellpose" / f"{k}.pth", device)
                   for k in ("nuclei", "cells"))
    rows = []
    with torch_threads(threads):
        for size in sizes:
            sites = sites_at(size, n_sites)
            first = None
            for tile, batch in itertools.product(tiles, batches):
                segmenter = Segmenter(*models, SegmentSettings(tile=tile, batch=batch), nuclei_diameter=19.0,
                                      cell_diameter=50.0)
                segmenter.segment(sites_at(128, 1))  # warm-up
                usage = resource.getrusage(resource.RUSAGE_SELF)
                start = time.perf_counter()
                results = segmenter.segment(sites)
                seconds = time.perf_counter() - start
                done = resource.getrusage(resource.RUSAGE_SELF)
                cpu = done.ru_utime + done.ru_stime - usage.ru_utime - usage.ru_stime
                row = {"device": str(device), "size": size, "tile": tile, "batch": batch, "sites": len(sites),
                       "seconds_per_site": round(seconds / len(sites), 3),
                       "cpu_s_per_site": round(cpu / len(sites), 3),
                       "objects_per_site": float(np.mean([r.counts["objects"] for r in results]))}
                if first is None:
                    first = results
                else:  # the same cells as with the first tile side?
                    for objects in ("nuclei", "cells"):
                        ap = [instance_metrics(getattr(a, objects), getattr(b, objects))["ap50"]
                              for a, b in zip(first, results, strict=True)]
                        row[f"{objects}_ap50_vs_first"] = round(float(np.mean(ap)), 4)
                rows.append(row)
                print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "segment.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1080])
    parser.add_argument("--tiles", type=int, nargs="+", default=[SegmentSettings().tile])
    parser.add_argument("--batches", nargs="+", default=[SegmentSettings().batch],
                        type=lambda text: text if text == "auto" else int(text),
                        help="tiles per forward pass (segment.batch), each timed: e.g. auto 8")
    args = parser.parse_args()
    devices = [torch.device("cpu")]
    chosen = resolve_device(args.device, what="segmentation benchmark")
    if chosen.type != "cpu":
        devices.append(chosen)
    rows = [row for device in devices
            for row in time_device(device, args.sizes, args.sites, args.threads, args.tiles, args.batches)]
    result = {"benchmark": "segment", "host": platform.node(), "cpu_threads": args.threads,
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
