"""Writing the demo screen in the input contract (images, manifests, plate maps, screen sheet) with
its truth, and a screen's description without pixels (for planning a workflow's size)."""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage

from ..io import MANIFEST_COLUMNS, PLATEMAP_COLUMNS, SHEET_COLUMNS
from .brightfield import DEFOCUS_BLUR, PHASE_CONTRAST, PSF_SIGMA
from .camera import plate_optics
from .cells import CELL_TYPES
from .fluorescence import FLUORESCENCE_PSF
from .site import FOCUS_JITTER, simulate_site
from .spec import BRIGHTFIELD, CHANNELS, FLUORESCENCE, MAX_WELLS, ScreenSpec, screen_layout
from .treatments import (
    COMPOUNDS,
    MOA_EFFECTS,
    POSITIVE_CONTROL,
    plate_map,
    plate_wells,
    screen_well_phenotype,
)


def _image_name(well: str, site: int, channel: str, z: int) -> str:
    return f"images/{well}_s{site}_{channel}_z{z:02d}.tif"


def _write_tiff(path: Path, image: np.ndarray, compress: bool = False) -> None:
    # no datetime/software tags vary between runs, so identical arrays give identical bytes
    if compress:
        tifffile.imwrite(path, image, compression="zlib", compressionargs={"level": 1})
    else:
        tifffile.imwrite(path, image)


def _write_well(outdir: str, spec: ScreenSpec, plate: str, well: str) -> tuple[list, list]:
    """Render and write all sites of one well; returns the site and cell truth rows."""
    plate_spec = next(p for p in spec.plates if p.plate == plate)
    with_fluorescence = plate_spec.role != "apply"
    plate_dir = Path(outdir) / plate
    truth_dir = Path(outdir) / "truth" / plate
    site_rows, cell_rows = [], []
    for site in range(1, spec.sites + 1):
        s = simulate_site(spec, plate, well, site, fluorescence=with_fluorescence)
        for (channel, z), image in s.images.items():
            _write_tiff(plate_dir / _image_name(well, site, channel, z), image)
        for channel, image in s.clean.items():
            _write_tiff(truth_dir / "clean" / f"{well}_s{site}_{channel}.tif", image, True)
        _write_tiff(truth_dir / "masks" / f"{well}_s{site}_nuclei.tif", s.labels.nuclei, True)
        _write_tiff(truth_dir / "masks" / f"{well}_s{site}_cells.tif", s.labels.cells, True)
        m = len(s.labels.kept)
        nucleus_area = np.bincount(s.labels.nuclei.ravel(), minlength=m + 1)[1:]
        cell_area = np.bincount(s.labels.cells.ravel(), minlength=m + 1)[1:]
        centroids = ndimage.center_of_mass(np.ones_like(s.labels.nuclei), s.labels.nuclei,
                                           np.arange(1, m + 1)) if m else []
        site_rows.append({
            "well": well, "site": site, "focal_plane": s.focal_plane,
            "focus_position": round(s.focus_position, 4),
            "focus_offset": round(s.focus_position - s.focal_plane, 4),
            "n_cells": m, "n_pyknotic": int(s.pyknotic.sum()),
            "mean_nucleus_area": float(nucleus_area.mean()) if m else 0.0,
            "mean_cell_area": float(cell_area.mean()) if m else 0.0,
            "mean_foci": float(s.foci_counts[1:].mean()) if m else 0.0,
        })
        for i in range(m):
            cell_rows.append((well, site, i + 1, round(centroids[i][0], 2),
                              round(centroids[i][1], 2), int(nucleus_area[i]), int(cell_area[i]),
                              int(s.foci_counts[i + 1]), bool(s.pyknotic[i])))
    return site_rows, cell_rows


def _write_well_task(args):
    return _write_well(*args)


def _write_table(df: pd.DataFrame, path: Path, sep: str = ",") -> None:
    """Write-then-rename, so a reader never sees half a table."""
    partial = path.with_name(f".{path.name}.partial")
    df.to_csv(partial, sep=sep, index=False, float_format="%.6g", lineterminator="\n")
    os.replace(partial, path)


