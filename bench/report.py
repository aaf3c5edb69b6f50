"""Time and size of a plate's audit report for a generated 384-well plate (9 sites per well, real and
virtual stains): result tables of that size, full-size figures, 1 % of sites flagged per stage.

    python bench/report.py --out bench/results/report.json

Targets (issue 7): rendering <= 30 s, report.html <= 20 MB.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from brightpaint import report as R
from brightpaint.layout import PlateFolder

REPO = Path(__file__).resolve().parents[1]
CHANNELS = ("BF", "DNA", "CYTO", "DAMAGE")


def figure(path: str | Path, height: int, width: int, rng: np.random.Generator) -> None:
    """A full-size RGB figure: smooth colour fields with fine noise (compresses like a photo-ish plot)."""
    coarse = rng.random((height // 50, width // 50, 3))
    smooth = np.kron(coarse, np.ones((50, 50, 1)))
    pixels = np.clip(smooth * 230 + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def generated_plate(folder: PlateFolder, sites_per_well: int = 9, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    wells = [f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)]
    sites = pd.DataFrame([(w, s) for w in wells for s in range(1, sites_per_well + 1)],
                         columns=["well", "site"])
    flagged = rng.random(len(sites)) < 0.01
    for path in (folder.qc_sites, folder.segment_sites, folder.features_sites, folder.stain_metrics,
                 folder.match("summary"), folder.illum_figure("BF")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    sites.assign(n_images=8, status=np.where(flagged, "flagged", "ok"),
                 reasons=np.where(flagged, "saturated DNA", "")).to_csv(folder.qc_sites, index=False)
    channels = np.tile(["BF"] * 5 + ["DNA", "CYTO", "DAMAGE"], len(sites))
    images = sites.loc[sites.index.repeat(8)].assign(channel=channels, z=0, flag="")
    images.to_parquet(folder.qc_images)
    sites.assign(plane=rng.integers(0, 5, len(sites)), flag=np.where(flagged, "out_of_focus", ""),
                 reason=np.where(flagged, "no plane is sharp", "")).to_parquet(folder.focus)
    both = pd.concat([sites.assign(source="real"), sites.assign(source="virtual")], ignore_index=True)
    skipped = rng.random(len(both)) < 0.01
    for path, count in ((folder.segment_sites, "objects"), (folder.features_sites, "cells")):
        table = both.assign(status=np.where(skipped, "skipped", "ok"),
                            reason=np.where(skipped, "no focus plane", ""),
                            **{count: rng.integers(50, 400, len(both))})
        table.to_csv(path, index=False)
    metrics = pd.concat([sites.assign(channel=c, split="unseen") for c in ("DNA", "CYTO", "DAMAGE")])
    for name in ("pcc", "ssim", "psnr", "nmae"):
        metrics[name] = rng.random(len(metrics))
    metrics.to_parquet(folder.stain_metrics)
    pd.DataFrame({"source": ["real", "virtual"], "nsc": [0.9, 0.7]}).to_parquet(folder.match("summary"))
    pd.DataFrame({"treatment": [f"cpd{i}" for i in range(300)], "neighbour": "cpd0",
                  "similarity": rng.random(300)}).to_parquet(folder.match("neighbours"))
    for channel in CHANNELS:
        figure(folder.illum_figure(channel), 1600, 3200, rng)
    for path in (folder.focus_figure, folder.segment_overlay, folder.stain_examples):
        figure(path, 2400, 3600, rng)
    return len(sites)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "report.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-report-") as work:
        folder = PlateFolder.of(work, "G1")
        n_sites = generated_plate(folder)
        start = time.perf_counter()
        prov = R.provenance({"screen": "generated"}, REPO, {}, Path(work) / "benchmarks", None)
        info = {"plate": "G1", "batch": "B1", "cell_type": "flat", "role": "both"}
        report = R.plate_report(folder.results(CHANNELS).existing(), info, prov)
        html = R.render_plate_report(report)
        Path(folder.report_html).write_text(html)
        seconds = time.perf_counter() - start
    result = {"host": platform.node(), "wells": 384, "sites": n_sites, "flags": len(report["flags"]),
              "render_seconds": round(seconds, 2), "report_mb": round(len(html.encode()) / 2**20, 2),
              "targets": {"render_seconds": 30, "report_mb": 20}}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
