"""Broken and hostile input (issue 22): every problem a clear message naming file, line and field,
never a traceback; names that could leave their folder refused; sizes bounded before pixels are read;
`brightpaint validate` refusing wherever the workflow would."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from conftest import CHANNELS, TINY_SPEC

from brightpaint.cli import main
from brightpaint.errors import UserError
from brightpaint.io import InputError, name_problem, read_manifest, read_platemap, read_screen_sheet
from brightpaint.logs import log_to_rule
from brightpaint.plate import PlateError
from brightpaint.validate import ImageLimits, images_stamp, read_image_header, validate_plate
from brightpaint.workflow import ConfigError, Screen, check_config, merged_config, read_config_file

REPO = Path(__file__).resolve().parents[1]


def validate(screen: Path, plate: str = "T1", role: str = "train", on_missing: str = "error",
             limits: ImageLimits | None = None):
    return validate_plate(str(screen / plate / "manifest.csv"), str(screen / plate / "platemap.csv"),
                          plate, role, CHANNELS, str(screen), on_missing,
                          limits=limits or ImageLimits())


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the command line in-process: (exit code, stderr)."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def user_config(folder: Path, **settings) -> Path:
    """A user's config for the tiny screen. A tiny plate has one negative-control well, so its
    profiles are normalised against every well."""
    config = merged_config({"channels": CHANNELS, "profiles": {"normalise_samples": "all"}}, settings)
    path = folder / "my.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def append_to_data_lines(path: Path, text: str) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], *(line + text for line in lines[1:])]) + "\n")


def test_one_error_type_for_user_errors():
    for kind in (InputError, ConfigError, PlateError):
        assert issubclass(kind, UserError)


# --- raw tracebacks that became messages -------------------------------------------------------


@pytest.mark.parametrize("table, sep", [("T1/manifest.csv", ","), ("T1/platemap.csv", ","),
                                        ("plates.tsv", "\t")])
def test_trailing_delimiter_on_data_rows_names_the_file_and_line(tiny_screen, table, sep):
    path = tiny_screen / table
    append_to_data_lines(path, sep)
    reader = {"manifest.csv": lambda: read_manifest(path, "T1", tiny_screen),
              "platemap.csv": lambda: read_platemap(path),
              "plates.tsv": lambda: read_screen_sheet(path)}[path.name]
    with pytest.raises(InputError) as err:
        reader()
    n_rows = len(path.read_text().splitlines()) - 1
    assert str(err.value).splitlines()[1] == (
        f"  - {path} (line 2): 7 fields, the header has 6 (a delimiter at the end of the line?); "
        f"so do {n_rows - 1} more row(s), the last at line {n_rows + 1}")


@pytest.mark.parametrize("column, field", [("site", "site"), ("z", "z")])
def test_a_20_digit_site_or_z_is_named(tiny_screen, column, field):
    path = tiny_screen / "T1" / "manifest.csv"
    manifest = pd.read_csv(path, dtype=str)
    manifest.loc[3, column] = "12345678901234567890"
    manifest.to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        read_manifest(path, "T1", tiny_screen)
    assert f"{path} (line 5)" in str(err.value)
    assert f"{field} '12345678901234567890' is not an integer from" in str(err.value)


def test_every_site_excluded_under_flag_is_an_error(tiny_screen):
    images = list((tiny_screen / "T2" / "images").iterdir())
    for image in images:
        image.unlink()
    with pytest.raises(InputError) as err:
        validate(tiny_screen, "T2", "apply", on_missing="flag")
    lines = str(err.value).splitlines()
    assert lines[1] == (f"  - {tiny_screen / 'T2' / 'manifest.csv'}: every site is excluded "
                        f"(ingest.on_missing: flag): no image is left to ingest; "
                        f"{len(images)} problem(s), listed below")
    assert "file not found" in lines[2]


@pytest.mark.parametrize("config_text, message", [
    ("screen: x\n", "(top level): 'channels' is a required property"),
    ("channels: [BF, DNA]\n", "channels: ['BF', 'DNA'] is not of type 'object'"),
    ("channels: {brightfield: BF\n", "not valid YAML (line 2, column 1)"),
    (None, "cannot be read (No such file or directory)"),
])
def test_validate_with_a_broken_config_is_one_message(tiny_screen, capsys, config_text, message):
    config = tiny_screen / "my.yaml"
    if config_text is not None:
        config.write_text(config_text)
    code, err = cli(capsys, "validate", str(tiny_screen / "plates.tsv"), "--config", str(config))
    assert code == 1 and "Traceback" not in err
    assert err.startswith("brightpaint validate: ") and message in err
    assert f"config {config}" in err


def test_manifest_from_folder_on_a_missing_folder(tmp_path, capsys):
    code, err = cli(capsys, "manifest-from-folder", str(tmp_path / "nope"), "{well}_{channel}.tif",
                    "--plate", "P1")
    assert (code, err) == (1, f"brightpaint manifest-from-folder: folder {tmp_path / 'nope'} not "
                              "found (or not a folder)\n")


def test_simulate_with_too_few_planes_names_the_option(tmp_path, capsys):
    code, err = cli(capsys, "simulate", "--out", str(tmp_path / "s"), "--z-planes", "3")
    assert (code, err) == (1, "brightpaint simulate: --z-planes: 3 is out of range (must be >= 5)\n")
    assert not (tmp_path / "s").exists()


def test_a_user_error_in_a_workflow_script_logs_one_line_and_keeps_the_traceback(tmp_path, capsys):
    class Job:  # what log_to_rule reads of the snakemake object
        log = [str(tmp_path / "job.log")]

    hook = sys.excepthook
    try:
        log_to_rule(Job())
        try:
            raise InputError([], "plate P1")
        except InputError as err:
            sys.excepthook(type(err), err, err.__traceback__)
    finally:
        sys.excepthook = hook
        logging.getLogger().handlers.clear()
    stderr = capsys.readouterr().err
    assert "0 problem(s) in plate P1" in stderr and "Traceback" not in stderr
    assert "Traceback" in (tmp_path / "job.log").read_text()


# --- plate ids and channel names as path components ---------------------------------------------


@pytest.mark.parametrize("name", [".", "..", "...", "-rf", "../../evil", "a/b", "", ".hidden",
                                  "x" * 65])
def test_names_that_could_leave_their_folder_are_refused(name):
    assert "is not a valid name" in name_problem(name, "channel")


@pytest.mark.parametrize("name", ["P1", "T_2", "BR00116991", "plate-1.2", "OrigDNA", "2", "x" * 64])
def test_ordinary_names_pass(name):
    assert name_problem(name, "plate id") is None


@pytest.mark.parametrize("plate", [".", "..", "...", "-rf"])
def test_sheet_plate_ids_that_are_no_folder_names_are_refused(tiny_screen, plate):
    path = tiny_screen / "plates.tsv"
    sheet = pd.read_csv(path, sep="\t", dtype=str)
    sheet.loc[1, "plate"] = plate
    sheet.to_csv(path, sep="\t", index=False)
    with pytest.raises(InputError) as err:
        read_screen_sheet(path)
    assert f"{path} (line 3): plate id {plate!r} is not a valid name" in str(err.value)


def test_a_channel_name_leaving_its_folder_is_refused_in_manifest_and_config(tiny_screen, capsys):
    path = tiny_screen / "T1" / "manifest.csv"
    manifest = pd.read_csv(path, dtype=str)
    manifest.loc[manifest["channel"] == "DAMAGE", "channel"] = "../../evil"
    manifest.to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        read_manifest(path, "T1", tiny_screen)
    line = int(np.flatnonzero(manifest["channel"] == "../../evil")[0]) + 2
    assert f"{path} (line {line}), well" in str(err.value)
    assert "channel '../../evil' is not a valid name" in str(err.value)
    config = user_config(tiny_screen, channels={"fluorescence": ["DNA", "CYTO", "../../evil"]})
    code, err = cli(capsys, "validate", str(tiny_screen / "plates.tsv"), "--config", str(config))
    assert code == 1 and "Traceback" not in err
    assert "channels.fluorescence entry '../../evil' is not a valid name" in err


# --- limits checked before pixels are read -----------------------------------------------------


def test_a_header_claiming_a_huge_image_is_refused_before_reading(tiny_screen):
    path = tiny_screen / "T1" / "images" / sorted(p.name for p in (tiny_screen / "T1" / "images")
                                                 .iterdir())[0]
    with tifffile.TiffFile(path, mode="r+b") as tif:  # forge the header; the data stays 64 x 64
        tif.pages.first.tags["ImageWidth"].overwrite(100_000)
        tif.pages.first.tags["ImageLength"].overwrite(100_000)
    header = read_image_header(str(path))
    assert header.problem == ("image of 100000 x 100000 = 10000000000 pixels, more than the limit of "
                              "100000000 (config ingest.max_image_pixels)")
    with pytest.raises(InputError, match=r"named at .*manifest.csv line \d+\).*more than the limit"):
        validate(tiny_screen)


def test_the_pixel_limit_can_be_raised_and_lowered(tiny_screen):
    with pytest.raises(InputError, match="4096 pixels, more than the limit of 4000"):
        validate(tiny_screen, limits=ImageLimits(max_image_pixels=4000))
    images, _ = validate(tiny_screen, limits=ImageLimits(max_image_pixels=4096))
    assert len(images)


def test_a_single_plane_channel_far_beyond_the_stack_is_refused(tiny_screen):
    path = tiny_screen / "T1" / "manifest.csv"
    manifest = pd.read_csv(path, dtype=str)
    manifest.loc[manifest["channel"] == "DNA", "z"] = "20000"
    manifest.to_csv(path, index=False)
    line = int(np.flatnonzero(manifest["channel"] == "DNA")[0]) + 2
    with pytest.raises(InputError) as err:
        validate(tiny_screen)
    assert (f"{path} (line {line}), channel DNA: z 20000 is out of range: a single-plane channel "
            f"must sit at a plane of the brightfield stack (z 0..{TINY_SPEC.z_planes - 1})"
            in str(err.value))


def test_planes_per_stack_are_limited(tiny_screen):
    with pytest.raises(InputError, match=rf"channel BF: {TINY_SPEC.z_planes} planes, more than the "
                                         r"limit of 3 \(config ingest.max_planes\)"):
        validate(tiny_screen, limits=ImageLimits(max_planes=3))


def test_a_stack_with_a_gap_in_its_planes_is_refused(tiny_screen):
    path = tiny_screen / "T1" / "manifest.csv"
    manifest = pd.read_csv(path, dtype=str)
    manifest.loc[(manifest["channel"] == "BF") & (manifest["z"] == "4"), "z"] = "9"
    manifest.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"channel BF: z 9 is out of range: a stack of 5 planes has "
                                         r"z 0\.\.4"):
        validate(tiny_screen)


def test_limits_are_config_settings_with_defaults():
    defaults = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["ingest"]
    assert ImageLimits.from_config(defaults) == ImageLimits()


# --- brightpaint validate refuses where the workflow would -------------------------------------


def test_validate_passes_a_valid_screen(tiny_screen, capsys):
    code = main(["validate", str(tiny_screen / "plates.tsv"), "--config",
                 str(user_config(tiny_screen))])
    assert code == 0 and capsys.readouterr().out.endswith("2 plate(s) valid\n")


def test_validate_needs_the_screens_config(tiny_screen, capsys):
    """A screen is checked against its own channels: no silent fallback to the demo's."""
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(tiny_screen / "plates.tsv")])
    assert exit_.value.code == 2 and "--config" in capsys.readouterr().err


