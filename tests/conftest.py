"""Shared fixtures: a tiny generated screen (the demo generator at test size) and paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from brightpaint.simulate import PlateSpec, ScreenSpec, simulate_screen

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHANNELS = {"brightfield": "BF", "nuclei": "DNA", "cell": "CYTO",
            "fluorescence": ["DNA", "CYTO", "DAMAGE"]}
TINY_SPEC = ScreenSpec(plates=(PlateSpec("T1", "B1", "flat", "train"),
                               PlateSpec("T2", "B2", "dense", "apply")),
                       wells=6, sites=2, size=64, z_planes=5, seed=7)


def shared_data(folder: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / folder
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def tiny_screen_source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_screen_source") / "screen"
    simulate_screen(out, TINY_SPEC)
    return out


@pytest.fixture
def tiny_screen(tiny_screen_source, tmp_path) -> Path:
    """A fresh, writable copy of the tiny screen (tests may damage it); returns the screen folder."""
    out = tmp_path / "screen"
    shutil.copytree(tiny_screen_source, out)
    return out


def run_snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the workflow's Snakefile with `workdir` as working directory (results land there)."""
    snakemake = Path(sys.executable).with_name("snakemake")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(snakemake), "-s", str(REPO / "Snakefile"), *args],
                          cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The working directory of a run of the default workflow on the demo screen (what `make demo`
    does), made once per test session. BRIGHTPAINT_DEMO_RUN=DIR reuses a finished run in DIR (for
    working on the tests; CI always makes a fresh one)."""
    reuse = os.environ.get("BRIGHTPAINT_DEMO_RUN")
    if reuse:
        return Path(reuse)
    workdir = tmp_path_factory.mktemp("demo_run")
    result = run_snakemake(workdir, "--cores", "2", timeout=5000)
    if result.returncode != 0:
        pytest.fail("the demo run failed:\n" + result.stdout[-4000:] + result.stderr[-4000:])
    return workdir
