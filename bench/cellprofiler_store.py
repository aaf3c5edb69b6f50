"""CellProfiler with its measurements buffered in memory (features/cellprofiler_measurements.py)
against the `cellprofiler` executable, on the same pipeline and LoadData CSV: seconds, CPU seconds
and whether every table is equal (but for CellProfiler's ExecutionTime columns).

    python bench/cellprofiler_store.py --pipeline results/screen/features/pipeline_site.cppipe \
        --loaddata DIR/loaddata.csv --out bench/results/cellprofiler_store.json [--repeats 2]

The LoadData CSV and its images: e.g. the inputs a features_shard job writes in its temporary
folder (`features-<plate>-<shard>-*/inputs`). The two ways alternate, `--repeats` times each, so that
a change of the machine's speed hits both.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd

from brightpaint.features.runner import run_cellprofiler


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(pipeline: Path, loaddata: Path, out: Path, buffered: bool) -> dict:
    cpu, start = children_cpu(), time.perf_counter()
    run_cellprofiler(pipeline, loaddata, out, buffered=buffered)
    return {"seconds": round(time.perf_counter() - start, 2), "cpu_seconds": round(children_cpu() - cpu, 2)}


def tables_equal(a: Path, b: Path) -> dict[str, bool]:
    equal = {}
    for path in sorted(a.glob("*.csv")):
        left, right = pd.read_csv(path), pd.read_csv(b / path.name)
        timings = [c for c in left.columns if c.startswith("ExecutionTime_")]
        equal[path.stem] = (list(left.columns) == list(right.columns)
                            and left.drop(columns=timings).equals(right.drop(columns=timings)))
    return equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--loaddata", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sites = sum(1 for _ in open(args.loaddata)) - 1
    runs = {"buffered": [], "cellprofiler": []}
    with tempfile.TemporaryDirectory(prefix="cellprofiler-store-") as folder:
        for repeat in range(args.repeats):
            for name in runs:
                out = Path(folder) / f"{name}-{repeat}"
                runs[name].append(timed_run(args.pipeline, args.loaddata, out, name == "buffered"))
        equal = tables_equal(Path(folder) / "buffered-0", Path(folder) / "cellprofiler-0")
    best = {name: min(r["seconds"] for r in found) for name, found in runs.items()}
    result = {"benchmark": "cellprofiler_store", "machine": platform.processor() or platform.machine(),
              "pipeline": str(args.pipeline), "image_sets": sites, "runs": runs,
              "best_seconds": best, "ratio_buffered_to_cellprofiler":
                  round(best["buffered"] / best["cellprofiler"], 3),
              "tables_equal": equal}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
