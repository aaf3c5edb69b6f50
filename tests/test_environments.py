"""The two environments: the main one (this interpreter) and CellProfiler 5's own, called by path."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version

import pytest
from conftest import REPO

CP_PYTHON = REPO / ".venv-cellprofiler" / "bin" / "python"


@pytest.mark.parametrize("lock", ["envs/main.txt", "envs/cellprofiler.txt"])
def test_locks_pin_every_package(lock):
    lines = [line.strip() for line in (REPO / lock).read_text().splitlines()]
    packages = [line for line in lines if line and not line.startswith("#")]
    assert packages and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", p) for p in packages)


def test_main_environment_matches_its_lock():
    lock = dict(line.split("==") for line in (REPO / "envs/main.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for package in ["numpy", "torch", "zarr", "ome-zarr", "snakemake", "cellpose", "pycytominer"]:
        assert version(package).split("+")[0] == lock[package], package
    assert lock["torch"] == "2.13.0"
    assert sys.version_info[:2] == (3, 11)


@pytest.mark.cellprofiler
def test_cellprofiler_environment_runs_headless():
    if not CP_PYTHON.exists():
        pytest.skip(f"{CP_PYTHON} absent: build it with `make env-cellprofiler`")
    probe = (
        "import cellprofiler_core.preferences as p; p.set_headless();"
        "from cellprofiler_core.reader import filter_active_readers;"
        "filter_active_readers(['imageio_reader']);"
        "import numpy, scipy; from importlib.metadata import version;"
        "import cellprofiler.modules.measureobjectsizeshape as m;"
        "from cellprofiler_core.pipeline import Pipeline; pipe = Pipeline();"
        "pipe.add_module(m.MeasureObjectSizeShape());"
        "print(numpy.__version__, scipy.__version__, version('cellprofiler-nightly'), len(pipe.modules()))"
    )
    result = subprocess.run([str(CP_PYTHON), "-c", probe], capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    numpy_version, scipy_version, cp_version, n_modules = result.stdout.split()[-4:]
    assert numpy_version.startswith("1.") and scipy_version.startswith("1.10")
    assert cp_version == "5.0.0.dev784" and n_modules == "1"


def test_main_environment_has_no_cellprofiler():
    """CellProfiler needs numpy<2; it must live in its own environment, not this one."""
    with pytest.raises(ImportError):
        __import__("cellprofiler_core")
