"""The SLURM profile on a real one-node cluster, and forced reruns of one plate.

Two runs through `--profile slurm` on a cluster started on this machine (tests/local_slurm.py):
- a copy of the workflow tier's tiny run reruns plate T2 (apply only) from its first job to its
  features: every per-plate rule of a plate goes through SLURM (a tiny plate: the profile, not the
  plate's compute, is what is tested here);
- a copy of the finished demo run reruns plate P4 from its profiles: the plate's closing group job
  (profiles, matching), its report and the screen-level jobs go through SLURM.
Every rerun job must go through SLURM, the plate's results must equal the local run's, every other
plate's files must keep their bytes and modification times, and the screen-level outputs must be
rebuilt.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import DEMO_CONFIG, SLURM_DEMO_PLATE, SLURM_TINY_PLATE
from local_slurm import snapshot

TINY_PLATE = SLURM_TINY_PLATE
# the demo plate rerun from its profiles: its closing steps, its report and the screen's outputs rerun
PLATE = SLURM_DEMO_PLATE
PLATE_RULES = ("validate_plate", "ingest_shard", "assemble_plate", "illumination", "focus_shard",
               "focus_plate", "stain_shard", "stain_plate", "segment_calibrate", "segment_shard",
               "segment_plate", "segment_evaluate", "features_shard")
TAIL_RULES = ("report_plate", "profiles_screen", "match_screen", "report_index")
# tables that must be equal to the local run's, cell for cell
TINY_TABLES = ["features/cells.parquet", "segment/sites.csv", "features/sites.csv", "focus.parquet",
               "ingest/qc_images.parquet"]
TAIL_TABLES = ["features/cells.parquet", "profiles/wells.parquet", "profiles/normalised.parquet",
               "profiles/consensus.parquet", "match/summary.parquet", "match/neighbours.parquet"]


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)


def volatile_dropped(table: pd.DataFrame) -> pd.DataFrame:
    """Without the columns that record where and how fast, not what: a job's seconds and the image
    files' absolute paths (the rerun works in a copy of the run)."""
    return table.drop(columns=[c for c in ("seconds", "file") if c in table.columns])


@pytest.fixture(scope="module")
def slurm_reruns(slurm_cluster, slurm_tiny_rerun, slurm_demo_rerun):
    """The tiny rerun (started beside the demo run) and the demo's P4 rerun from its profiles
    (started when the demo run ended), both through `--profile slurm` (see conftest), waited for;
    then the cluster is stopped."""
    reruns = {"tiny": slurm_tiny_rerun, "demo": slurm_demo_rerun}
    results = {name: rerun.wait() for name, rerun in reruns.items()}
    log = (slurm_cluster.folder / "slurmctld.log").read_text(errors="replace")
    slurm_cluster.stop()
    return {"runs": {name: (rerun.run, rerun.plates, rerun.models) for name, rerun in reruns.items()},
            "results": results, "screen_before": slurm_demo_rerun.mtimes_before, "slurmctld_log": log}


def through_slurm(reruns, name: str) -> set[str]:
    """The run's job folders (rule_<name>, group_<name>_...) after checking that every job went
    through SLURM and ended with status 0."""
    result = reruns["results"][name]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # snakemake job ids are numbers; a group job's is a UUID
    submitted = dict(re.findall(r"Job ([\w-]+) has been submitted with SLURM jobid (\d+)", output))
    assert submitted, output[-3000:]
    # each job's SLURM log is named by its SLURM job id, and slurmctld saw each job end with status 0
    root = reruns["runs"][name][0] / ".snakemake" / "slurm_logs"
    logs = list(root.rglob("*.log"))
    assert {p.stem for p in logs} >= set(submitted.values())
    for slurm_id in submitted.values():
        assert f"_job_complete: JobId={slurm_id} WEXITSTATUS 0" in reruns["slurmctld_log"], slurm_id
    # the plate's closing steps run as one group job on 1 CPU
    group = [p for p in logs if "plate_tail" in p.parent.name]
    assert len(group) <= 1, sorted(p.parent.name for p in logs)
    for log in group:
        said = [line for line in reruns["slurmctld_log"].splitlines() if f"JobId={log.stem} " in line]
        allocated = r"Allocate JobId=\S+ NodeList=localhost #CPUs=1 "
        assert any(re.search(allocated, line) for line in said), said[:10]  # what slurmctld said instead
    return {part for p in logs for part in p.relative_to(root).parts[:-1]}


