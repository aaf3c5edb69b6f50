"""Peak memory (RSS) of every rule on generated plates of different sizes.

For each well count, the demo generator writes a screen of two plates (one train, one apply) with that
many wells, and the workflow runs on it with the demo config (stain training shortened: its
memory is set by `stain.model.max_sites` and the patch size, not by the epochs). Snakemake's
benchmark files give each job's max RSS; the JSON lists the largest per rule and well count, so a
rule whose memory grows with the plate shows it.

    python bench/memory.py --wells 24 384 --out bench/results/memory.json
    python bench/memory.py --wells 24 96 --until segment_plate     # quicker: up to segmentation

Target (issue 8): every per-site job's memory is bounded independent of the plate size.
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

import yaml
from report_json import emit
from runs import job_benchmarks

from brightpaint.demo.screen import simulate_screen
from brightpaint.demo.spec import PlateSpec, ScreenSpec

REPO = Path(__file__).resolve().parents[1]


def run_screen(workdir: Path, wells: int, sites: int, size: int, cores: int, until: list[str]) -> dict:
    spec = ScreenSpec(plates=(PlateSpec("M1", "B1", "flat", "train"), PlateSpec("M2", "B1", "flat", "apply")),
                      wells=wells, sites=sites, size=size, z_planes=5, seed=0)
    simulate_screen(workdir / "screen", spec, workers=cores)
    # the demo config (its camera, budgets) on this screen, with a one-epoch stain model
    config = {"screen": "screen/plates.tsv", "stain": {"model": {"max_epochs": 1, "steps_per_epoch": 10}}}
    (workdir / "bench.yaml").write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
               "--cores", str(cores), "--configfile", str(REPO / "config" / "demo.yaml"), "bench.yaml"]
    if until:
        command += ["--until", *until]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return {"wells": wells, "sites_per_well": sites, "site_px": size,
            "wall_seconds": round(time.perf_counter() - start, 1), "rules": rule_peaks(workdir)}


def rule_peaks(workdir: Path) -> dict:
    """Largest max RSS (MB) and seconds per rule over the jobs whose benchmark files are in
    `workdir`/results/benchmarks (a finished run, or the part of a run that finished)."""
    jobs = job_benchmarks(workdir / "results")
    peaks = jobs.groupby("rule").agg(max_rss_mb=("max_rss", "max"), jobs=("job", "size"),
                                     max_seconds=("s", "max")).round(1)
    return {rule: {"max_rss_mb": float(row.max_rss_mb), "jobs": int(row.jobs),
                   "max_seconds": float(row.max_seconds)} for rule, row in peaks.iterrows()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wells", type=int, nargs="+", default=[24, 384])
    parser.add_argument("--sites", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--until", nargs="*", default=[], help="rules to stop after (snakemake --until)")
    parser.add_argument("--from-run", type=Path, nargs="*", default=[],
                        help="summarise these finished (or partly finished) run folders instead")
    parser.add_argument("--note", default="", help="a line stored with the results")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = [{"run": str(folder), "wells": args.wells[i] if i < len(args.wells) else None,
             "rules": rule_peaks(folder)} for i, folder in enumerate(args.from_run)]
    for wells in [] if args.from_run else args.wells:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            run = run_screen(Path(tmp), wells, args.sites, args.size, args.cores, args.until)
            print(f"{wells} wells: {run['wall_seconds']} s", file=sys.stderr)
            runs.append(run)
    growth = {}
    if len(runs) > 1:
        small, large = runs[0]["rules"], runs[-1]["rules"]
        growth = {rule: round(large[rule]["max_rss_mb"] / small[rule]["max_rss_mb"], 2)
                  for rule in small if rule in large and small[rule]["max_rss_mb"] > 0}
    report = {"benchmark": "memory", "machine": platform.node(), "note": args.note, "until": args.until,
              "runs": runs,
              "rss_ratio_largest_to_smallest_plate": growth}
    emit(report, args.out)


if __name__ == "__main__":
    main()
