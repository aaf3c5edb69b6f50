"""Which focus chooser finds the focal plane of which brightfield: the study behind focus.DEFAULT_METHOD.

    python bench/focus_kinds.py [--sites N] [--size PX] [--out bench/results/focus_kinds.json]

Generated stacks (the demo generator's scenes, both cell types, its camera noise) with the cells'
absorption scaled from the demo's (1.0: absorbing + phase) down to phase objects (0.1, 0) and, as the
other extreme, with no phase term (a pure absorber); each with 5 and 13 planes one plane apart, a 3-plane
stack spaced like JUMP's (-1 / 0 / +2) and stacks whose focus is the first plane (not bracketed). Then
the real stacks in ../shared/data: the JUMP Phenix field (-4 / 0 / +7 um) and the four sephace triplets.
Per kind and chooser: the exact-plane rate and, for contrast_inversion, how often it fell back to the
sharpest plane.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import tifffile
from report_json import emit

from brightpaint import focus
from brightpaint.demo.brightfield import defocus_series
from brightpaint.demo.camera import add_noise, plate_optics
from brightpaint.demo.site import FOCUS_JITTER, simulate_site
from brightpaint.demo.spec import PlateSpec, ScreenSpec
from brightpaint.demo.treatments import plate_wells

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PLANE_SETS = {"5 planes": [-2, -1, 0, 1, 2], "13 planes": list(range(-5, 8)),
              "3 planes (-1/0/+2)": [-1, 0, 2], "focus first (not bracketed)": [0, 1, 2, 3]}
KINDS = {"demo optics (absorption x 1)": (1.0, 1.0), "absorption x 0.3": (0.3, 1.0),
         "absorption x 0.1": (0.1, 1.0), "phase only (absorption x 0)": (0.0, 1.0),
         "no phase term (pure absorber)": (1.0, 0.0)}


def generated_scenes(n_wells: int, size: int, seed: int = 3):
    plates = (PlateSpec("F", "B1", "flat", "train"), PlateSpec("D", "B1", "dense", "train"))
    spec = ScreenSpec(plates=plates, wells=n_wells, sites=1, size=size, seed=seed)
    for plate in plates:
        optics = plate_optics(spec, plate.plate)["BF"]
        for well in plate_wells(n_wells):
            site = simulate_site(spec, plate.plate, well, 1, fluorescence=False)
            if len(site.labels.kept) >= 2:  # an empty field has no focus to find
                yield site, optics


def generated_stacks(scenes, absorption: float, phase: float, offsets: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    for site, optics in scenes:
        dz = np.asarray(offsets, dtype=float) - rng.uniform(-FOCUS_JITTER, FOCUS_JITTER)
        clean = defocus_series(site.absorption * np.float32(absorption), site.phase * np.float32(phase),
                               list(dz))
        yield np.stack([add_noise(rng, plane, optics) for plane in clean]), int(np.argmin(np.abs(dz)))


def real_stacks():
    jump = SHARED / "jump-brightfield-3plane"
    if jump.is_dir():
        yield "real: JUMP Phenix 20x (-4 / 0 / +7 um)", [(np.stack(
            [tifffile.imread(jump / f"brightfield_{n}.tiff") for n in ("under", "focus", "over")]), 1)]
    sephace = SHARED / "sephace-bf-zstack-dapi" / "tiff"
    if sephace.is_dir():
        stacks = []
        for field in ("Set1", "Set2"):
            for step in ("fine", "init"):
                files = sorted(sephace.glob(f"{field}_{step}_*-Z*.tif"),
                               key=lambda p: float(re.search(r"-Z([\d.]+)\.tif$", p.name).group(1)))
                stacks.append((np.stack([tifffile.imread(f) for f in files]), 1))
        yield "real: sephace 40x triplets (+-10, +-25 um)", stacks


def score(stacks) -> dict:
    rows = [(focus.focus_scores(stack), truth) for stack, truth in stacks]
    result = {"stacks": len(rows)}
    for method in focus.CHOOSERS:
        result[method] = round(float(np.mean([focus.select_focus_plane(s, method) == t for s, t in rows])), 3)
    result["inversion_fell_back"] = int(sum(focus.inversion_plane(s) is None for s, _ in rows))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=12, help="wells per cell type (one site each)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    scenes = list(generated_scenes(args.sites, args.size))
    kinds = {}
    for kind, (absorption, phase) in KINDS.items():
        for planes, offsets in PLANE_SETS.items():
            kinds[f"{kind}, {planes}"] = score(generated_stacks(scenes, absorption, phase, offsets))
    for kind, stacks in real_stacks():
        kinds[kind] = score(stacks)
    emit({"bench": "focus_kinds", "sites_per_kind": len(scenes), "size": args.size,
          "band": focus.DETAIL_BAND, "min_anticorrelation": focus.MIN_ANTICORRELATION, "kinds": kinds},
         args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
