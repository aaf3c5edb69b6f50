"""What reruns what (issue 25): a job reruns when its code, software, inputs or settings changed, not
when the workflow's files got new times (a fresh clone, a reinstall, a copy to the cluster's disk)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_UNTIL, tiny_demo_config

from brightpaint.provenance import code_digest
from brightpaint.workflow import located_files


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def package(tmp_path):
    """A package `pkg` whose script imports `a` (which imports `b`) and the subpackage `sub`; `c` is
    imported by nothing."""
    root = tmp_path / "pkg"
    write(root / "__init__.py", "")
    write(root / "a.py", "from .b import value\n\ndef twice():\n    return 2 * value\n")
    write(root / "b.py", "value = 1  # the value\n")
    write(root / "c.py", "other = 3\n")
    write(root / "sub" / "__init__.py", "from . import x\n")
    write(root / "sub" / "x.py", "import pkg.a\n")
    write(root / "sub" / "plugin.txt", "a data file of the subpackage\n")
    script = write(tmp_path / "scripts" / "job.py",
                   "from pkg.a import twice\nimport pkg.sub\n\nprint(twice())\n")
    return root, script


def test_code_digest_follows_the_code_the_script_runs(package):
    root, script = package
    before = code_digest(script, root)
    assert code_digest(script, root) == before
    # new file times, comments and formatting: same code
    for path in root.rglob("*"):
        os.utime(path, (1, 1)) if path.is_file() else None
    write(root / "a.py", "from .b import value\n\n\ndef twice():  # doubled\n    return 2*value\n")
    write(script, "from pkg.a import twice   # the job\nimport pkg.sub\nprint(twice())\n")
    assert code_digest(script, root) == before
    # a module nothing imports
    write(root / "c.py", "other = 4\n")
    assert code_digest(script, root) == before
    # the script itself, a module imported through another, a subpackage's data file
    changes = []
    for path, text in ((script, "from pkg.a import twice\nimport pkg.sub\n\nprint(twice() + 1)\n"),
                       (root / "b.py", "value = 2\n"),
                       (root / "sub" / "plugin.txt", "changed\n")):
        old = path.read_text()
        write(path, text)
        changes.append(code_digest(script, root))
        write(path, old)
    assert before not in changes and len(set(changes)) == 3
    assert code_digest(script, root) == before


def test_files_outside_the_run_count_by_content_not_by_place(tmp_path):
    shipped = write(tmp_path / "workflow" / "resources" / "weights.pth", "weights")
    inputs, params = located_files({"shipped": str(shipped), "trained": "results/models/cells.pth"})
    # the run's own file is an input (Snakemake orders jobs by it); the outside one is not, its digest is
    assert inputs == {"trained": "results/models/cells.pth"}
    assert params["shipped"] == shipped and isinstance(params["shipped"], Path)
    assert params["shipped_sha256"] == hashlib.sha256(b"weights").hexdigest()
    copy = write(tmp_path / "clone" / "resources" / "weights.pth", "weights")
    assert located_files({"shipped": str(copy)})[1]["shipped_sha256"] == params["shipped_sha256"]
    assert "trained_sha256" not in params


def fresh_clone(folder: Path) -> Path:
    """The workflow's files copied with new modification times, as `git clone` gives them; the
    CellProfiler environment linked (a clone builds its own)."""
    ignore = shutil.ignore_patterns(".git", ".venv", ".venv-*", "results", ".snakemake", "tests", "bench",
                                    "docs", "__pycache__", "*.egg-info")
    shutil.copytree(REPO, folder, ignore=ignore, copy_function=shutil.copy)
    (folder / ".venv-cellprofiler").symlink_to(REPO / ".venv-cellprofiler")
    return folder


def planned(result) -> dict[str, list[str]]:
    """rule -> the reasons snakemake gives, from a dry run's output."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    jobs: dict[str, list[str]] = {}
    for rule, reason in re.findall(r"^rule (\w+):\n(?:    .*\n)*?    reason: (.*)$", output, flags=re.M):
        jobs.setdefault(rule, []).append(reason)
    return jobs


def test_a_fresh_clone_replans_nothing_and_a_changed_stage_only_itself(tiny_run, tmp_path, run_snakemake):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, run, symlinks=True)  # times kept
    clone = fresh_clone(tmp_path / "clone")
    args = ("-s", str(clone / "Snakefile"), "-n", "--configfile", str(tiny_run.config), *TINY_UNTIL)
    assert planned(run_snakemake(run, *args)) == {}
    # the SLURM profile's settings: nothing either (a dry run submits nothing)
    assert planned(run_snakemake(run, *args, "--profile", str(clone / "slurm"))) == {}
    # a comment in one stage's script: still nothing
    ingest = clone / "workflow" / "scripts" / "ingest_shard.py"
    ingest.write_text(ingest.read_text() + "# a comment\n")
    assert planned(run_snakemake(run, *args)) == {}
    # a real change to the focus stage's plate step: that step and what depends on it, nothing upstream
    focus = clone / "workflow" / "scripts" / "focus_plate.py"
    focus.write_text(focus.read_text() + "assert True\n")
    jobs = planned(run_snakemake(run, *args))
    assert all("Params have changed" in reason for reason in jobs["focus_plate"]), jobs["focus_plate"]
    assert len(jobs["focus_plate"]) == 2  # both plates
    assert not set(jobs) & {"validate_plate", "ingest_shard", "assemble_plate", "illumination"}
    # the stage's shard tables are temporary: remade for the plate step, for no other reason
    assert all(r.startswith("Missing output files") for r in jobs["focus_shard"]), jobs["focus_shard"]
    assert {"segment_shard", "features_shard"} <= set(jobs)


def test_a_changed_image_reruns_its_plate_when_asked(tmp_path, tiny_screen_source, run_snakemake):
    """config ingest.rerun_on_image_change: an image touched after its plate's validation reruns that
    plate's validation (and so the plate), and no other plate's."""
    config = tiny_demo_config(tmp_path, tiny_screen_source)
    settings = yaml.safe_load(config.read_text())
    settings["ingest"] = {**settings.get("ingest", {}), "rerun_on_image_change": True}
    config.write_text(yaml.safe_dump(settings))
    args = ("--configfile", str(config), "--until", "validate_plate")
    result = run_snakemake(tmp_path, "--cores", "2", *args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert planned(run_snakemake(tmp_path, "-n", *args)) == {}
    image = sorted((tmp_path / "results" / "demo" / "screen" / "T2").rglob("*.tif"))[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    output = run_snakemake(tmp_path, "-n", *args)
    jobs = planned(output)
    assert list(jobs) == ["validate_plate"] and len(jobs["validate_plate"]) == 1, jobs
    assert "Params have changed" in jobs["validate_plate"][0]
    assert "plate=T2" in output.stdout + output.stderr
