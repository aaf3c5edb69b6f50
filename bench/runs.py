"""What a finished (or partly finished) workflow run left behind: one benchmark row per job."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def benchmark_patterns() -> list[tuple[str, re.Pattern]]:
    """(rule, pattern of its benchmark file relative to results/benchmarks), from the rule files."""
    block = re.compile(r"^\s*rule (\w+):.*?^\s*benchmark:\s*\n\s*f?\"[^\"]*?/benchmarks/([^\"]+)\"",
                       flags=re.M | re.S)
    patterns = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for rule, path in block.findall(smk.read_text()):
            parts = re.split(r"\{\{\w+\}\}", path)
            patterns.append((rule, re.compile("^" + "[^/]+".join(map(re.escape, parts)) + "$")))
    return patterns


def job_benchmarks(results: Path) -> pd.DataFrame:
    """One row per finished job of the run whose results folder is `results`: rule, job (benchmark
    file), wall seconds `s`, `cpu_time` and `max_rss` (MB) as Snakemake's benchmark measured them, and
    `end`, the job's end in epoch seconds (its benchmark file is written when the job ends)."""
    patterns = benchmark_patterns()
    rows = []
    for tsv in sorted((Path(results) / "benchmarks").rglob("*.tsv")):
        job = str(tsv.relative_to(Path(results) / "benchmarks"))
        # a rule whose benchmark is not in today's rule files (an older run) keeps its file's name
        rule = next((r for r, pattern in patterns if pattern.match(job)), tsv.stem)
        row = pd.read_csv(tsv, sep="\t").iloc[-1]
        rows.append({"rule": rule, "job": job,
                     "s": float(row["s"]), "cpu_time": float(row["cpu_time"]),
                     "max_rss": float(row["max_rss"]), "end": tsv.stat().st_mtime})
    return pd.DataFrame(rows, columns=["rule", "job", "s", "cpu_time", "max_rss", "end"])
