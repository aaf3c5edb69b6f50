"""What a real plate costs: the whole chain on generated 1080 px (or 2160 px) sites, rule by rule, CPU
seconds per site and the extrapolation to a 384-well x 9-site plate.

    python bench/plate_cost.py --size 1080 --wells 12 --sites 1 --out bench/results/plate_cost_1080.json
    python bench/plate_cost.py --size 2160 --wells 12 --sites 1 --until features_shard --out ...
    python bench/plate_cost.py --size 1080 --wells 6 --set features.batch_megapixels=4.7 ...  # a setting
    python bench/plate_cost.py --from-run DIR --size 1080 --wells 12 --sites 1   # summarise a run again

The demo generator writes one plate (real stains and brightfield, role `both`: the stain model is
trained on it and predicts it) of `--wells` wells x `--sites` sites of `--size` px with `--z-planes`
brightfield planes, and the workflow runs on it with the production defaults (config/config.yaml):
only the screen, its channel names and camera offset, and a stain-model budget of one short epoch
(training is measured per step and left out of the target) are set. `--until` stops early.

Every job's CPU seconds, wall seconds and peak RSS come from Snakemake's benchmark files. Each rule
is extrapolated to a 384 x 9 plate by what its cost grows with:
- `site`: the per-site rules (ingest, focus, denoising, prediction, segmentation, features and the
  stores' assembly) and the per-cell plate tables: CPU-s per measured site x 3,456 sites;
- `sample`: rules that read a bounded sample of sites (illumination: `illumination.max_sites` per
  channel; Cellpose's diameter calibration: `segment.diameter_sites`; the stain evaluation:
  `stain.eval_sites`): scaled by min(3,456, cap) / min(measured sites, cap);
- `plate`: once per plate whatever its size (validation, profiles and matching of a few wells,
  the report); kept as measured, an underestimate for profiles of a full plate's wells;
- `training`: model training (stain, Noise2Void, Cellpose, generalisation), left out of the
  target, reported as measured with its budget.
A job's fixed start (Python and library imports, ~2-4 s) is counted in its CPU seconds, so a small
run overstates the per-site figures of rules with many jobs per plate (one per shard).

With `--bare-cellprofiler N`, N sites per stain source of the finished run also go through bare
CellProfiler 5 (`cellprofiler -c -r -p PIPELINE`, the whole pipeline site by site) and through the
workflow's own feature extraction (and its opt-in tiled split), in the same process, for the
features / bare ratio (bench/features.py's measurement).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from report_json import emit
from runs import job_benchmarks

from brightpaint.demo.screen import simulate_screen
from brightpaint.demo.spec import PlateSpec, ScreenSpec

REPO = Path(__file__).resolve().parents[1]
FULL_PLATE_SITES = 384 * 9
TRAINING = {"stain_train", "denoise_train_plate", "denoise_train_screen", "segment_train",
            "generalisation_train"}
PLATE = {"validate_plate", "profiles_plate", "profiles_screen", "match_plate", "match_screen",
         "report_plate", "report_index", "features_pipeline", "generalisation_matrix",
         "generalisation_evaluate", "denoise_assess", "segment_evaluate"}


def sample_caps(config: dict) -> dict[str, int]:
    """Sites each sample-bounded rule reads at most, from the production defaults."""
    return {"illumination": int(config["illumination"]["max_sites"]),
            "segment_calibrate": int(config["segment"]["diameter_sites"]),
            "stain_evaluate": int(config["stain"]["eval_sites"])}


def with_setting(config: dict, setting: str) -> dict:
    """`config` with one `--set section.key=value` (value read as YAML) applied."""
    key, sep, value = setting.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set {setting!r}: give section.key=value")
    *sections, last = key.split(".")
    node = config
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = yaml.safe_load(value)
    return config


def run_plate(workdir: Path, args: argparse.Namespace) -> float:
    spec = ScreenSpec(plates=(PlateSpec("C1", "B1", "flat", "both"),), wells=args.wells, sites=args.sites,
                      size=args.size, z_planes=args.z_planes, seed=0)
    start = time.perf_counter()
    simulate_screen(workdir / "screen", spec, workers=args.cores)
    print(f"screen written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    config = {"screen": "screen/plates.tsv", "shards": args.shards,
              "channels": {"brightfield": "BF", "nuclei": "DNA", "cell": "CYTO",
                           "fluorescence": ["DNA", "CYTO", "DAMAGE"]},
              "illumination": {"dark": 100},  # the generator's camera offset
              "stain": {"model": {"max_epochs": 1, "steps_per_epoch": args.stain_steps}},
              # the generalisation matrix trains one model per group: a training study, not plate cost
              "generalisation": {"enabled": False}}
    for setting in args.set:
        config = with_setting(config, setting)
    (workdir / "bench.yaml").write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
               "--cores", str(args.cores), "--configfile", "bench.yaml"]
    if args.until:
        command += ["--until", *args.until]
    start = time.perf_counter()
    with open(workdir / "snakemake.log", "w") as log:
        result = subprocess.run(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit((workdir / "snakemake.log").read_text()[-4000:])
    return wall


def rule_costs(run: Path, measured_sites: int, caps: dict[str, int]) -> pd.DataFrame:
    jobs = job_benchmarks(run / "results")
    table = jobs.groupby("rule").agg(jobs=("job", "size"), cpu_s=("cpu_time", "sum"), wall_s=("s", "sum"),
                                     max_rss_mb=("max_rss", "max"))

    def grows_with(rule: str) -> str:
        if rule in TRAINING:
            return "training"
        if rule in caps:
            return "sample"
        return "plate" if rule in PLATE else "site"

    table["grows_with"] = [grows_with(rule) for rule in table.index]
    scale = []
    for rule, kind in table["grows_with"].items():
        if kind == "site":
            scale.append(FULL_PLATE_SITES / measured_sites)
        elif kind == "sample":
            cap = caps[rule]
            scale.append(min(FULL_PLATE_SITES, cap) / min(measured_sites, cap))
        else:
            scale.append(1.0)
    table["cpu_s_per_site"] = table["cpu_s"] / measured_sites
    table["plate_cpu_h"] = table["cpu_s"] * scale / 3600
    return table.round(3).sort_values("plate_cpu_h", ascending=False)


def bare_cellprofiler_ratio(run: Path, sites: int) -> dict:
    """bench/features.py's measurement on the finished plate, in a child process."""
    out = run / "features_bench.json"
    command = [sys.executable, str(REPO / "bench" / "features.py"),
               "--plate-dir", str(run / "results" / "plates" / "C1"),
               "--screen", str(run / "screen"), "--sites", str(sites), "--out", str(out)]
    subprocess.run(command, check=True, cwd=run, capture_output=True, env={**os.environ})
    return yaml.safe_load(out.read_text())


