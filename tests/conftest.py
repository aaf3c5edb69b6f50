"""Shared fixtures: a tiny generated screen (the demo generator at test size), the workflow runner,
the demo run, and the tiers.

Tiers follow from the fixtures a test uses (nothing is marked by hand):
- `acceptance`: uses `demo_run`, the workflow on the demo screen with the demo config (what `make demo`
  does) and its accuracy floors;
- `workflow`: runs Snakemake (fixture `run_snakemake`), on tiny generated screens;
- `unit`: everything else, functions on arrays, tables and small files (seconds each).
`make test` runs all three; `make test-fast` (or `pytest -m "not acceptance"`) the first two, and
`pytest -m unit` the unit tier alone.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from local_slurm import LocalSlurm, SlurmRerun, unavailable

from brightpaint.demo.screen import simulate_screen
from brightpaint.demo.spec import PlateSpec, ScreenSpec, spec_from_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "config" / "demo.yaml"
TIERS = {"acceptance": "demo_run", "workflow": "run_snakemake"}
SHARED_DATA = REPO.parent / "shared" / "data"
CHANNELS = {"brightfield": "BF", "nuclei": "DNA", "cell": "CYTO",
            "fluorescence": ["DNA", "CYTO", "DAMAGE"]}
# Threads a test's own torch work may use: one under pytest-xdist (tools/run-tests runs the unit and
# workflow tiers on one worker per core; two 2-thread trainings side by side on 2 cores took 4.5x as
# long as one alone: test_denoise's models 67 -> 303 s).
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
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


def tier_of(item) -> str:
    names = set(getattr(item, "fixturenames", ()))
    return next((tier for tier, fixture in TIERS.items() if fixture in names), "unit")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item)))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # spread over pytest-xdist's workers (tools/run-tests: one test file per worker at a time), the
        # workflow tier's files first: their snakemake runs are the longest work units, and a long
        # unit left for the end would run alone
        order = {"workflow": 0, "unit": 1, "acceptance": 2}
        items.sort(key=lambda item: order[tier_of(item)])
        return
    # unit, then workflow, then acceptance tests (file order kept within a tier): a failing fast test
    # shows in minutes, before the demo run (fixture `demo_run`) starts. The SLURM test comes last: its
    # reruns go on in the background while the demo's other checks run (slurm_demo_rerun).
    order = {"unit": 0, "workflow": 1, "acceptance": 2}
    items.sort(key=lambda item: (order[tier_of(item)], item.path.name == "test_slurm.py"))


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the workflow's Snakefile with `workdir` as working directory (results land there)."""
    snakemake = Path(sys.executable).with_name("snakemake")
    # SLURM_CONF: these runs are local. The SLURM executor plugin runs `scontrol show config` as
    # snakemake starts, which waits 9 s whenever a slurm.conf names a controller that is not running
    # (e.g. one left by a killed SLURM test): 9 s per snakemake call.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_CONF": os.devnull}
    return subprocess.run([str(snakemake), "-s", str(REPO / "Snakefile"), *args],
                          cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def run_snakemake():
    """`snakemake`: a test that runs the workflow asks for it (and so is in the workflow tier)."""
    return snakemake


# A 64 px tiny site holds at most a cell or two and a tiny plate one negative-control well: the
# tiny run goes as far as the features; profiles and matching are checked on the demo screen
# (tests/test_demo_profiles.py).
TINY_UNTIL = ("--until", "features_plate", "segment_evaluate", "stain_evaluate")


def merged(base: dict, override: dict) -> dict:
    """`override` on top of `base`, nested mappings merged key by key (as Snakemake merges configs)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def tiny_demo_config(workdir: Path, source: Path) -> Path:
    """The demo config at CI size on a copy of the tiny screen placed where the demo config expects
    the demo screen (its truth masks included)."""
    shutil.copytree(source, workdir / "results" / "demo" / "screen")
    demo = {key: value for key, value in yaml.safe_load(DEMO_CONFIG.read_text()).items() if key != "simulate"}
    config = {"threads": {"validate": 1, "ingest": 1, "focus": 1, "denoise_train": 1,
                          "denoise_predict": 1, "stain_train": 1, "stain_predict": 1, "segment": 1,
                          "features": 1, "profiles": 1},

              # CI-sized Noise2Void: enough to exercise training and tiled prediction end to end
              "denoise": {"enabled": True, "steps": 10, "patch": 32, "batch": 4, "max_sites": 2,
                          "tile": 64},
              # CI-sized virtual staining: one short epoch, small tiles (accuracy: tests/test_stain.py)
              "stain": {"model": {"width": 8, "depth": 2, "patch": 32, "batch": 4, "steps_per_epoch": 3,
                                  "max_epochs": 1}, "tile": 32, "overlap": 8, "eval_sites": 4}}
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(merged(demo, config)))
    return path




class TinyRun(NamedTuple):
    workdir: Path
    config: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_screen_source, run_snakemake) -> TinyRun:
    """The workflow tier's one run: the demo config at CI size on the tiny screen, up to the features
    (TINY_UNTIL), made once per session; tests read it and must not change it (copy it first).

    BRIGHTPAINT_TINY_RUN=DIR: the run is made in DIR, or read from there if a finished one is there
    (DIR.done beside it). tools/run-tests sets it to a fresh folder and makes the run first, alone (it
    keeps the cores busy itself), so that the tests of every later session and xdist worker read it
    (the SLURM test, in the acceptance session, reruns a plate of it)."""
    shared = os.environ.get("BRIGHTPAINT_TINY_RUN")
    if not shared:
        return make_tiny_run(tmp_path_factory.mktemp("tiny_run"), tiny_screen_source, run_snakemake)
    workdir = Path(shared)
    done = workdir.with_name(workdir.name + ".done")
    # One maker at a time: xdist workers and sessions that need the run wait for the one making it
    # (when session 1 of tools/run-tests did not select the test that makes it, the first worker does).
    with open(workdir.with_name(workdir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(workdir, ignore_errors=True)  # an unfinished run of an earlier session
            workdir.mkdir(parents=True)
            make_tiny_run(workdir, tiny_screen_source, run_snakemake)
            done.touch()
    return TinyRun(workdir, workdir / "tiny.yaml")


def make_tiny_run(workdir: Path, screen_source: Path, run_snakemake) -> TinyRun:
    config = tiny_demo_config(workdir, screen_source)
    result = run_snakemake(workdir, "--cores", "2", "--configfile", str(config), *TINY_UNTIL, timeout=1800)
    if result.returncode != 0:
        pytest.fail("the tiny run failed:\n" + result.stdout[-3000:] + result.stderr[-3000:])
    return TinyRun(workdir, config)


# The SLURM profile's test (tests/test_slurm.py) reruns the tiny run's apply plate through SLURM from
# its first output: every per-plate rule of a plate goes through SLURM.
SLURM_TINY_PLATE = "T2"
SLURM_FIRST_OUTPUT = "results/plates/{plate}/ingest/images.parquet"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster on this machine (tests/local_slurm.py), or skip saying why not."""
    reason = unavailable()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    with LocalSlurm(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_tiny_rerun(slurm_cluster, tiny_run, tmp_path_factory):
    """A copy of the tiny run whose plate T2 reruns from its first output through `--profile slurm`,
    started when first asked for and waited for by tests/test_slurm.py. `demo_run` asks for it before
    the demo starts when the session holds the SLURM test: its ~13 stages spend most of their time
    waiting for SLURM's status checks (~9 min, a fraction of it on the CPU), so beside the demo run
    they take that wait off the suite's time."""
    rerun = SlurmRerun(slurm_cluster, REPO / "Snakefile", REPO / "slurm", tiny_run.workdir,
                       tmp_path_factory.mktemp("slurm_tiny"),
                       ["--configfile", str(tiny_run.config), *TINY_UNTIL,
                        "--forcerun", SLURM_FIRST_OUTPUT.format(plate=SLURM_TINY_PLATE)], timeout=2400)
    yield rerun
    rerun.stop()


# The SLURM test's second rerun: the finished demo run's plate P4 from its profiles (the plate's closing
# group job, its report and the screen-level jobs).
SLURM_DEMO_PLATE = "P4"
SLURM_DEMO_FORCED = f"results/plates/{SLURM_DEMO_PLATE}/profiles/wells.parquet"
SLURM_DEMO_SCREEN_OUTPUTS = ("results/screen/match/summary.parquet",
                             "results/screen/profiles/consensus.parquet", "results/index.html")
SLURM_DEMO_RERUN = pytest.StashKey[SlurmRerun]()


def start_slurm_demo_rerun(cluster, demo: Path, tmp_path_factory) -> SlurmRerun:
    return SlurmRerun(cluster, REPO / "Snakefile", REPO / "slurm", demo,
                      tmp_path_factory.mktemp("slurm_demo"),
                      ["--configfile", str(DEMO_CONFIG), "--forcerun", SLURM_DEMO_FORCED], timeout=900,
                      watch=SLURM_DEMO_SCREEN_OUTPUTS)


@pytest.fixture(scope="session")
def slurm_demo_rerun(slurm_cluster, demo_run, tmp_path_factory, request):
    """A copy of the finished demo run whose plate P4 reruns from its profiles through `--profile
    slurm`. `demo_run` starts it as soon as the demo is done when the session holds the SLURM test: its
    ~4 stages mostly wait for SLURM's status checks (~2 min), which the demo's other checks fill (the
    SLURM test comes last, see pytest_collection_modifyitems)."""
    rerun = request.config.stash.get(SLURM_DEMO_RERUN, None)
    if rerun is None:
        rerun = start_slurm_demo_rerun(slurm_cluster, demo_run, tmp_path_factory)
    yield rerun
    rerun.stop()


def wants_slurm_test(request) -> bool:
    return not unavailable() and any(item.path.name == "test_slurm.py" for item in request.session.items)


def write_demo_screen(workdir: Path) -> Path:
    """The demo screen as config/demo.yaml describes it, written under `workdir` (what `make demo`
    does first); returns its sheet."""
    settings = dict(yaml.safe_load(DEMO_CONFIG.read_text())["simulate"])
    outdir = workdir / settings.pop("outdir")
    return simulate_screen(outdir, spec_from_config(settings), workers=2)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, request) -> Path:
    """The working directory of a run of the workflow on the demo screen with the demo config (what
    `make demo` does), made once per test session. BRIGHTPAINT_DEMO_RUN=DIR reuses a finished run in
    DIR (for working on the tests; CI always makes a fresh one).

    The run has the machine to itself: the tests that need it come last (tiers sorted above). Run
    beside the other tiers it was slower, not faster: its longest job, the virtual-staining model's
    training (torch, bf16, 2 threads), slowed down beside them whatever their priority. At nice 5 its
    10 epochs took 775 s instead of 484 s; with the tiers in Linux's idle scheduling class
    (SCHED_IDLE: only CPU time nothing else wants) an epoch took ~160 s instead of ~39 s. A synthetic
    idle-class busy loop does not slow it (bench/cores.py), so the cause lies in what the tiers do
    (not found; shared caches and memory are a guess). The exceptions are the SLURM test's reruns,
    which mostly wait: the tiny one (`slurm_tiny_rerun`) beside the demo run, the demo's own
    (`slurm_demo_rerun`, started here when the run is done) beside the demo's other checks."""
    slurm_test = wants_slurm_test(request)
    reuse = os.environ.get("BRIGHTPAINT_DEMO_RUN")
    if reuse:
        workdir = Path(reuse)
    else:
        workdir = tmp_path_factory.mktemp("demo_run")
        if slurm_test:
            try:
                request.getfixturevalue("slurm_tiny_rerun")  # runs beside the demo (see there)
            except (Exception, pytest.skip.Exception):
                pass  # the SLURM test asks for it again and reports what went wrong
        write_demo_screen(workdir)
        result = snakemake(workdir, "--cores", "2", "--configfile", str(DEMO_CONFIG), timeout=5000)
        if result.returncode != 0:
            pytest.fail("the demo run failed:\n" + result.stdout[-4000:] + result.stderr[-4000:])
    if slurm_test:
        try:  # runs beside the demo's other checks (see slurm_demo_rerun)
            cluster = request.getfixturevalue("slurm_cluster")
            rerun = start_slurm_demo_rerun(cluster, workdir, tmp_path_factory)
            request.config.stash[SLURM_DEMO_RERUN] = rerun
            request.addfinalizer(rerun.stop)
        except (Exception, pytest.skip.Exception):
            pass  # slurm_demo_rerun starts it again and reports what went wrong
    return workdir