TRUTH_FILES = {
    "screen.json": "this file: the spec, seed, channel list, acquisition model, cell types, "
                   "compounds/MoAs/targets and a description of every truth file",
    "{plate}/sites.csv": "per site: focal_plane (integer brightfield plane nearest the true "
                         "focus, never the first or last), focus_position (true focus in plane "
                         "units), focus_offset, n_cells, n_pyknotic, mean_nucleus_area, "
                         "mean_cell_area (px, from the masks), mean_foci (DAMAGE foci per nucleus)",
    "{plate}/cells.csv": "per cell: well, site, label (id in both masks), nucleus centroid y/x, "
                         "nucleus_area, cell_area (px), n_foci, pyknotic",
    "{plate}/platemap_truth.csv": "plate map + dose_level (0.5 low, 1 high), toxic flag, the "
                                  "phenotype parameters used per well (pheno_*: factors relative "
                                  "to the untreated cell type; pheno_foci_rate = mean foci per "
                                  "nucleus, pheno_pyknotic_fraction), batch, cell_type and the "
                                  "per-channel batch factors (batch_factor_*)",
    "{plate}/illumination.json": "per channel: dark offset (ADU), gain (photons per clean "
                                 "unit), read noise (ADU), background (clean units), batch "
                                 "factor, flat-field centre and corner/centre ratio; ADU = "
                                 "Poisson(gain*(clean+background)*flat*batch) + "
                                 "N(0, read_noise^2) + dark, rounded, clipped to uint16",
    "{plate}/flatfield_{channel}.npy": "float32, mean 1: the exact multiplicative illumination "
                                       "field applied to that channel (all channels, all plates)",
    "{plate}/clean/{well}_s{site}_{channel}.tif": "float32 clean image before background, "
                                                  "illumination, batch and noise (DNA, CYTO, "
                                                  "DAMAGE, through the PSF; BF = "
                                                  "exactly in focus, background 1); zlib TIFF",
    "{plate}/masks/{well}_s{site}_nuclei.tif": "uint16 nucleus instance labels (0 background)",
    "{plate}/masks/{well}_s{site}_cells.tif": "uint16 cell instance labels; cell k contains "
                                              "nucleus k",
}


def simulate_screen(outdir: str | os.PathLike, spec: ScreenSpec | None = None,
                    workers: int = 1) -> Path:
    """Write the demo screen (images, manifests, plate maps, truth) under `outdir` and return the
    path of its screen sheet, `outdir/plates.tsv`, which is written last."""
    spec = spec if spec is not None else ScreenSpec()
    if not isinstance(spec, ScreenSpec):
        raise ValueError("spec: must be a ScreenSpec (see spec_from_config)")
    if isinstance(workers, bool) or not isinstance(workers, Integral) or workers < 1:
        raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sheet = outdir / "plates.tsv"
    if sheet.exists():  # a crash below must not leave an old sheet pointing at new files
        sheet.unlink()

    layout = screen_layout(spec)
    wells = plate_wells(spec.wells)
    pmap = plate_map(spec.wells)
    for p in spec.plates:
        for sub in (outdir / p.plate / "images", outdir / "truth" / p.plate / "clean",
                    outdir / "truth" / p.plate / "masks"):
            sub.mkdir(parents=True, exist_ok=True)

    tasks = [(str(outdir), spec, p.plate, w) for p in spec.plates for w in wells]
    if workers == 1 or len(tasks) == 1:
        results = [_write_well_task(t) for t in tasks]
    else:
        # fork where the OS has it: workers start fast and callers need no __main__ guard.
        # Every draw is keyed by (seed, plate, well, site), so the process count cannot change
        # the output.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            chunk = max(1, len(tasks) // (8 * workers))
            results = list(pool.map(_write_well_task, tasks, chunksize=chunk))

    cell_columns = ["well", "site", "label", "nucleus_y", "nucleus_x", "nucleus_area",
                    "cell_area", "n_foci", "pyknotic"]
    for i, p in enumerate(spec.plates):
        plate_results = results[i * len(wells):(i + 1) * len(wells)]
        plate_dir, truth_dir = outdir / p.plate, outdir / "truth" / p.plate
        channels = CHANNELS if p.role != "apply" else (BRIGHTFIELD,)
        manifest = [(p.plate, w, s, ch, z, _image_name(w, s, ch, z))
                    for w in wells for s in range(1, spec.sites + 1) for ch in channels
                    for z in (range(spec.z_planes) if ch == BRIGHTFIELD else (0,))]
        _write_table(pd.DataFrame(manifest, columns=MANIFEST_COLUMNS),
                     plate_dir / "manifest.csv")
        _write_table(pmap[PLATEMAP_COLUMNS], plate_dir / "platemap.csv")

        optics = plate_optics(spec, p.plate)
        truth_rows = []
        for w in wells:
            ph, row = screen_well_phenotype(spec, p.plate, w)
            phenotype = {f"pheno_{k}": v for k, v in asdict(ph).items() if k != "toxic"}
            truth_rows.append({**row.to_dict(), "well": w, "toxic": ph.toxic, **phenotype,
                               "batch": p.batch,
                               "cell_type": p.cell_type,
                               **{f"batch_factor_{ch}": optics[ch].batch_factor
                                  for ch in CHANNELS}})
        truth = pd.DataFrame(truth_rows)
        truth = truth[["well", *[c for c in truth.columns if c != "well"]]]
        _write_table(truth, truth_dir / "platemap_truth.csv")
        _write_table(pd.DataFrame([r for sites, _ in plate_results for r in sites]),
                     truth_dir / "sites.csv")
        _write_table(pd.DataFrame([r for _, cells in plate_results for r in cells],
                                  columns=cell_columns), truth_dir / "cells.csv")
        illumination = {}
        for ch, o in optics.items():
            np.save(truth_dir / f"flatfield_{ch}.npy", o.flat)
            illumination[ch] = {"dark_offset": o.dark, "gain": o.gain,
                                "read_noise": o.read_noise, "background": o.background,
                                "batch_factor": o.batch_factor,
                                "flatfield": f"flatfield_{ch}.npy",
                                "optical_centre_yx": [round(c, 4) for c in o.centre],
                                "corner_centre_ratio": round(o.corner_ratio, 4)}
        (truth_dir / "illumination.json").write_text(json.dumps(
            {"model": TRUTH_FILES["{plate}/illumination.json"], "channels": illumination},
            indent=2) + "\n")

    screen = {
        "spec": asdict(spec),
        "seed": spec.seed,
        "channels": {"brightfield": BRIGHTFIELD, "fluorescence": list(FLUORESCENCE)},
        "wells": wells,
        "dose_unit": "uM",
        "fluorescence": {"psf_sigma_px": FLUORESCENCE_PSF},
        "brightfield": {"psf_sigma_px": PSF_SIGMA, "defocus_blur_px_per_plane": DEFOCUS_BLUR,
                        "phase_contrast_kappa": PHASE_CONTRAST, "focus_jitter": FOCUS_JITTER},
        "cell_types": {k: asdict(v) for k, v in CELL_TYPES.items()},
        "compounds": [asdict(c) for c in (*COMPOUNDS, POSITIVE_CONTROL)],
        "moa_effects": MOA_EFFECTS,
        "truth_files": TRUTH_FILES,
    }
    (outdir / "truth" / "screen.json").write_text(json.dumps(screen, indent=2) + "\n")

    rows = [(p.plate, layout[p.plate]["manifest"], layout[p.plate]["platemap"], p.batch,
             p.cell_type, p.role) for p in spec.plates]
    _write_table(pd.DataFrame(rows, columns=SHEET_COLUMNS), sheet, sep="\t")
    return sheet


