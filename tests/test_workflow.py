"""The Snakemake workflow: DAG, lint, a tiny end-to-end run, a user's own screen, bad inputs."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from conftest import (
    CHANNELS,
    DEMO_CONFIG,
    REPO,
    TINY_SPEC,
    TINY_UNTIL,
    merged,
    tiny_demo_config,
    write_demo_screen,
)
from PIL import Image

from brightpaint import report
from brightpaint.demo.screen import describe_screen, simulate_screen
from brightpaint.demo.spec import PlateSpec, ScreenSpec
from brightpaint.features.pipelines import pipeline_names
from brightpaint.illumination import correct_illumination, load_illumination
from brightpaint.ingest import StoreLayout, read_field, read_plane, read_store_layout
from brightpaint.layout import PlateFolder

RULES = ["validate_plate", "ingest_shard", "assemble_plate"]


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, without its total."""
    table = output[output.rindex("Job stats:"):].splitlines()[3:]
    counts = {}
    for line in table:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def demo_settings() -> dict:
    """The config a demo run sees: the defaults with config/demo.yaml on top."""
    return merged(yaml.safe_load((REPO / "config" / "config.yaml").read_text()),
                  yaml.safe_load(DEMO_CONFIG.read_text()))


def matrix_groups(config: dict, cell_types: set[str]) -> int:
    """Groups of the generalisation matrix: cell types of the training plates x phenotype groups;
    none when that makes fewer than two."""
    settings = config["generalisation"]
    phenotypes = settings["phenotypes"]
    groups = (len(cell_types) if settings["cell_types"] else 1) * max(1, len(phenotypes))
    return groups if groups >= 2 else 0


def test_dry_run_of_the_demo_config_lists_every_job(tmp_path, run_snakemake):
    write_demo_screen(tmp_path)
    result = run_snakemake(tmp_path, "-n", "--configfile", str(DEMO_CONFIG))
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout + result.stderr)
    default = demo_settings()
    plates, n_shards = default["simulate"]["plates"], default["shards"]
    n, n_stained = len(plates), sum(p["role"] in ("train", "both") for p in plates)
    channels = n + n_stained * len(default["channels"]["fluorescence"])
    groups = matrix_groups(default, {p["cell_type"] for p in plates if p["role"] in ("train", "both")})
    assert groups == 4  # two cell types x the demo's toxic / non-toxic groups
    assert counts == {"generalisation_train": groups, "generalisation_evaluate": groups,
                      "generalisation_matrix": 1, "validate_plate": n,
                      "ingest_shard": n * n_shards,
                      "assemble_plate": n, "illumination": channels, "focus_shard": n * n_shards,
                      "focus_plate": n, "stain_train": 1, "stain_shard": n * n_shards, "stain_plate": n,
                      "stain_evaluate": n_stained, "segment_calibrate": n, "segment_shard": n * n_shards,
                      "segment_plate": n, "segment_evaluate": n, "features_pipeline": 1,
                      "features_shard": n * n_shards,
                      "features_plate": n, "profiles_plate": n, "profiles_screen": 1, "match_plate": n,
                      "match_screen": 1, "report_plate": n, "report_index": 1, "all": 1,
                      # Noise2Void, on by default; the demo config: one model per stain for the screen
                      "denoise_train_screen": len(default["channels"]["fluorescence"]),
                      "denoise_assess": n_stained, "denoise_shard": n_stained * n_shards,
                      "denoise_plate": n_stained}
    assert default["denoise"]["scope"] == "screen"


def test_denoise_scope_screen_trains_one_model_per_channel(tmp_path, tiny_screen_source, run_snakemake):
    config = user_screen(tmp_path, tiny_screen_source)
    settings = yaml.safe_load(config.read_text()) | {"denoise": {"enabled": True, "scope": "screen"}}
    config.write_text(yaml.safe_dump(settings))
    result = run_snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout + result.stderr)
    assert counts["denoise_train_screen"] == 3 and "denoise_train_plate" not in counts
    assert counts["denoise_plate"] == 1  # the train plate; apply plates have no stains


