"""Feature extraction CPU seconds per site, against bare CellProfiler 5 headless on the same sites,
and profile / matching time per plate, on a finished run's plate.

    python bench/features.py --plate-dir results/plates/P1 --out bench/results/features.json [--sites 8]

`ours` is `brightpaint.features.extract.extract_features` as the workflow calls it by default
(reading the stores, writing the TIFFs and LoadData CSVs, the whole pipeline site by site with the
buffered measurement store, reading the CSVs into the per-cell table); `split` is the opt-in tiled
split (`features.tiled_pipeline: auto`: the site half site by site, the tiled half on tiles of
sites); `bare` is the whole pipeline's
`cellprofiler -c -r -p ... --data-file ... --plugins-directory ...` command run by hand on the inputs
`ours` wrote, with CellProfiler's own HDF5 measurement store; `stock` is bare CellProfiler 5 as a lab
runs it: the same pipeline with CellProfiler's own MeasureGranularity (which also writes the
per-image summaries the project's MeasureGranularitySpectrum leaves out, docs/features.md). Each bare
run must write an Image.csv row per site and as many nuclei as `ours` found, or the bench stops.
CPU seconds are this process's plus its children's (CellProfiler is a child). ours / bare is what
the orchestration adds (goal <= 1.1); split / ours is what the tiled split costs (< 1: a gain); ours /
stock is the workflow's feature cost against bare CellProfiler's. Profiles and matching are timed
on the plate's own cell table (`plate_profiles`, then `match_profiles`).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd

from brightpaint.features.extract import extract_features, measurable_sites, plate_site_readers
from brightpaint.features.pipelines import PIPELINE, SITE_PIPELINE, TILED_PIPELINE
from brightpaint.features.runner import CELLPROFILER, PLUGINS, thread_environment
from brightpaint.io import read_platemap, read_screen_sheet
from brightpaint.layout import PlateFolder
from brightpaint.match import match_profiles
from brightpaint.plate import open_plate_source
from brightpaint.profiles import plate_profiles

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function, *args, **kwargs):
    cpu, wall = cpu_seconds(), time.perf_counter()
    result = function(*args, **kwargs)
    return result, cpu_seconds() - cpu, time.perf_counter() - wall


def stock_pipeline(out: Path) -> Path:
    """The shipped pipeline with CellProfiler 5's own MeasureGranularity (same settings)."""
    text = PIPELINE.read_text()
    assert text.count("MeasureGranularitySpectrum:[") == 1
    out.write_text(text.replace("MeasureGranularitySpectrum:[", "MeasureGranularity:["))
    return out


def bare_cellprofiler(pipeline: Path, loaddata: Path, out_dir: Path, sites: int, nuclei: int) -> None:
    command = [str(CELLPROFILER), "-c", "-r", "-p", str(pipeline), "--data-file", str(loaddata),
               "-o", str(out_dir), "-i", str(loaddata.parent), "-t", str(out_dir),
               "--plugins-directory", str(PLUGINS), "-L", "WARNING", "-e", "imageio_reader"]
    subprocess.run(command, check=True, capture_output=True, env=thread_environment(1))
    # CellProfiler exits 0 on a pipeline it could not load: check that it measured what ours did
    images, found = pd.read_csv(out_dir / "Image.csv"), pd.read_csv(out_dir / "Nuclei.csv")
    if len(images) != sites or len(found) != nuclei:
        raise SystemExit(f"bare CellProfiler ({pipeline.name}) measured {len(images)} sites and "
                         f"{len(found)} nuclei, not {sites} and {nuclei}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plate-dir", type=Path, default=REPO / "results" / "plates" / "P1")
    parser.add_argument("--screen", type=Path, default=REPO / "results" / "demo" / "screen")
    parser.add_argument("--sites", type=int, default=16, help="sites per stain source")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "features.json")
    args = parser.parse_args()

    folder = PlateFolder(args.plate_dir)
    source = open_plate_source(folder.sources_on_disk(), "BF")
    segment_sites = pd.read_csv(folder.segment_sites, keep_default_na=False)
    sites, _ = measurable_sites(source.plate, segment_sites, segment_sites["well"], ["real", "virtual"])
    chosen = []
    for kind in ("real", "virtual"):
        chosen += [s for s in sites if s[3] == kind][:args.sites]
    readers = plate_site_readers(source, folder.virtual, folder.labels)
    with tempfile.TemporaryDirectory(prefix="bench-features-") as work:
        work = Path(work)
        timed(extract_features, chosen[:1], *readers, PIPELINE, work / "warm")  # page cache, imports
        (cells, _, qc), ours_cpu, ours_wall = timed(extract_features, chosen, *readers, PIPELINE,
                                                    work / "ours")
        _, split_cpu, split_wall = timed(extract_features, chosen, *readers, SITE_PIPELINE, work / "split",
                                         tiled_pipeline=TILED_PIPELINE)
        loaddata = work / "ours" / "inputs" / "loaddata.csv"
        counts = (len(chosen), len(cells))
        (work / "bare").mkdir()
        _, bare_cpu, bare_wall = timed(bare_cellprofiler, PIPELINE, loaddata, work / "bare", *counts)
        (work / "stock").mkdir()
        stock = stock_pipeline(work / "stock.cppipe")
        _, stock_cpu, stock_wall = timed(bare_cellprofiler, stock, loaddata, work / "stock", *counts)
    n = len(chosen)
    result = {"host": platform.node(), "plate": source.plate, "sites": n, "cells": len(cells),
              "features_per_cell": cells.shape[1], "status": qc["status"].value_counts().to_dict()}
    for name, cpu, wall in (("ours", ours_cpu, ours_wall), ("split", split_cpu, split_wall),
                            ("bare", bare_cpu, bare_wall), ("stock", stock_cpu, stock_wall)):
        result[f"{name}_cpu_s_per_site"] = round(cpu / n, 3)
        result[f"{name}_wall_s_per_site"] = round(wall / n, 3)
    result.update({"orchestration_ratio_cpu": round(ours_cpu / bare_cpu, 3),
                   "split_to_ours_cpu": round(split_cpu / ours_cpu, 3),
                   "ours_to_stock_cellprofiler_cpu": round(ours_cpu / stock_cpu, 3)})
    print(json.dumps(result), flush=True)

    if not Path(folder.features_cells).is_file():  # a run stopped before the plate's table
        print(f"no {folder.features_cells}: profiles and matching not timed", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    plate_cells = pd.read_parquet(folder.features_cells)
    sheet = read_screen_sheet(args.screen / "plates.tsv")
    info = sheet[sheet["plate"] == source.plate].iloc[0].to_dict()
    platemap = read_platemap(info["platemap"])
    settings = {"normalise_samples": "Metadata_control_type == 'negcon'"}
    profiles, profile_cpu, profile_wall = timed(plate_profiles, plate_cells, platemap, info, settings)
    _, match_cpu, match_wall = timed(match_profiles, profiles["selected"], profiles["consensus"],
                                     profiles["normalised"], {})
    result.update({"plate_cells": len(plate_cells), "profiles_cpu_s_per_plate": round(profile_cpu, 2),
                   "profiles_wall_s_per_plate": round(profile_wall, 2),
                   "match_cpu_s_per_plate": round(match_cpu, 2),
                   "match_wall_s_per_plate": round(match_wall, 2)})
    print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