def describe_screen(outdir: str | os.PathLike, n_plates: int, wells: int = MAX_WELLS, sites: int = 9,
                    z_planes: int = 5, fluorescence: tuple[str, ...] = ("DNA", "CYTO", "DAMAGE"),
                    brightfield: str = "BF", train_every: int = 10) -> Path:
    """A screen's description without pixels: sheet, manifests and plate maps of `n_plates` plates
    (every `train_every`-th has fluorescence and role train, the others apply), for planning a
    workflow of that size (`snakemake -n`) without writing one image. Returns the sheet's path."""
    out = Path(outdir)
    platemap = plate_map(wells).drop(columns="dose_level")
    well_ids = list(platemap["well"])
    rows = []
    for i in range(n_plates):
        plate = f"S{i + 1:03d}"
        role = "train" if i % train_every == 0 else "apply"
        channels = [(brightfield, z) for z in range(z_planes)]
        if role == "train":
            channels += [(channel, 0) for channel in fluorescence]
        manifest = pd.DataFrame(
            [(plate, well, site, channel, z, f"images/{well}_s{site}_{channel}_z{z:02d}.tif")
             for well in well_ids for site in range(1, sites + 1) for channel, z in channels],
            columns=["plate", "well", "site", "channel", "z", "path"])
        (out / plate).mkdir(parents=True, exist_ok=True)
        manifest.to_csv(out / plate / "manifest.csv", index=False)
        platemap.to_csv(out / plate / "platemap.csv", index=False)
        rows.append((plate, f"{plate}/manifest.csv", f"{plate}/platemap.csv", f"B{i // 10 + 1}",
                     "flat", role))
    sheet = out / "plates.tsv"
    pd.DataFrame(rows, columns=["plate", "manifest", "platemap", "batch", "cell_type", "role"]).to_csv(
        sheet, sep="\t", index=False)
    return sheet