def test_lint_is_clean(tmp_path, tiny_screen_source, run_snakemake):
    config = user_screen(tmp_path, tiny_screen_source)
    result = run_snakemake(tmp_path, "--lint", "--configfile", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_plates_filter_selects_one_plate(tmp_path, tiny_screen_source, run_snakemake):
    config = tiny_demo_config(tmp_path, tiny_screen_source)
    result = run_snakemake(tmp_path, "-n", "--configfile", str(config), "--config", "plates=[T2]")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout + result.stderr)
    # T2 is an apply plate: its virtual stains need the model trained on T1, so T1 is prepared as far
    # as training needs (ingest, illumination, focus, denoising) and no further
    assert counts["stain_train"] == 1 and counts["stain_plate"] == 1 and "stain_evaluate" not in counts
    assert counts["segment_plate"] == 1 and "results/plates/T2/labels.zarr" in result.stdout
    assert "results/plates/T2/virtual.zarr" in result.stdout
    assert "results/plates/T1/virtual.zarr" not in result.stdout
    # the plate's features, profiles and matching; the screen's need every plate, so not with a selection
    assert counts["features_plate"] == 1 and counts["match_plate"] == 1 and "match_screen" not in counts
    assert counts["report_plate"] == 1 and "report_index" not in counts
    # with a model file given, nothing of T1 is needed
    (tmp_path / "vs").mkdir()
    (tmp_path / "vs" / "model.safetensors").write_bytes(b"")
    settings = yaml.safe_load(config.read_text())
    settings["stain"]["weights"] = "vs/model.safetensors"
    config.write_text(yaml.safe_dump(settings))
    result = run_snakemake(tmp_path, "-n", "--configfile", str(config), "--config", "plates=[T2]")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout + result.stderr)
    assert counts["validate_plate"] == 1 and counts["assemble_plate"] == 1 and "stain_train" not in counts
    assert "results/plates/T2/images.zarr" in result.stdout
    assert "results/plates/T1/images.zarr" not in result.stdout


def test_a_tiny_screen_plans_no_generalisation_model_it_cannot_hold_wells_out_for(
        tmp_path, tiny_screen_source, run_snakemake):
    """The demo's toxic group has one well on the tiny screen's training plate: the plan has no
    generalisation matrix (its models failed at run time before; the reasons, shown on the index page,
    are checked in tests/test_generalisation.py)."""
    config = tiny_demo_config(tmp_path, tiny_screen_source)
    result = run_snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout + result.stderr)
    assert counts["report_index"] == 1 and counts["stain_train"] == 1
    assert not any(rule.startswith("generalisation") for rule in counts)


def test_unknown_plate_in_filter_is_an_error(tmp_path, tiny_screen_source, run_snakemake):
    config = tiny_demo_config(tmp_path, tiny_screen_source)
    result = run_snakemake(tmp_path, "-n", "--configfile", str(config), "--config", "plates=[T9]")
    assert result.returncode != 0
    assert "config `plates` names plate(s) ['T9'] that the screen sheet" in result.stdout + result.stderr


