"""The plate folder's registry (brightpaint.layout): its paths are the ones the workflow has always
written, its patterns are what the rules make, the bundles a rule lists come back unchanged in its
script, a script refuses to open a path its job does not list, and no rule or script spells a plate
file's name itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CHANNELS, REPO, merged, tiny_demo_config

from brightpaint.ingest import StoreLayout
from brightpaint.layout import (
    MATCH_TABLES,
    PROFILE_LEVELS,
    LayoutError,
    PlateFolder,
    PlateResults,
    PlateSources,
    ProfileFolder,
    every_path,
    plate_folder_problem,
    require_inputs,
)
from brightpaint.plate import PlateError, open_plate_source
from brightpaint.workflow import ConfigError, check_plate_folders

# Every file of a plate folder as the rules spelled it before the registry (relative to the folder);
# `{}` is the shard or the channel.
FILES = {
    "store": "images.zarr", "images": "ingest/images.parquet", "layout": "ingest/layout.json",
    "validation_flags": "ingest/validation_flags.csv", "qc_images": "ingest/qc_images.parquet",
    "qc_sites": "ingest/qc_sites.csv", "focus": "focus.parquet", "focus_figure": "focus.png",
    "denoised": "denoised.zarr", "denoise_assessment": "denoise/assessment.json",
    "virtual": "virtual.zarr", "stain_sites": "stain/sites.csv",
    "stain_metrics": "stain/metrics.parquet", "stain_uncertainty": "stain/uncertainty.csv",
    "stain_examples": "stain/examples.png", "labels": "labels.zarr", "segment_sites": "segment/sites.csv",
    "segment_diameters": "segment/diameters.json", "segment_metrics": "segment/metrics.parquet",
    "segment_overlay": "segment/overlay.png", "features_cells": "features/cells.parquet",
    "features_images": "features/images.parquet", "features_sites": "features/sites.csv",
    "report_html": "report.html", "report_json": "report.json",
}
SHARD_FILES = {
    "ingest_shard": "ingest/shards/{}.zarr", "ingest_shard_qc": "ingest/shards/{}_qc.parquet",
    "focus_shard": "focus/shards/{}.parquet", "denoise_shard": "denoise/shards/{}.zarr",
    "stain_shard": "stain/shards/{}.zarr", "stain_shard_sites": "stain/shards/{}.csv",
    "segment_shard": "segment/shards/{}.zarr", "segment_shard_sites": "segment/shards/{}.csv",
    "features_shard_cells": "features/shards/{}.parquet",
    "features_shard_images": "features/shards/{}.images.parquet",
    "features_shard_sites": "features/shards/{}.csv",
}
CHANNEL_FILES = {"illum": "illum/{}.npy", "illum_figure": "illum/{}.png", "illum_meta": "illum/{}.json",
                 "n2v_model": "denoise/{}.n2v.pt"}


def registry_paths(folder: PlateFolder, shards, channels) -> dict[str, str]:
    """Every path the registry names for `folder`, keyed by member (and shard / channel)."""
    paths = {name: getattr(folder, name) for name in FILES}
    paths |= {f"{name}[{s}]": getattr(folder, name)(s) for name in SHARD_FILES for s in shards}
    paths |= {f"{name}[{c}]": getattr(folder, name)(c) for name in CHANNEL_FILES for c in channels}
    paths |= {f"profile[{level}]": folder.profile(level) for level in PROFILE_LEVELS}
    paths |= {f"match[{table}]": folder.match(table) for table in MATCH_TABLES}
    return paths


def today_paths(root: str, shards, channels) -> dict[str, str]:
    paths = {name: f"{root}/{path}" for name, path in FILES.items()}
    paths |= {f"{name}[{s}]": f"{root}/{path.format(s)}" for name, path in SHARD_FILES.items()
              for s in shards}
    paths |= {f"{name}[{c}]": f"{root}/{path.format(c)}" for name, path in CHANNEL_FILES.items()
              for c in channels}
    paths |= {f"profile[{level}]": f"{root}/profiles/{level}.parquet" for level in PROFILE_LEVELS}
    paths |= {f"match[{table}]": f"{root}/match/{table}.parquet" for table in MATCH_TABLES}
    return paths


def test_a_plates_paths_are_those_the_workflow_has_always_written():
    folder = PlateFolder.of("results", "P1")
    assert folder.root == "results/plates/P1"
    root = "results/plates/P1"
    assert registry_paths(folder, [0, 3], ["BF", "DNA"]) == today_paths(root, [0, 3], ["BF", "DNA"])
    assert folder.profiles == {level: f"{root}/profiles/{level}.parquet" for level in PROFILE_LEVELS}
    assert folder.matches == {table: f"{root}/match/{table}.parquet" for table in MATCH_TABLES}
    screen = ProfileFolder.screen("out")
    assert screen.profile("selected") == "out/screen/profiles/selected.parquet"
    assert screen.matches["summary"] == "out/screen/match/summary.parquet"
    # a Path root is the same folder; an empty root gives paths relative to the folder
    assert PlateFolder(Path("results/plates/P1")) == folder
    assert PlateFolder("").illum("DNA") == "illum/DNA.npy"


def test_the_wildcard_folder_gives_the_rules_patterns():
    pattern = PlateFolder.of("results", "{plate}")
    assert registry_paths(pattern, ["{shard}"], ["{channel}"]) == today_paths(
        "results/plates/{plate}", ["{shard}"], ["{channel}"])


def test_illumination_files_map_back_to_their_channels():
    folder = PlateFolder.of("r", "P1")
    for channel in ("BF", "DNA", "Alexa.488"):
        assert PlateFolder.illum_channel(folder.illum(channel)) == channel
        assert PlateFolder.illum_channel(folder.illum_figure(channel)) == channel
    for path in (folder.focus, "r/plates/P1/illum/.npy", "r/plates/P1/denoise/DNA.npy"):
        with pytest.raises(LayoutError, match="not an illumination file"):
            PlateFolder.illum_channel(path)


def test_bundles_come_back_from_a_jobs_named_inputs_and_params():
    folder = PlateFolder.of("results", "P1")
    sources = folder.sources(["BF", "DNA"], denoised=True)
    assert sources.paths() == [folder.store, folder.layout, folder.focus, folder.illum("BF"),
                               folder.illum("DNA"), folder.denoised]
    assert PlateSources.from_input(sources.named_inputs()) == sources
    assert PlateSources.from_params(sources.as_params()) == sources
    plain = folder.sources(["BF"])
    assert "denoised" not in plain.named_inputs() and PlateSources.from_input(plain.named_inputs()) == plain
    results = folder.results(["BF", "DNA"], denoise_models=[folder.n2v_model("DNA")],
                             denoised_sources=sources)
    inputs = results.named_inputs()
    assert inputs["focus"] == sources.focus and inputs["illum"] == sources.named_inputs()["illum"]
    assert PlateResults.from_input(inputs) == results
    apply_plate = folder.results(["BF"], real_stains=False)
    assert apply_plate.stain_metrics is None and apply_plate.stain_sites == folder.stain_sites
    assert PlateResults.from_input(apply_plate.named_inputs()) == apply_plate


def test_a_script_refuses_a_path_its_job_does_not_list():
    folder = PlateFolder.of("results", "P1")
    sources = folder.sources(["BF", "DNA"], denoised=True)
    listed = [*folder.sources(["BF"], denoised=True).paths(), folder.labels]
    with pytest.raises(LayoutError, match=r"stain_train: would open \['results/plates/P1/illum/DNA.npy'\]"):
        sources.among(listed, "stain_train")
    assert sources.among([*listed, "./results/plates/P1/illum/DNA.npy"], "stain_train") is sources
    require_inputs([], [], "any")


def test_plate_access_opens_exactly_the_given_paths(tmp_path):
    """Illumination functions of the layout's channels among those given (in the layout's order),
    no folder looked into; brightfield's missing is the old, clear error."""
    folder = PlateFolder(tmp_path / "P1")
    Path(folder.layout).parent.mkdir(parents=True)
    Path(folder.illum("BF")).parent.mkdir()
    layout = StoreLayout(plate="P1", channels=["BF", "DNA"], planes={"BF": [0, 1], "DNA": [0]}, n_z=2,
                         shape=(4, 4), dtype="uint16", source_dtypes={}, roles={"BF": "brightfield"})
    Path(folder.layout).write_text(layout.to_json())
    pd.DataFrame({"well": ["A01"], "site": [1], "plane": [1], "flag": [""], "reason": [""]}).to_parquet(
        folder.focus)
    for channel in ("BF", "DNA", "GFP"):
        np.save(folder.illum(channel), np.ones((2, 4, 4), np.float32))
    source = open_plate_source(folder.sources(["DNA", "GFP", "BF"]), "BF")
    assert list(source.illumination) == ["BF", "DNA"] and source.denoised is None
    assert source.store == Path(folder.store) and source.focus_plane("A01", 1) == 1
    # a function on disk that the job does not list is not read
    assert list(open_plate_source(folder.sources(["BF"]), "BF").illumination) == ["BF"]
    with pytest.raises(PlateError, match="plate P1: no illumination function for brightfield 'BF'"):
        open_plate_source(folder.sources(["DNA"]), "BF")
    assert folder.sources_on_disk() == folder.sources(["BF", "DNA"])