def summarise(run: Path, args: argparse.Namespace, wall: float | None) -> dict:
    defaults = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    measured = args.wells * args.sites
    table = rule_costs(run, measured, sample_caps(defaults))
    target = table[table["grows_with"] != "training"]
    per_site = target[target["grows_with"] == "site"]["cpu_s"].sum() / measured
    training = table[table["grows_with"] == "training"]["cpu_s"].sum()
    report = {"benchmark": "plate_cost", "machine": platform.node(), "cpus": os.cpu_count(),
              "note": args.note, "site_px": args.size, "z_planes": args.z_planes, "wells": args.wells,
              "sites_per_well": args.sites, "shards": args.shards, "until": args.until,
              "settings": args.set,
              "wall_seconds": None if wall is None else round(wall, 1),
              "plate_cpu_h_without_training": round(float(target["plate_cpu_h"].sum()), 2),
              "cpu_s_per_site_without_training": round(float(per_site), 2),
              "training_cpu_s_measured": round(float(training), 1),
              "stain_train_steps": args.stain_steps,
              "rules": table.reset_index().to_dict(orient="records")}
    if args.bare_cellprofiler:
        report["features_vs_bare_cellprofiler"] = bare_cellprofiler_ratio(run, args.bare_cellprofiler)
    print(table.to_string(), file=sys.stderr)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1080)
    parser.add_argument("--wells", type=int, default=12, help="wells run (>= 12: three negative controls)")
    parser.add_argument("--sites", type=int, default=1, help="sites per well")
    parser.add_argument("--z-planes", type=int, default=5)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--stain-steps", type=int, default=20, help="stain-model training steps")
    parser.add_argument("--until", nargs="*", default=[], help="rules to stop after (snakemake --until)")
    parser.add_argument("--bare-cellprofiler", type=int, default=0, metavar="N",
                        help="also time N sites per stain source through bare CellProfiler")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (else a temporary one)")
    parser.add_argument("--from-run", type=Path, help="summarise this finished run folder instead")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting over the production defaults, e.g. features.batch_megapixels=4.7")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.from_run:
        emit(summarise(args.from_run, args, None), args.out)
        return
    with tempfile.TemporaryDirectory(prefix="bench-plate-cost-") as tmp:
        run = args.keep or Path(tmp)
        run.mkdir(parents=True, exist_ok=True)
        wall = run_plate(run, args)
        emit(summarise(run, args, wall), args.out)


if __name__ == "__main__":
    main()