def test_tiny_demo_end_to_end(tiny_run, run_snakemake):
    tmp_path, config = tiny_run
    results = tmp_path / "results"
    screen = results / "demo" / "screen"
    assert (screen / "plates.tsv").is_file() and (screen / "truth").is_dir()
    for plate in TINY_SPEC.plates:
        folder = results / "plates" / plate.plate
        sites = pd.read_csv(folder / "ingest" / "qc_sites.csv")
        assert len(sites) == TINY_SPEC.wells * TINY_SPEC.sites and (sites["status"] != "excluded").all()
        qc = pd.read_parquet(folder / "ingest" / "qc_images.parquet")
        manifest = pd.read_csv(screen / plate.plate / "manifest.csv")
        assert len(qc) == len(manifest)
        row = manifest[manifest["channel"] == "BF"].iloc[-1]
        np.testing.assert_array_equal(read_field(folder / "images.zarr", row.well, row.site)[0, 0, row.z],
                                      tifffile.imread(screen / plate.plate / row.path))
        shards = folder / "ingest" / "shards"
        assert not shards.exists() or not any(shards.iterdir()), "temporary shard stores left behind"
        for rule in ["validate_plate", "assemble_plate", "ingest_shard_0", "ingest_shard_1"]:
            assert (results / "logs" / plate.plate / f"{rule}.log").is_file()
            assert (results / "benchmarks" / plate.plate / f"{rule}.tsv").is_file()
    # illumination per channel; focus: the chosen plane against the truth
    for plate in TINY_SPEC.plates:
        folder = results / "plates" / plate.plate
        channels = ["BF", *CHANNELS["fluorescence"]] if plate.role != "apply" else ["BF"]
        assert sorted(p.stem for p in (folder / "illum").glob("*.npy")) == sorted(channels)
        flat = load_illumination(folder / "illum" / "BF.npy").flat
        assert flat.shape == (TINY_SPEC.size, TINY_SPEC.size) and abs(float(flat.mean()) - 1) < 0.05
        # how each function was made, and any identity flat with its reason, as the report shows it
        made = report.illumination_table({c: str(folder / "illum" / f"{c}.json") for c in channels})
        assert list(made["channel"]) == sorted(channels) and set(made["flat"]) <= {"estimated", "identity"}
        assert ((made["flat"] == "identity") == (made["reason"] != "")).all()
        focus = pd.read_parquet(folder / "focus.parquet")
        truth = pd.read_csv(screen / "truth" / plate.plate / "sites.csv")
        merged = focus.merge(truth, on=["well", "site"])
        assert len(merged) == TINY_SPEC.wells * TINY_SPEC.sites
        # 64 px sites hold a cell or two: judge the planes the QC did not flag (accuracy on real-sized
        # sites is tests/test_focus.py's job)
        unflagged = merged[merged["flag"] == ""]
        assert len(unflagged) >= len(merged) // 2
        assert (unflagged["plane"] - unflagged["focal_plane"]).abs().max() <= 1
        assert (folder / "focus.png").stat().st_size > 0
        stained = plate.role != "apply"
        assert (folder / "denoised.zarr").is_dir() == stained
        if stained:
            row = truth.iloc[0]
            denoised = read_field(folder / "denoised.zarr", row.well, row.site)
            assert denoised.shape == (1, 3, 1, TINY_SPEC.size, TINY_SPEC.size)
            assert np.isfinite(denoised).all() and denoised.std() > 0
            # the assessment decided per stain, and a stain kept is its corrected input
            assessment = json.loads((folder / "denoise" / "assessment.json").read_text())["channels"]
            assert sorted(assessment) == sorted(CHANNELS["fluorescence"])
            table = report.denoise_assessment(folder / "denoised.zarr").set_index("channel")
            assert table["apply"].to_dict() == {c: a["apply"] for c, a in assessment.items()}
            assert all(np.isfinite(a["estimated_gain_db"]) and a["sites"] for a in assessment.values())
            layout = StoreLayout.from_json((folder / "ingest" / "layout.json").read_text())
            denoised_channels = read_store_layout(folder / "denoised.zarr").channels
            for channel in CHANNELS["fluorescence"]:
                if not assessment[channel]["apply"]:
                    k = denoised_channels.index(channel)
                    raw = read_plane(folder / "images.zarr", row.well, row.site,
                                     layout.channels.index(channel), 0)
                    function = load_illumination(folder / "illum" / f"{channel}.npy")
                    corrected = correct_illumination(raw, function)
                    np.testing.assert_allclose(denoised[0, k, 0], corrected, rtol=1e-5, atol=1e-4)
            # the report's before / after figure
            crops = report.denoise_crops(PlateFolder(folder).sources_on_disk(), "BF")
            assert Image.open(io.BytesIO(base64.b64decode(crops.split(",", 1)[1]))).size[0] > 100
            metrics = pd.read_parquet(folder / "stain" / "metrics.parquet")
            assert set(metrics["channel"]) == set(CHANNELS["fluorescence"])
            assert len(metrics) >= 3 and len(metrics) % 3 == 0
        virtual = read_field(folder / "virtual.zarr", truth.iloc[0].well, truth.iloc[0].site)
        assert virtual.shape == (1, 6, 1, TINY_SPEC.size, TINY_SPEC.size) and np.isfinite(virtual).all()
        # virtual channels, then their uncertainty maps (test-time augmentation is on by default)
        assert read_store_layout(folder / "virtual.zarr").channels == (
            [f"VS_{c}" for c in CHANNELS["fluorescence"]] + [f"SD_{c}" for c in CHANNELS["fluorescence"]])
        assert (virtual[0, 3:] >= 0).all() and virtual[0, 3:].max() > 0
        stain_sites = pd.read_csv(folder / "stain" / "sites.csv", keep_default_na=False)
        scored = stain_sites[stain_sites["status"] == "ok"]
        assert len(scored) and scored["domain_score"].astype(float).notna().all()
        assert scored[[f"uncertainty_{c}" for c in CHANNELS["fluorescence"]]].astype(float).gt(0).all().all()
        # segmentation ran on every site of both inputs, and nothing was dropped unannounced
        segmented = pd.read_csv(folder / "segment" / "sites.csv", keep_default_na=False)
        assert len(segmented) == len(truth) * (2 if stained else 1)
        assert segmented["status"].isin(["ok", "no_objects", "skipped"]).all()
        assert (folder / "labels.zarr").is_dir() and (folder / "segment" / "metrics.parquet").is_file()
        # features: one qc row per segmented site and source, the cells of each site are its objects
        measured = pd.read_csv(folder / "features" / "sites.csv", keep_default_na=False)
        assert len(measured) == len(segmented)
        merged = measured.merge(segmented, on=["well", "site", "source"], suffixes=("", "_segment"))
        assert (merged["cells"] == merged["objects"]).all()
        assert (merged["status"] == "skipped").sum() == (merged["status_segment"] == "skipped").sum()
        cells = pd.read_parquet(folder / "features" / "cells.parquet")
        assert len(cells) == merged["cells"].sum()
        assert set(measured["source"]) == ({"real", "virtual"} if stained else {"virtual"})
        assert (results / "logs" / plate.plate / "features_shard_0.cellprofiler.log").is_file()
    # the stain model's held-out wells: a random draw on a tiny plate, too few sites, said so
    card = json.loads((results / "models" / "stain" / "all" / "card.json").read_text())
    held_out = card["n_sites"]["validation"]
    assert card["validation_filter"] == "" and 0 < held_out < 12
    assert card["wells"]["T1"]["validation"] and not set(card["wells"]["T1"]["validation"]) & set(
        card["wells"]["T1"]["train"])
    assert f"only {held_out} validation sites" in (results / "logs" / "stain_train_all.log").read_text()
    again = run_snakemake(tmp_path, "-n", "--configfile", str(config), *TINY_UNTIL)
    output = again.stdout + again.stderr
    assert "Nothing to be done" in output or job_counts(output) == {}, output[-2000:]


