"""The SLURM profile on a real one-node cluster, and a forced rerun of one plate.

A copy of the finished demo run reruns plate P4 (apply only) from its first job through
`--profile slurm` on a cluster started on this machine (tests/local_slurm.py). Every P4 job must go
through SLURM, P4's results must equal the local run's, every other plate's files must keep their
bytes and modification times, and the screen-level outputs must be rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import DEMO_CONFIG, REPO
from local_slurm import LocalSlurm, unavailable

PLATE = "P4"
# the plate's first output: forcing it reruns everything downstream of it, and only that
FIRST_OUTPUT = f"results/plates/{PLATE}/ingest/images.parquet"
SCREEN_OUTPUTS = ["results/screen/match/summary.parquet", "results/screen/profiles/consensus.parquet",
                  "results/index.html"]
# tables that must be equal to the local run's, cell for cell
TABLES = ["features/cells.parquet", "profiles/wells.parquet", "profiles/normalised.parquet",
          "profiles/consensus.parquet", "match/summary.parquet", "match/neighbours.parquet",
          "segment/sites.csv", "features/sites.csv", "focus.parquet", "ingest/qc_images.parquet"]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder`: (mtime in ns, sha256)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            state[str(path.relative_to(folder))] = (path.stat().st_mtime_ns,
                                                    hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def volatile_dropped(table: pd.DataFrame) -> pd.DataFrame:
    """Without the columns that record where and how fast, not what: a job's seconds and the image
    files' absolute paths (the rerun works in a copy of the run)."""
    return table.drop(columns=[c for c in ("seconds", "file") if c in table.columns])


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)


@pytest.fixture(scope="module")
def slurm_rerun(demo_run, tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    run = tmp_path_factory.mktemp("slurm_rerun")
    # the whole working directory, snakemake's metadata included, with modification times kept
    shutil.copytree(demo_run, run, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns("locks", "incomplete", "slurm_logs"))
    results = run / "results"
    before = {p.name: snapshot(p) for p in (results / "plates").iterdir()}
    models = snapshot(results / "models")
    screen_before = {name: (run / name).stat().st_mtime_ns for name in SCREEN_OUTPUTS}
    snakemake = Path(sys.executable).with_name("snakemake")
    with LocalSlurm(tmp_path_factory.mktemp("cluster")) as cluster:
        env = {**cluster.env, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            ["timeout", "-k", "30", "1500", str(snakemake), "-s", str(REPO / "Snakefile"),
             "--profile", str(REPO / "slurm"), "--configfile", str(DEMO_CONFIG), "--forcerun", FIRST_OUTPUT,
             # a test cluster answers at once; the plugin's default first wait is 40 s per round
             "--slurm-init-seconds-before-status-checks", "3",
             # the plugin deletes a successful job's SLURM log by default; the test reads them
             "--slurm-keep-successful-logs"],
            cwd=run, capture_output=True, text=True, env=env)
        log = (cluster.folder / "slurmctld.log").read_text(errors="replace")
    return {"run": run, "result": result, "before": before, "models": models,
            "screen_before": screen_before, "slurmctld_log": log}


def test_the_profile_ran_the_plate_through_slurm(slurm_rerun):
    result = slurm_rerun["result"]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # snakemake job ids are numbers; a group job's is a UUID
    submitted = dict(re.findall(r"Job ([\w-]+) has been submitted with SLURM jobid (\d+)", output))
    assert len(submitted) >= 20, output[-3000:]
    # each job's SLURM log is named by its SLURM job id, and slurmctld saw each job end with status 0
    root = slurm_rerun["run"] / ".snakemake" / "slurm_logs"
    logs = list(root.rglob("*.log"))
    assert {p.stem for p in logs} >= set(submitted.values())
    log = slurm_rerun["slurmctld_log"]
    for slurm_id in submitted.values():
        assert f"_job_complete: JobId={slurm_id} WEXITSTATUS 0" in log, slurm_id
    # every rule of the plate went through SLURM, the plate's closing steps as one group job on 1 CPU
    folders = {part for p in logs for part in p.relative_to(root).parts[:-1]}
    for rule in ("validate_plate", "ingest_shard", "focus_shard", "stain_shard", "segment_calibrate",
                 "segment_shard", "features_shard", "report_plate", "profiles_screen", "match_screen",
                 "report_index"):
        assert f"rule_{rule}" in folders, sorted(folders)
    group = [p for p in logs if "plate_tail" in p.parent.name]
    assert len(group) == 1, sorted(folders)
    assert re.search(rf"Allocate JobId={group[0].stem} NodeList=localhost #CPUs=1 ", log)


def test_other_plates_and_the_models_are_untouched(slurm_rerun):
    results = slurm_rerun["run"] / "results"
    for plate, files in slurm_rerun["before"].items():
        after = snapshot(results / "plates" / plate)
        if plate == PLATE:
            changed = [name for name in files if name in after and after[name][0] != files[name][0]]
            assert "profiles/consensus.parquet" in changed and "images.zarr/zarr.json" in changed
        else:
            assert after == files, f"plate {plate} changed: " + ", ".join(
                sorted(name for name in set(files) | set(after) if files.get(name) != after.get(name)))
    assert snapshot(results / "models") == slurm_rerun["models"]


def test_screen_outputs_are_rebuilt(slurm_rerun):
    run = slurm_rerun["run"]
    for name, mtime in slurm_rerun["screen_before"].items():
        assert (run / name).stat().st_mtime_ns > mtime, name


def test_rerun_reproduces_the_local_run(slurm_rerun, demo_run):
    """Same code, config and seeds on CPU: the plate's tables are equal to the local run's."""
    rerun, local = (p / "results" / "plates" / PLATE for p in (slurm_rerun["run"], demo_run))
    for name in TABLES:
        pd.testing.assert_frame_equal(volatile_dropped(read_table(rerun / name)),
                                      volatile_dropped(read_table(local / name)), check_exact=True, obj=name)
    for name in ("summary", "neighbours", "agreement"):
        path = Path("results") / "screen" / "match" / f"{name}.parquet"
        pd.testing.assert_frame_equal(read_table(slurm_rerun["run"] / path), read_table(demo_run / path),
                                      check_exact=True, obj=str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the SLURM daemons")
def test_the_cluster_is_gone_afterwards(slurm_rerun):
    from local_slurm import DEFAULT_CONF, MARKER
    assert not (DEFAULT_CONF.exists() and MARKER in DEFAULT_CONF.read_text(errors="replace"))


def test_forcing_a_training_plate_plans_only_it_and_the_screen_outputs(demo_run, run_snakemake):
    """P2 trains the virtual-staining model: forcing P2 from its first step keeps the model (its inputs
    are ancient) and plans no job of another plate; with a plate selection, no screen-level job."""
    for selection, screen_jobs in (([], {"profiles_screen", "match_screen", "report_index"}),
                                   (["--config", "plates=[P2]"], set())):
        result = run_snakemake(demo_run, "-n", "--configfile", str(DEMO_CONFIG),
                               "--forcerun", "results/plates/P2/ingest/images.parquet", *selection)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        planned = set(re.findall(r"wildcards: (?:.*, )?plate=(\w+)", output))
        assert planned == {"P2"}, planned
        rules = set(re.findall(r"^rule (\w+):", output, flags=re.M))
        assert "stain_train" not in rules
        assert rules & {"profiles_screen", "match_screen", "report_index"} == screen_jobs
        assert {"validate_plate", "stain_shard", "features_shard", "report_plate"} <= rules