def string_constants(path: Path) -> list[str]:
    """The string literals of a Python file, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_rule_or_script_spells_a_plate_files_name():
    """The rules build plate paths from the registry (logs and benchmarks are not plate files), and
    the scripts and the modules reading a plate take the paths they are given."""
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        literals = re.findall(r'"([^"\n]*)"', smk.read_text())
        assert not [s for s in literals if "plates/" in s], smk.name
    names = [path.rsplit("/", 1)[-1] for path in FILES.values()]
    # of the shard and channel files, the tails more telling than an extension (_qc.parquet, .n2v.pt)
    tails = [path.rsplit("}", 1)[-1] for path in [*SHARD_FILES.values(), *CHANNEL_FILES.values()]]
    names += [tail for tail in tails if tail.count(".") > 1 or "_" in tail]
    readers = [*sorted((REPO / "workflow" / "scripts").glob("*.py")),
               *(REPO / "src" / "brightpaint" / name for name in ("plate.py", "report.py"))]
    for path in readers:
        spelled = [s for s in string_constants(path) if any(s.endswith(name) for name in names)]
        assert not spelled, (path.name, spelled)


def dry_run_outputs(output: str) -> set[str]:
    return {path for line in output.splitlines() if line.strip().startswith("output:")
            for path in line.split(":", 1)[1].strip().split(", ")}


def test_the_rules_make_exactly_the_registrys_files(tmp_path, tiny_screen_source, run_snakemake):
    """A dry run of everything (every plate-level model, so Noise2Void per plate): the files made in
    the training plate's folder are the registry's, every one of them, for every shard and channel."""
    config = tiny_demo_config(tmp_path, tiny_screen_source)
    settings = merged(yaml.safe_load(config.read_text()), {"denoise": {"scope": "plate"}})
    config.write_text(yaml.safe_dump(settings))
    result = run_snakemake(tmp_path, "-n", "--forceall", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs = dry_run_outputs(result.stdout)
    defaults = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    shards = range(settings.get("shards", defaults["shards"]))
    channels = [CHANNELS["brightfield"], *CHANNELS["fluorescence"]]
    t1 = PlateFolder.of("results", "T1")
    # Noise2Void denoises the fluorescence channels only
    expected = set(registry_paths(t1, shards, channels).values()) - {t1.n2v_model(CHANNELS["brightfield"])}
    made = {p for p in outputs if p.startswith("results/plates/T1/")}
    assert made == expected
    # the apply plate: no real stains, no denoising, brightfield only
    apply_plate = {p for p in outputs if p.startswith("results/plates/T2/")}
    assert apply_plate <= set(registry_paths(PlateFolder.of("results", "T2"), shards, channels).values())


def test_every_output_path_stays_in_its_plate_folder(tmp_path, monkeypatch):
    """Issue 22: each plate's output paths, resolved, inside its own folder; checked where the workflow
    makes them, whatever let a name through."""
    monkeypatch.chdir(tmp_path)
    channels = {"brightfield": "BF", "nuclei": "DNA", "cell": "CYTO", "fluorescence": ["DNA", "CYTO"]}
    check_plate_folders("results", ["P1", "P2"], channels, [0, 1])
    paths = every_path(PlateFolder.of("results", "P1"), ["BF", "DNA"], [0, 1])
    # per channel and per shard, profiles and matching included
    assert {"results/plates/P1/illum/DNA.npy", "results/plates/P1/ingest/shards/1.zarr",
            "results/plates/P1/match/summary.parquet", "results/plates/P1/report.html"} <= set(paths)
    for plate in ("..", ".", "a/../.."):
        assert "is not a folder of results/plates" in plate_folder_problem("results", plate, ["BF"], [0])
    problem = plate_folder_problem("results", "P1", ["../../../../evil"], [0])
    assert "leave its folder" in problem and "evil.npy" in problem
    # a link inside the plate folder that leads out of it
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "results" / "plates" / "P2").mkdir(parents=True)
    (tmp_path / "results" / "plates" / "P2" / "illum").symlink_to(tmp_path / "elsewhere")
    assert "illum/BF.npy" in plate_folder_problem("results", "P2", ["BF"], [0])
    with pytest.raises(ConfigError, match="P2"):
        check_plate_folders("results", ["P1", "P2"], channels, [0])
    # a plate folder that is itself a link (another disk) is fine
    (tmp_path / "disk").mkdir()
    (tmp_path / "results" / "plates" / "P3").symlink_to(tmp_path / "disk")
    assert plate_folder_problem("results", "P3", ["BF"], [0]) == ""