def user_screen(tmp_path: Path, source: Path) -> Path:
    """A user's own screen (not the demo): a copy of the tiny screen with a config that sets only
    `screen:` and `channels:`."""
    screen = tmp_path / "myscreen"
    shutil.copytree(source, screen)
    shutil.rmtree(screen / "truth")
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({"screen": "myscreen/plates.tsv", "channels": CHANNELS}))
    return config


def test_user_screen_with_only_screen_and_channels(tmp_path, tiny_screen_source, run_snakemake):
    config = user_screen(tmp_path, tiny_screen_source)
    # Every other key keeps its default. Up to the preprocessing: the later stages with default
    # settings are the demo run's (tests/test_stain.py, test_segment.py, test_demo_profiles.py), and
    # default-sized stain training on tiny plates would only cost CI minutes.
    result = run_snakemake(tmp_path, "--cores", "2", "--configfile", str(config),
                           "--until", "focus_plate", "illumination")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for plate in TINY_SPEC.plates:
        folder = tmp_path / "results" / "plates" / plate.plate
        assert (folder / "images.zarr" / "zarr.json").is_file()
        assert len(pd.read_parquet(folder / "focus.parquet")) == TINY_SPEC.wells * TINY_SPEC.sites
        channels = ["BF", *CHANNELS["fluorescence"]] if plate.role != "apply" else ["BF"]
        assert sorted(p.stem for p in (folder / "illum").glob("*.npy")) == sorted(channels)
    # A new plate on the sheet plans only its own jobs: the other plates stay done.
    add_plate(tmp_path / "myscreen", "T2", "T3")
    again = run_snakemake(tmp_path, "-n", "--configfile", str(config),
                          "--until", "focus_plate", "illumination")
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert job_counts(output) == {"validate_plate": 1, "ingest_shard": 2, "assemble_plate": 1,
                                  "focus_shard": 2, "focus_plate": 1, "illumination": 1}, output[-3000:]
    assert not re.search(r"wildcards: .*plate=T[12]\b", output), output[-3000:]


