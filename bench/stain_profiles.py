"""The model study's profile level: each virtual-staining variant run through the whole workflow on
the demo screen (prediction, Cellpose, CellProfiler, profiles, matching), from a finished demo run.

    python bench/stain_profiles.py --run DEMO_DIR --out bench/results/stain_profiles.json \
        [--variants default per_channel gan ms_ssim_l1 epochs20] [--cores 2]

DEMO_DIR is the folder a demo run ran in (its results/ and .snakemake/). For each variant the
repository is cloned to a scratch folder, the run's results and Snakemake records are copied in, and
Snakemake runs again with config/demo.yaml and one overlay (the variant's `stain:` settings): the
records make it redo the stain models and everything downstream of them, nothing upstream. `default`
is the run itself (read, not rerun). Per variant the JSON holds, per plate with real stains, the
report's real-vs-virtual evidence at the three levels (`brightpaint.report.virtual_stain_evidence`:
DNA PCC on held-out sites, virtual-vs-real nuclei AP over real-vs-truth, MoA NSC and replicate mAP
virtual / real), and for the screen and every plate the NSC 1-NN accuracy and replicate mAP of the
real stains, the virtual ones and the real stains' shape features alone; plus the wall time of the
rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from brightpaint import report as R
from brightpaint.match import SHAPE_ONLY

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": None,
    "per_channel": {"per_channel": True},
    "gan": {"model": {"gan": True}},
    "ms_ssim_l1": {"model": {"loss": "ms_ssim_l1"}},
    "unext2": {"model": {"arch": "unext2"}},
    "stack": {"model": {"half_width": 2}},
    "stem3d": {"model": {"half_width": 2, "stem": "3d"}},
    "epochs20": {"model": {"max_epochs": 20}},
}
METRICS = ("moa_nsc_accuracy_cosine", "replicate_mAP", "percent_replicating")


def summary_values(summary: pd.DataFrame) -> dict:
    out = {}
    for source in ("real", "virtual", SHAPE_ONLY):
        for metric in METRICS:
            row = summary[(summary["source"] == source) & (summary["metric"] == metric)]
            if len(row):
                out[f"{source}/{metric}"] = round(float(row["value"].iloc[0]), 4)
    return out


def scores(results: Path) -> dict:
    """The screen's and each plate's matching scores, and each plate's real-vs-virtual evidence."""
    out = {"screen": summary_values(pd.read_parquet(results / "screen" / "match" / "summary.parquet"))}
    for folder in sorted((results / "plates").iterdir()):
        match = pd.read_parquet(folder / "match" / "summary.parquet")
        plate = {"match": summary_values(match)}
        stain = folder / "stain" / "metrics.parquet"
        if stain.is_file():
            evidence, verdict = R.virtual_stain_evidence(
                pd.read_parquet(stain), pd.read_parquet(folder / "segment" / "metrics.parquet"), match, "DNA")
            plate["verdict"] = verdict
            plate["evidence"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                                 for row in evidence.to_dict("records")]
        out[folder.name] = plate
    return out


def rerun(run: Path, overlay: dict, cores: int, scratch: Path, commit: str) -> float:
    """The demo run again at `commit` with `overlay` over config/demo.yaml's stain section; returns
    its seconds."""
    work = scratch / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=work, check=True)
    for env in (".venv", ".venv-cellprofiler"):
        (work / env).symlink_to(REPO / env)
    for folder in ("results", ".snakemake"):
        shutil.copytree(run / folder, work / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("locks", "incomplete", "shadow"))
    (work / "variant.yaml").write_text(yaml.safe_dump({"stain": overlay}))
    plates = sorted(p.name for p in (work / "results" / "plates").iterdir())
    # the pixel evaluation too: nothing downstream of it asks for it
    targets = ["results/screen/match/summary.parquet",
               *[f"results/plates/{p}/{part}" for p in plates
                 for part in ("match/summary.parquet", "segment/metrics.parquet", "stain/metrics.parquet")
                 if part != "stain/metrics.parquet" or (run / "results" / "plates" / p / part).is_file()]]
    # the clone's own package, not the editable install's checkout (which may change meanwhile)
    env = {**os.environ, "PYTHONPATH": str(work / "src")}
    start = time.perf_counter()
    subprocess.run([str(REPO / ".venv" / "bin" / "snakemake"), "--cores", str(cores), "--configfile",
                    "config/demo.yaml", "variant.yaml", "--rerun-triggers", "params", "mtime", "input",
                    "--", *targets], cwd=work, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the folder a finished demo run ran in")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stain_profiles.json")
    parser.add_argument("--variants", nargs="+", default=["default", "per_channel", "gan", "ms_ssim_l1"],
                        choices=list(VARIANTS))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep each variant's run under this folder")
    parser.add_argument("--commit", default="HEAD", help="the repository's revision every variant runs")
    args = parser.parse_args()
    # one revision for every variant, however the checkout moves on meanwhile
    commit = subprocess.run(["git", "rev-parse", args.commit], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    result = {"benchmark": "stain_profiles", "host": platform.node(), "run": str(args.run),
              "commit": commit, "cores": args.cores, "variants": {}}
    for name in args.variants:
        if VARIANTS[name] is None:
            result["variants"][name] = {"overlay": {}, **scores(args.run / "results")}
        else:
            with tempfile.TemporaryDirectory(prefix=f"stain-{name}-") as scratch:
                seconds = rerun(args.run, VARIANTS[name], args.cores, Path(scratch), commit)
                result["variants"][name] = {"overlay": VARIANTS[name], "rerun_seconds": round(seconds, 1),
                                            **scores(Path(scratch) / "repo" / "results")}
                if args.keep:
                    shutil.copytree(Path(scratch) / "repo" / "results", args.keep / name, symlinks=True)
        print(json.dumps({name: result["variants"][name]["screen"]}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