def test_every_rule_of_a_plate_ran_through_slurm(slurm_reruns):
    folders = through_slurm(slurm_reruns, "tiny")
    for rule in PLATE_RULES:
        assert f"rule_{rule}" in folders, sorted(folders)
    # the closing steps up to the features table: the group's one member the run needs
    assert any("features_plate" in name for name in folders), sorted(folders)


def test_the_plate_tail_and_the_screen_ran_through_slurm(slurm_reruns):
    folders = through_slurm(slurm_reruns, "demo")
    for rule in TAIL_RULES:
        assert f"rule_{rule}" in folders, sorted(folders)
    assert any(name.startswith("group_plate_tail") and "profiles_plate" in name and "match_plate" in name
               for name in folders), sorted(folders)


@pytest.mark.parametrize(("name", "plate", "changed"), [
    ("tiny", TINY_PLATE, ["images.zarr/zarr.json", "features/cells.parquet"]),
    ("demo", PLATE, ["profiles/consensus.parquet", "match/summary.parquet"])])
def test_other_plates_and_the_models_are_untouched(slurm_reruns, name, plate, changed):
    run, before, models = slurm_reruns["runs"][name]
    results = run / "results"
    for other, files in before.items():
        after = snapshot(results / "plates" / other)
        if other == plate:
            rewritten = [f for f in files if f in after and after[f][0] != files[f][0]]
            assert set(changed) <= set(rewritten), sorted(rewritten)
        else:
            assert after == files, f"plate {other} changed: " + ", ".join(
                sorted(f for f in set(files) | set(after) if files.get(f) != after.get(f)))
    if models:
        assert snapshot(results / "models") == models
    if name == "demo":  # from the profiles on: nothing upstream of them was rerun
        after = snapshot(results / "plates" / plate)
        for upstream in ("images.zarr/zarr.json", "segment/sites.csv", "features/cells.parquet"):
            assert after[upstream] == before[plate][upstream], upstream


def test_screen_outputs_are_rebuilt(slurm_reruns):
    run = slurm_reruns["runs"]["demo"][0]
    for name, mtime in slurm_reruns["screen_before"].items():
        assert (run / name).stat().st_mtime_ns > mtime, name


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_rerun_reproduces_the_local_run(slurm_reruns, demo_run, tiny_run, name):
    """Same code, config and seeds on CPU: the plate's tables are equal to the local run's."""
    plate, tables, local_run = ((TINY_PLATE, TINY_TABLES, tiny_run.workdir) if name == "tiny"
                                else (PLATE, TAIL_TABLES, demo_run))
    rerun_run = slurm_reruns["runs"][name][0]
    rerun, local = (p / "results" / "plates" / plate for p in (rerun_run, local_run))
    for table in tables:
        pd.testing.assert_frame_equal(volatile_dropped(read_table(rerun / table)),
                                      volatile_dropped(read_table(local / table)),
                                      check_exact=True, obj=table)
    if name == "demo":
        for table in ("summary", "neighbours", "agreement"):
            path = Path("results") / "screen" / "match" / f"{table}.parquet"
            pd.testing.assert_frame_equal(read_table(rerun_run / path), read_table(local_run / path),
                                          check_exact=True, obj=str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the SLURM daemons")
def test_the_cluster_is_gone_afterwards(slurm_reruns):
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