# Unlike the demo: thin cells that are phase objects in brightfield (least contrast at focus) and
# stains that sit at the camera offset outside cells (no autofluorescence to sample the field)
FOREIGN_SPEC = ScreenSpec(plates=(PlateSpec("F1", "B1", "flat", "both", bf_absorption=0.1,
                                            stain_background=0.0),),
                          wells=8, sites=2, size=128, seed=3)


def test_foreign_screen_preprocessing_holds(tmp_path, run_snakemake):
    """A screen the demo is not, with `screen:`, `channels:` and its camera's offset: the stains get
    the identity flat with the reason (the screen goes on), brightfield its estimated field, and the
    focal plane is found by contrast inversion where every sharpness score would miss it."""
    simulate_screen(tmp_path / "foreign", FOREIGN_SPEC)
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({"screen": "foreign/plates.tsv", "channels": CHANNELS,
                                      "illumination": {"dark": 100}}))
    result = run_snakemake(tmp_path, "--cores", "2", "--configfile", str(config),
                           "--until", "focus_plate", "illumination")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = tmp_path / "results" / "plates" / "F1"
    made = report.illumination_table({c: str(folder / "illum" / f"{c}.json")
                                      for c in ["BF", *CHANNELS["fluorescence"]]}).set_index("channel")
    assert made.loc["BF", "flat"] == "estimated"
    for stain in CHANNELS["fluorescence"]:
        assert made.loc[stain, "flat"] == "identity" and "no flat field" in made.loc[stain, "reason"]
        assert made.loc[stain, "offset_check"] == ""
    # the camera offset the data show: the stains' darkest areas, the configured 100 within 3 ADU
    offset = report.camera_offset_table(made.reset_index(), "BF").iloc[0]
    assert abs(offset["offset_at_most"] - 100) <= 3 and offset["note"] == "", offset.to_dict()
    focus = pd.read_parquet(folder / "focus.parquet")
    truth = pd.read_csv(tmp_path / "foreign" / "truth" / "F1" / "sites.csv")
    merged = focus.merge(truth, on=["well", "site"], validate="one_to_one")
    cells = merged[merged["n_cells"] >= 2]
    assert len(cells) >= 12
    exact = (cells["plane"] == cells["focal_plane"]).mean()
    scores = cells[[f"var_laplacian_z{z}" for z in range(5)]].to_numpy()
    sharpest = (scores.argmax(axis=1) == cells["focal_plane"].to_numpy()).mean()
    print(f"\nforeign screen: focal plane exact on {exact:.0%} of {len(cells)} sites with cells "
          f"(the sharpest plane would be on {sharpest:.0%})")
    assert exact >= 0.9 and (cells["basis"] == "contrast_inversion").mean() >= 0.9
    assert sharpest <= 0.2


