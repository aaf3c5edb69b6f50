"""How long snakemake takes to plan a whole screen, and how many jobs it plans.

A generated screen description (sheet, manifests and plate maps; no pixels: a dry run reads none)
of N plates x 384 wells x 9 sites (5 brightfield planes; every 10th plate also has 3 fluorescence
channels and trains the virtual-staining model) is planned with `snakemake -n` for each plate count
and shard count asked for.

    python bench/dag.py --plates 10 50 100 --shards 2 8 --out bench/results/dag.json

Target (issue 8): 100 plates plan in <= 30 s; the job count grows with plates x shards.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report_json import emit

from brightpaint.demo.screen import describe_screen

REPO = Path(__file__).resolve().parents[1]


def plan(workdir: Path, sheet: Path, shards: int) -> dict:
    snakemake = Path(sys.executable).with_name("snakemake")
    start = time.perf_counter()
    result = subprocess.run([str(snakemake), "-s", str(REPO / "Snakefile"), "-n", "--quiet", "rules",
                             "--config", f"screen={sheet}", f"shards={shards}"],
                            cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    output = result.stdout + result.stderr
    counts = {name: int(n) for name, n in re.findall(r"^(\w+)\s+(\d+)$", output, flags=re.M)}
    total = counts.pop("total")
    return {"seconds": round(seconds, 2), "jobs": total, "jobs_per_rule": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plates", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--wells", type=int, default=384)
    parser.add_argument("--sites", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_plates in args.plates:
            workdir = Path(tmp) / f"screen{n_plates}"
            start = time.perf_counter()
            sheet = describe_screen(workdir / "screen", n_plates, wells=args.wells, sites=args.sites)
            described = time.perf_counter() - start
            for shards in args.shards:
                run = {"plates": n_plates, "wells": args.wells, "sites": args.sites, "shards": shards,
                       "images": n_plates * args.wells * args.sites * 5 + (n_plates + 9) // 10
                       * args.wells * args.sites * 3,
                       "describe_seconds": round(described, 2), **plan(workdir, sheet.resolve(), shards)}
                print(f"{n_plates} plates, {shards} shards: {run['jobs']} jobs planned in "
                      f"{run['seconds']} s", file=sys.stderr)
                runs.append(run)
    report = {"benchmark": "dag", "machine": platform.node(), "python": platform.python_version(),
              "target_seconds_100_plates": 30, "runs": runs}
    emit(report, args.out)


if __name__ == "__main__":
    main()
