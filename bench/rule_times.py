"""Where a workflow run's time goes, rule by rule (the per-rule table of the demo run).

    python bench/rule_times.py RUN_DIR [--before OTHER_RUN_DIR] [--wall S] [--out F.json]

RUN_DIR is a run's working directory (its results/benchmarks hold one file per job). Per rule: jobs,
summed wall seconds (what the rule costs a 1-core machine), the longest job, summed CPU seconds and
the share of the run's summed seconds; with --before, the same for another run beside it. The run's
timeline says how busy the run kept the machine (seconds with 0, 1, 2... jobs running; per rule the
seconds it ran alone). The run's own wall-clock time is read from Snakemake's log of the run
(.snakemake/log), or given with --wall.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from report_json import emit
from runs import job_benchmarks


def per_rule(run: Path) -> pd.DataFrame:
    jobs = job_benchmarks(run / "results")
    table = jobs.groupby("rule").agg(jobs=("job", "size"), seconds=("s", "sum"), longest=("s", "max"),
                                     cpu_seconds=("cpu_time", "sum"), max_rss_mb=("max_rss", "max"))
    table["share"] = table["seconds"] / table["seconds"].sum()
    return table.sort_values("seconds", ascending=False).round(3)


def timeline(run: Path, step: float = 1.0) -> dict:
    """How busy the run kept the machine: seconds with no job, one job and two or more jobs running,
    and per rule the seconds during which it was the only job running (what holds the run up on a
    machine with cores to spare). Start times are the benchmark files' times less the job's seconds."""
    jobs = job_benchmarks(run / "results")
    start, end = (jobs["end"] - jobs["s"]).to_numpy(), jobs["end"].to_numpy()
    ticks = np.arange(start.min(), end.max(), step)
    running = (start[None, :] <= ticks[:, None]) & (ticks[:, None] < end[None, :])
    count = running.sum(axis=1)
    alone = running[count == 1].argmax(axis=1)
    alone_by_rule = pd.Series(step, index=jobs["rule"].to_numpy()[alone]).groupby(level=0).sum()
    return {"span_seconds": round(float(end.max() - start.min()), 1),
            "seconds_by_jobs_running": {str(k): round(float(np.sum(count == k) * step), 1)
                                        for k in range(int(count.max()) + 1)},
            "seconds_alone_by_rule": alone_by_rule.sort_values(ascending=False).round(1).to_dict()}


def run_wall_seconds(run: Path) -> float | None:
    """First to last time stamp of the newest Snakemake log of the run that ran jobs."""
    stamp = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]", re.M)
    for log in sorted((run / ".snakemake" / "log").glob("*.snakemake.log"), reverse=True):
        times = stamp.findall(log.read_text(errors="replace"))
        if len(times) >= 2:
            first, last = (datetime.strptime(" ".join(t.split()), "%a %b %d %H:%M:%S %Y")
                           for t in (times[0], times[-1]))
            return (last - first).total_seconds()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--before", type=Path, help="another run to show beside it")
    parser.add_argument("--wall", type=float, help="the run's wall-clock seconds (else from its log)")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    runs = {"after": args.run} | ({"before": args.before} if args.before else {})
    report = {"benchmark": "rule_times", "note": args.note, "runs": {}}
    tables = {}
    for name, run in runs.items():
        table = tables[name] = per_rule(run)
        wall = args.wall if (args.wall and name == "after") else run_wall_seconds(run)
        report["runs"][name] = {"run": str(run), "wall_seconds": wall,
                                "summed_job_seconds": round(float(table["seconds"].sum()), 1),
                                "summed_cpu_seconds": round(float(table["cpu_seconds"].sum()), 1),
                                "jobs": int(table["jobs"].sum()),
                                "timeline": timeline(run),
                                "rules": table.reset_index().to_dict(orient="records")}
    side = pd.concat({name: t[["jobs", "seconds", "cpu_seconds"]] for name, t in tables.items()}, axis=1)
    print(side.sort_values(side.columns[1], ascending=False).to_string(), file=sys.stderr)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