def test_feature_pipeline_is_built_for_the_screens_own_channels(tmp_path, tiny_screen_source,
                                                                 run_snakemake):
    """A screen whose stains are Hoechst / Actin / gH2AX, virtual staining only two of them: the
    workflow builds the feature pipeline for the channels every measured source has."""
    screen = tmp_path / "myscreen"
    shutil.copytree(tiny_screen_source, screen)
    names = {"DNA": "Hoechst", "CYTO": "Actin", "DAMAGE": "gH2AX"}
    for manifest in screen.glob("*/manifest.csv"):
        table = pd.read_csv(manifest)
        table.assign(channel=table["channel"].replace(names)).to_csv(manifest, index=False)
    channels = {"brightfield": "BF", "nuclei": "Hoechst", "cell": "Actin",
                "fluorescence": ["Hoechst", "Actin", "gH2AX"]}
    config = tmp_path / "my.yaml"
    # the split pipeline (opt-in): its site and tiled halves; the demo run builds the whole one
    config.write_text(yaml.safe_dump({"screen": "myscreen/plates.tsv", "channels": channels,
                                      "stain": {"targets": ["Hoechst", "Actin"]},
                                      "features": {"tiled_pipeline": "auto"}}))
    built = [f"results/screen/features/pipeline_{part}.cppipe" for part in ("site", "tiled")]
    result = run_snakemake(tmp_path, *built, "--cores", "1", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for pipeline in built:
        assert pipeline_names(tmp_path / pipeline) == (["Hoechst", "Actin"], ["Nuclei", "Cells", "Cytoplasm"])
    # the features of every plate read the built pipeline
    plan = run_snakemake(tmp_path, "-n", "--configfile", str(config), "--until", "features_shard")
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    assert "features_pipeline" not in job_counts(plan.stdout + plan.stderr)
    assert job_counts(plan.stdout + plan.stderr)["features_shard"] == 2 * len(TINY_SPEC.plates)


def add_plate(screen: Path, source: str, plate: str) -> None:
    """Append `plate` to the screen sheet: a copy of plate `source`'s images, manifest and plate map."""
    shutil.copytree(screen / source, screen / plate)
    manifest = pd.read_csv(screen / plate / "manifest.csv")
    manifest.assign(plate=plate).to_csv(screen / plate / "manifest.csv", index=False)
    sheet = pd.read_csv(screen / "plates.tsv", sep="\t")
    row = sheet[sheet["plate"] == source].iloc[0].to_dict()
    row |= {"plate": plate, "manifest": f"{plate}/manifest.csv", "platemap": f"{plate}/platemap.csv"}
    pd.concat([sheet, pd.DataFrame([row])]).to_csv(screen / "plates.tsv", sep="\t", index=False)


def test_user_screen_bad_image_fails_naming_it_and_writes_nothing(tmp_path, tiny_screen_source,
                                                                  run_snakemake):
    config = user_screen(tmp_path, tiny_screen_source)
    manifest = pd.read_csv(tmp_path / "myscreen" / "T1" / "manifest.csv")
    row = manifest[manifest["channel"] == "CYTO"].iloc[2]
    (tmp_path / "myscreen" / "T1" / row.path).write_bytes(b"garbage")
    result = run_snakemake(tmp_path, "--cores", "1", "--configfile", str(config),
                           "--config", "plates=[T1]")
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "T1" / "validate_plate.log").read_text()
    assert f"well {row.well}, site {row.site}, channel CYTO, z 0: not a readable TIFF" in log
    plate_dir = tmp_path / "results" / "plates" / "T1"
    written = sorted(p.relative_to(plate_dir) for p in plate_dir.rglob("*")) if plate_dir.exists() else []
    assert [p for p in written if p.name != "ingest"] == []


def test_user_screen_duplicated_plate_stops_before_any_job(tmp_path, tiny_screen_source, run_snakemake):
    config = user_screen(tmp_path, tiny_screen_source)
    sheet = tmp_path / "myscreen" / "plates.tsv"
    lines = sheet.read_text().splitlines()
    sheet.write_text("\n".join(lines + [lines[1]]) + "\n")
    result = run_snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert "plate id 'T1' appears 2 times" in result.stdout + result.stderr


def test_config_channel_roles_are_checked(tmp_path, tiny_screen_source, run_snakemake):
    config = user_screen(tmp_path, tiny_screen_source)
    settings = yaml.safe_load(config.read_text())
    settings["channels"]["nuclei"] = "HOECHST"
    config.write_text(yaml.safe_dump(settings))
    result = run_snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert "channels.nuclei = 'HOECHST' must be one of channels.fluorescence" in result.stdout + result.stderr


