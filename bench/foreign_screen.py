"""A screen the demo is not, end to end, every stage scored against the generator's truth.

    python bench/foreign_screen.py [--workdir DIR] [--cores 2] [--out bench/results/foreign_screen.json]

The generator with options that make a screen unlike the demo: thin cells that are phase objects in
brightfield (least contrast at focus, `bf_absorption` 0.1), stains at the camera offset outside cells
(`stain_background` 0), other channel names (Hoechst / Phalloidin / gH2AX), another image size
(192 px), a LINCS-style plate map (controls `ctl_vehicle` / `ctl_pos`, treated wells `trt_cp`, no
target column) and a sheet without a batch column. The workflow runs on it with `screen:`,
`channels:`, the plate map's labels, the camera's offset and the demo's CPU-sized model budgets,
through every report. Scored per plate:

- focus: exact-plane rate on sites with cells (truth: the generator's focal plane), and by which rule;
- illumination: residual shading of each channel's function against the true flat field (1st..99th
  percentile range of their ratio; 0 = perfect, the identity's equals the field's own shading), and
  the camera offset the data allow against the true 100 ADU;
- denoising: per stain the decision and estimated gain, and the Pearson correlation with the clean
  truth of the workflow's output against its corrected input (never below it);
- virtual staining: held-out PCC per target (stain/metrics.parquet);
- segmentation, features, profiles, matching: cells measured, the matching summary, the verdict.

A measurement, not a test: it runs the whole workflow (about 10-20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import yaml
from report_json import emit

from brightpaint import report
from brightpaint.demo.screen import simulate_screen
from brightpaint.demo.spec import PlateSpec, ScreenSpec
from brightpaint.illumination import load_illumination, residual_shading
from brightpaint.layout import PlateFolder
from brightpaint.plate import fluorescence_plane, open_plate_source

REPO = Path(__file__).resolve().parents[1]
NAMES = {"DNA": "Hoechst", "CYTO": "Phalloidin", "DAMAGE": "gH2AX"}
CHANNELS = {"brightfield": "BF", "nuclei": "Hoechst", "cell": "Phalloidin",
            "fluorescence": ["Hoechst", "Phalloidin", "gH2AX"]}
LABELS = {"negcon": "ctl_vehicle", "poscon": "ctl_pos", "trt": "trt_cp"}
SPEC = ScreenSpec(plates=(PlateSpec("F1", "B1", "flat", "train", bf_absorption=0.1, stain_background=0.0),
                          PlateSpec("F2", "B1", "dense", "both", bf_absorption=0.1, stain_background=0.0)),
                  wells=24, sites=2, size=192, seed=11)
CAMERA_OFFSET = 100.0  # the generator's camera


def foreign_screen(folder: Path) -> Path:
    """The generated screen, rewritten as another lab would hand it over."""
    sheet = simulate_screen(folder, SPEC)
    for plate in SPEC.plates:
        manifest = folder / plate.plate / "manifest.csv"
        table = pd.read_csv(manifest)
        table.assign(channel=table["channel"].replace(NAMES)).to_csv(manifest, index=False)
        platemap = folder / plate.plate / "platemap.csv"
        table = pd.read_csv(platemap, keep_default_na=False)
        table = table.assign(control_type=table["control_type"].replace(LABELS)).drop(columns=["target"])
        table.to_csv(platemap, index=False)
    plates = pd.read_csv(sheet, sep="\t")
    plates.drop(columns=["batch"]).to_csv(sheet, sep="\t", index=False)
    return sheet


def config(workdir: Path, sheet: Path) -> Path:
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    settings = {"screen": str(sheet), "channels": CHANNELS,
                "platemap": {"control_types": {k: [v] for k, v in LABELS.items()}},
                "illumination": {"dark": CAMERA_OFFSET},
                # the demo's CPU-sized budgets (config/demo.yaml), nothing else of the demo's
                "denoise": demo["denoise"], "stain": {"model": demo["stain"]["model"]},
                "generalisation": {"model": demo["generalisation"]["model"]},
                "threads": demo["threads"]}
    path = workdir / "foreign.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def focus_scores(folder: PlateFolder, truth: Path) -> dict:
    focus = pd.read_parquet(folder.focus)
    sites = pd.read_csv(truth / "sites.csv")
    merged = focus.merge(sites, on=["well", "site"], validate="one_to_one")
    cells = merged[merged["n_cells"] >= 2]
    return {"sites_with_cells": len(cells),
            "exact": float((cells["plane"] == cells["focal_plane"]).mean()),
            "by_inversion": float((cells["basis"] == "contrast_inversion").mean())}


def illumination_scores(folder: PlateFolder, truth: Path) -> dict:
    table = report.illumination_table({c: folder.illum(c).replace(".npy", ".json")
                                       for c in ["BF", *CHANNELS["fluorescence"]]})
    out = {}
    for row in table.itertuples():
        original = {v: k for k, v in NAMES.items()}.get(row.channel, row.channel)
        true = np.load(truth / f"flatfield_{original}.npy")
        flat = load_illumination(folder.illum(row.channel)).flat
        out[row.channel] = {"flat": row.flat, "residual_shading": residual_shading(flat, true),
                            "uncorrected_shading": residual_shading(np.ones_like(true), true),
                            "reason": row.reason, "darkest_level": row.darkest_level}
    offset = report.camera_offset_table(table, "BF")
    out["camera_offset"] = {"configured": CAMERA_OFFSET, "true": CAMERA_OFFSET,
                            **{k: v for k, v in offset.iloc[0].to_dict().items() if k != "dark"}}
    return out


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def denoise_scores(folder: PlateFolder, truth: Path, n_sites: int = 8) -> dict:
    sources = folder.sources_on_disk()
    if sources.denoised is None:
        return {}
    assessment = report.denoise_assessment(sources.denoised).set_index("channel")
    output = open_plate_source(sources, "BF")
    corrected = open_plate_source(sources, "BF", use_denoised=False)
    sites = pd.read_csv(truth / "sites.csv")
    sites = sites[sites["n_cells"] >= 1].head(n_sites)
    out = {}
    for channel in assessment.index:
        original = {v: k for k, v in NAMES.items()}[channel]
        before, after = [], []
        for row in sites.itertuples():
            clean = tifffile.imread(truth / "clean" / f"{row.well}_s{row.site}_{original}.tif")
            before.append(_pcc(fluorescence_plane(corrected, row.well, row.site, channel), clean))
            after.append(_pcc(fluorescence_plane(output, row.well, row.site, channel), clean))
        out[channel] = {"apply": bool(assessment.loc[channel, "apply"]),
                        "estimated_gain_db": float(assessment.loc[channel, "estimated_gain_db"]),
                        "pcc_with_truth_input": float(np.mean(before)),
                        "pcc_with_truth_output": float(np.mean(after)), "sites": len(sites)}
    return out


def stain_scores(folder: PlateFolder) -> dict:
    if not Path(folder.stain_metrics).is_file():
        return {}
    metrics = pd.read_parquet(folder.stain_metrics)
    held_out = metrics[metrics["split"] != "train"] if "split" in metrics else metrics
    return {f"{channel}_pcc": float(group["pcc"].mean()) for channel, group in held_out.groupby("channel")}


def run(workdir: Path, cores: int) -> dict:
    screen = workdir / "screen"
    sheet = foreign_screen(screen)
    config_path = config(workdir, sheet)
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores",
                             str(cores), "--configfile", str(config_path)], cwd=workdir,
                            capture_output=True, text=True)
    seconds = time.time() - start
    out: dict = {"spec": {"plates": [p.__dict__ for p in SPEC.plates], "wells": SPEC.wells,
                          "sites": SPEC.sites, "size": SPEC.size}, "channels": CHANNELS,
                 "control_labels": LABELS, "workflow_seconds": round(seconds, 1),
                 "returncode": result.returncode}
    if result.returncode != 0:
        out["error"] = (result.stdout + result.stderr)[-4000:]
        return out
    plates = {}
    for plate in SPEC.plates:
        folder = PlateFolder(str(workdir / "results" / "plates" / plate.plate))
        truth = screen / "truth" / plate.plate
        verdict = json.loads(Path(folder.report_json).read_text()).get("verdict")
        plates[plate.plate] = {"focus": focus_scores(folder, truth),
                               "illumination": illumination_scores(folder, truth),
                               "denoise": denoise_scores(folder, truth),
                               "virtual_stains": stain_scores(folder),
                               "cells_measured": int(pd.read_csv(folder.features_sites)["cells"].sum()),
                               "verdict": verdict}
    out["plates"] = plates
    summary = pd.read_parquet(workdir / "results" / "screen" / "match" / "summary.parquet")
    out["screen_matching"] = {f"{r.source}: {r.metric}": (None if pd.isna(r.value) else float(r.value))
                              for r in summary.itertuples()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to run (default: a temporary folder, removed)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report_ = run(args.workdir, args.cores)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="foreign-screen-"))
        try:
            report_ = run(workdir, args.cores)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    emit(report_, args.out)


if __name__ == "__main__":
    main()