def test_validate_pixels_finds_saturated_and_blank_images_before_a_run(tiny_screen, capsys):
    manifest = pd.read_csv(tiny_screen / "T1" / "manifest.csv")
    dna = manifest[manifest["channel"] == "DNA"].reset_index(drop=True)
    saturated, blank = tiny_screen / "T1" / dna.loc[0, "path"], tiny_screen / "T1" / dna.loc[1, "path"]
    image = tifffile.imread(saturated)
    image[: image.shape[0] // 2] = np.iinfo(image.dtype).max
    tifffile.imwrite(saturated, image)
    tifffile.imwrite(blank, np.zeros_like(image))
    config = str(user_config(tiny_screen))
    code = main(["validate", str(tiny_screen / "plates.tsv"), "--config", config, "--pixels", "100000"])
    out = capsys.readouterr().out
    assert code == 0 and "pixels of" in out
    flagged = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(flagged) == 2, out
    assert any(str(saturated) in line and "saturated: 50.00% of pixels" in line for line in flagged)
    assert any(str(blank) in line and "blank image (constant value 0)" in line for line in flagged)
    # a sample: as many images as asked for, the same ones every time
    main(["validate", str(tiny_screen / "plates.tsv"), "--config", config, "--pixels", "3"])
    assert "plate T1: pixels of 3 image(s) read" in capsys.readouterr().out


@pytest.mark.parametrize("channels, message", [
    ({"nuclei": "HOECHST"}, "channels.nuclei = 'HOECHST' must be one of channels.fluorescence"),
    ({"fluorescence": ["DNA", "CYTO", "DAMAGE", "BF"]}, "channels.brightfield 'BF' is also listed"),
    ({"fluorescence": ["DNA", "CYTO", "DNA"]}, "has non-unique elements"),
])
def test_validate_checks_channel_roles(tiny_screen, capsys, channels, message):
    config = user_config(tiny_screen, channels=channels)
    code, err = cli(capsys, "validate", str(tiny_screen / "plates.tsv"), "--config", str(config))
    assert code == 1 and message in err and "Traceback" not in err


def test_validate_checks_the_config_schema(tiny_screen, capsys):
    config = user_config(tiny_screen, ingest={"on_missing": "maybe", "max_planes": 0})
    code, err = cli(capsys, "validate", str(tiny_screen / "plates.tsv"), "--config", str(config))
    assert code == 1
    assert f"2 problem(s) in config {config}:" in err
    assert "ingest.max_planes: 0 is less than the minimum of 1" in err
    assert "ingest.on_missing: 'maybe' is not one of ['error', 'flag']" in err


def test_the_workflow_and_validate_share_the_config_check():
    config = merged_config(read_config_file(REPO / "config" / "config.yaml"),
                           {"screen": "plates.tsv", "channels": {**CHANNELS, "cell": "DNA2"}})
    with pytest.raises(ConfigError, match="channels.cell = 'DNA2' must be one of"):
        check_config(config)
    with pytest.raises(ConfigError, match="channels.cell = 'DNA2' must be one of"):
        Screen.from_config(config)
    assert "check_config(config" in (REPO / "Snakefile").read_text()


def test_a_header_only_sheet_is_an_error(tiny_screen, capsys):
    sheet = tiny_screen / "plates.tsv"
    sheet.write_text(sheet.read_text().splitlines()[0] + "\n")
    code, err = cli(capsys, "validate", str(sheet), "--config", str(user_config(tiny_screen)))
    assert (code, err) == (1, f"brightpaint validate: 1 problem(s) in screen sheet:\n  - {sheet}: no "
                              "plate: the sheet has a header but no plate rows\n")


def test_too_few_negative_control_wells_fail_validation(tiny_screen, capsys):
    config = user_config(tiny_screen, profiles={"normalise_samples": "Metadata_control_type == 'negcon'"})
    code, err = cli(capsys, "validate", str(tiny_screen / "plates.tsv"), "--config", str(config))
    assert code == 1
    assert (f"{tiny_screen / 'T1' / 'platemap.csv'}: 1 imaged well(s) match "
            "profiles.normalise_samples \"Metadata_control_type == 'negcon'\"; normalise "
            "mad_robustize needs at least 2 reference wells per plate") in err


@pytest.mark.parametrize("dose, message", [("inf", "dose 'inf' is not a finite number"),
                                           ("nan", "dose 'nan' is not a finite number"),
                                           ("", "empty dose on a treated (trt) well")])
def test_treated_wells_need_a_finite_dose(tiny_screen, dose, message):
    path = tiny_screen / "T1" / "platemap.csv"
    platemap = pd.read_csv(path, dtype=str, keep_default_na=False)
    treated = int(np.flatnonzero(platemap["control_type"] == "trt")[0])
    platemap.loc[treated, "dose"] = dose
    platemap.to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        read_platemap(path)
    assert f"{path} (line {treated + 2}), well {platemap.loc[treated, 'well']}: {message}" in str(err.value)


# --- messages that keep their place ------------------------------------------------------------


def test_line_numbers_count_blank_lines(tiny_screen):
    path = tiny_screen / "T1" / "manifest.csv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("T1,", "T1,Z99_", 1)  # a bad well on the third data row
    path.write_text("\n".join([lines[0], "", "", *lines[1:]]) + "\n")  # two blank lines first
    with pytest.raises(InputError) as err:
        read_manifest(path, "T1", tiny_screen)
    assert f"{path} (line 6): well 'Z99_" in str(err.value)


def test_cross_file_and_image_problems_name_the_manifest_line(tiny_screen):
    manifest_path = tiny_screen / "T1" / "manifest.csv"
    manifest = pd.read_csv(manifest_path, dtype=str)
    platemap_path = tiny_screen / "T1" / "platemap.csv"
    platemap = pd.read_csv(platemap_path, dtype=str, keep_default_na=False)
    dropped = platemap["well"].iloc[-1]
    platemap.iloc[:-1].to_csv(platemap_path, index=False)
    missing = manifest.iloc[7]
    (tiny_screen / "T1" / missing["path"]).unlink()
    with pytest.raises(InputError) as err:
        validate(tiny_screen)
    text = str(err.value)
    first = int(np.flatnonzero(manifest["well"] == dropped)[0]) + 2
    assert (f"{manifest_path} (line {first}), well {dropped}: well is in the manifest but not in "
            f"the plate map {platemap_path}") in text
    assert f"{missing['path']} (named at {manifest_path} line 9), well {missing['well']}" in text


def test_a_plate_over_the_byte_limit_is_refused_before_any_pixel(tiny_screen):
    images, _ = validate(tiny_screen)
    total = int(images["bytes"].sum())
    validate(tiny_screen, limits=ImageLimits(max_plate_bytes=total))
    with pytest.raises(InputError, match=rf"hold {total} bytes, more than the limit of {total - 1} "
                                         r"\(config ingest.max_plate_bytes\)"):
        validate(tiny_screen, limits=ImageLimits(max_plate_bytes=total - 1))


def test_the_images_stamp_follows_size_and_time_of_every_listed_file(tiny_screen):
    manifest = tiny_screen / "T1" / "manifest.csv"
    before = images_stamp(manifest, "T1", tiny_screen)
    assert images_stamp(manifest, "T1", tiny_screen) == before
    image = sorted((tiny_screen / "T1").rglob("*.tif"))[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    touched = images_stamp(manifest, "T1", tiny_screen)
    assert touched != before
    image.unlink()
    assert images_stamp(manifest, "T1", tiny_screen) not in (before, touched)