def test_brightpaint_cli_simulate_and_validate(tmp_path):
    cli = shutil.which("brightpaint") or str(Path(REPO / ".venv" / "bin" / "brightpaint"))
    out = tmp_path / "screen"
    subprocess.run([cli, "simulate", "--out", str(out), "--wells", "2", "--sites", "1", "--size", "64",
                    "--plates", "2"], check=True, capture_output=True, text=True)
    assert (out / "plates.tsv").is_file()
    # two wells hold one negative control, too few to normalise profiles against: every well is
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({"channels": CHANNELS, "profiles": {"normalise_samples": "all"}}))
    ok = subprocess.run([cli, "validate", str(out / "plates.tsv"), "--config", str(config)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "2 plate(s) valid" in ok.stdout
    manifest = pd.read_csv(out / "P1" / "manifest.csv")
    (out / "P1" / manifest["path"].iloc[0]).unlink()
    bad = subprocess.run([cli, "validate", str(out / "plates.tsv"), "--config", str(config)],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"well {manifest['well'].iloc[0]}, site 1" in bad.stderr and "file not found" in bad.stderr


def test_user_screen_bad_pixels_become_qc_flags_not_crashes(tmp_path, tiny_screen_source, run_snakemake):
    """Through the workflow (issue 3): all-zero DNA images at one site, a brightfield stack full of
    NaN at another (the channel stored as float32 TIFFs: a mixed-dtype channel is an error naming
    every file), and a plate whose brightfield stack has one plane. The run goes through the
    preprocessing and each problem is a QC flag with its reason."""
    config = user_screen(tmp_path, tiny_screen_source)
    screen = tmp_path / "myscreen"
    manifest = pd.read_csv(screen / "T1" / "manifest.csv")
    sites = manifest[["well", "site"]].drop_duplicates().to_numpy()
    (zero_well, zero_site), (nan_well, nan_site) = sites[0], sites[1]
    dna = manifest[(manifest.well == zero_well) & (manifest.site == zero_site) & (manifest.channel == "DNA")]
    path = screen / "T1" / dna.iloc[0].path
    tifffile.imwrite(path, np.zeros_like(tifffile.imread(path)))
    for row in manifest[manifest.channel == "BF"].itertuples():  # a float32 channel can hold NaN
        image = tifffile.imread(screen / "T1" / row.path).astype(np.float32)
        if (row.well, row.site) == (nan_well, nan_site):
            image[:, :] = np.nan
        tifffile.imwrite(screen / "T1" / row.path, image)
    single = pd.read_csv(screen / "T2" / "manifest.csv")
    single = single[(single.channel != "BF") | (single.z == 2)]
    single = single.assign(z=np.where(single.channel == "BF", 0, single.z))
    single.to_csv(screen / "T2" / "manifest.csv", index=False)
    result = run_snakemake(tmp_path, "--cores", "2", "--configfile", str(config),
                           "--until", "focus_plate", "illumination")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    t1 = tmp_path / "results" / "plates" / "T1"
    qc = pd.read_csv(t1 / "ingest" / "qc_sites.csv", keep_default_na=False).set_index(["well", "site"])
    assert qc.loc[(zero_well, zero_site), "status"] == "flagged"
    assert "DNA" in qc.loc[(zero_well, zero_site), "reasons"]
    assert qc.loc[(nan_well, nan_site), "status"] == "flagged"
    assert "BF z0: NaN or infinite: 100.00% of pixels" in qc.loc[(nan_well, nan_site), "reasons"]
    focus = pd.read_parquet(t1 / "focus.parquet").set_index(["well", "site"])
    assert "nonfinite" in focus.loc[(nan_well, nan_site), "flag"] or "blank" in focus.loc[
        (nan_well, nan_site), "flag"]
    assert focus.loc[(nan_well, nan_site), "reason"] != ""
    for channel in ("BF", "DNA"):
        flat = load_illumination(t1 / "illum" / f"{channel}.npy").flat
        assert np.isfinite(flat).all() and abs(float(flat.mean()) - 1) < 0.05
    t2 = pd.read_parquet(tmp_path / "results" / "plates" / "T2" / "focus.parquet")
    assert (t2["plane"] == 0).all() and t2["flag"].str.contains("single_plane").all()
    flags = report.collect_flags(PlateFolder(t1).results_on_disk())
    assert {("ingest", zero_well, str(zero_site)), ("focus", nan_well, str(nan_site))} <= set(
        zip(flags.stage, flags.well, flags.site.astype(str), strict=True))


def test_run_killed_mid_write_resumes_cleanly(tmp_path, tiny_screen_source, run_snakemake):
    """kill -9 of the whole run while an output is being written (what a cancelled cluster job or a
    lost node does): no half-written store or table is left at a final path, and the same command
    with --unlock and --rerun-incomplete finishes the plate with the right pixels."""
    config = user_screen(tmp_path, tiny_screen_source)
    args = ["--cores", "2", "--configfile", str(config), "--until", "focus_plate", "illumination"]
    snakemake = Path(sys.executable).with_name("snakemake")
    process = subprocess.Popen([str(snakemake), "-s", str(REPO / "Snakefile"), *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = tmp_path / "results"
    partial = []
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and not partial:
        partial = list(results.rglob("*.partial-*")) if results.exists() else []
        time.sleep(0.01)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert partial, "the run ended before any output was being written"
    assert process.returncode == -signal.SIGKILL
    # what was cut short is at a temporary name; nothing downstream could have read it
    for path in partial:
        final = path.with_name(path.name.split(".partial-")[0].lstrip(".") + path.suffix)
        assert not final.exists() or not path.exists()
    # a killed snakemake leaves its lock: the documented recovery is --unlock, then --rerun-incomplete
    assert run_snakemake(tmp_path, "--unlock", "--configfile", str(config)).returncode == 0
    resumed = run_snakemake(tmp_path, *args, "--rerun-incomplete")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not list(results.rglob("*.partial-*")), "partial outputs left behind"
    for plate in TINY_SPEC.plates:
        folder = results / "plates" / plate.plate
        manifest = pd.read_csv(tmp_path / "myscreen" / plate.plate / "manifest.csv")
        for row in manifest[manifest["channel"] == "BF"].itertuples():
            np.testing.assert_array_equal(
                read_field(folder / "images.zarr", row.well, row.site)[0, 0, row.z],
                tifffile.imread(tmp_path / "myscreen" / plate.plate / row.path))
        assert len(pd.read_parquet(folder / "focus.parquet")) == TINY_SPEC.wells * TINY_SPEC.sites


@pytest.mark.parametrize("n_plates, shards", [(3, 2), (12, 5)])
def test_plan_grows_with_plates_times_shards(tmp_path, n_plates, shards, run_snakemake):
    """A screen description (no pixels) plans per plate x shard of wells, never per image: every
    per-site rule has plates x shards jobs, every per-plate rule one per plate."""
    sheet = describe_screen(tmp_path / "screen", n_plates, wells=24, sites=9, train_every=3)
    config = tmp_path / "channels.yaml"
    config.write_text(yaml.safe_dump({"channels": CHANNELS}))
    result = run_snakemake(tmp_path, "-n", "--configfile", str(config), "--config", f"screen={sheet}",
                           f"shards={shards}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    train = len(range(0, n_plates, 3))
    per_shard = ["ingest_shard", "focus_shard", "stain_shard", "segment_shard", "features_shard"]
    per_plate = ["validate_plate", "assemble_plate", "focus_plate", "stain_plate", "segment_calibrate",
                 "segment_plate", "segment_evaluate", "features_plate", "profiles_plate", "match_plate",
                 "report_plate"]
    expected = ({rule: n_plates * shards for rule in per_shard} | {rule: n_plates for rule in per_plate}
                | {"illumination": n_plates + 3 * train, "stain_evaluate": train, "stain_train": 1,
                   # Noise2Void (on by default): a model per train plate and stain, a job per shard
                   "denoise_train_plate": 3 * train, "denoise_assess": train, "denoise_shard": train * shards,
                   "denoise_plate": train,
                   "features_pipeline": 1, "profiles_screen": 1, "match_screen": 1, "report_index": 1,
                   "all": 1})
    # every plate is flat and a user's screen gets no phenotype groups by default: no matrix
    assert matrix_groups(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), {"flat"}) == 0
    assert job_counts(output) == expected
