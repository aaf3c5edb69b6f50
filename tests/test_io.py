"""The input contract readers: screen sheet, manifest, LoadData CSV, folder + pattern, plate map."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import TINY_SPEC, shared_data

from brightpaint.errors import UserError
from brightpaint.io import (
    MANIFEST_COLUMNS,
    InputError,
    loaddata_to_manifest,
    manifest_from_folder,
    normalise_well,
    open_inside,
    read_manifest,
    read_platemap,
    read_screen_sheet,
)


def test_normalise_well():
    assert normalise_well("a1") == "A01"
    assert normalise_well("P24") == "P24"
    assert normalise_well(" B07 ") == "B07"
    assert normalise_well("Q01") is None
    assert normalise_well("A25") is None
    assert normalise_well("A00") is None


def test_screen_sheet_reads_the_generated_screen(tiny_screen):
    sheet = read_screen_sheet(tiny_screen / "plates.tsv")
    assert list(sheet["plate"]) == [p.plate for p in TINY_SPEC.plates]
    assert list(sheet["role"]) == [p.role for p in TINY_SPEC.plates]
    for path in list(sheet["manifest"]) + list(sheet["platemap"]):
        assert path.startswith(str(tiny_screen.resolve()))


def test_screen_sheet_duplicated_plate_and_bad_role_listed_together(tiny_screen):
    sheet = pd.read_csv(tiny_screen / "plates.tsv", sep="\t", dtype=str)
    sheet = pd.concat([sheet, sheet.iloc[[0]]])
    sheet.iloc[1, sheet.columns.get_loc("role")] = "training"
    sheet.to_csv(tiny_screen / "plates.tsv", sep="\t", index=False)
    with pytest.raises(InputError) as err:
        read_screen_sheet(tiny_screen / "plates.tsv")
    message = str(err.value)
    assert "plate id 'T1' appears 2 times" in message
    assert "role 'training'" in message and "plate 'T2'" in message


def test_screen_sheet_path_outside_screen_folder(tiny_screen, tmp_path):
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("well,perturbation,dose,control_type,moa,target\n")
    sheet = pd.read_csv(tiny_screen / "plates.tsv", sep="\t", dtype=str)
    sheet.loc[0, "platemap"] = "../elsewhere.csv"
    sheet.to_csv(tiny_screen / "plates.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"platemap path '../elsewhere.csv' leaves the screen folder"):
        read_screen_sheet(tiny_screen / "plates.tsv")


def test_screen_sheet_missing_column(tmp_path):
    (tmp_path / "plates.tsv").write_text("plate\tmanifest\nP1\tm.csv\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['platemap', 'role'\]"):
        read_screen_sheet(tmp_path / "plates.tsv")


def test_manifest_round_trip(tiny_screen):
    manifest = read_manifest(tiny_screen / "T1" / "manifest.csv", plate="T1", root=tiny_screen)
    n_sites = TINY_SPEC.wells * TINY_SPEC.sites
    assert len(manifest) == n_sites * (TINY_SPEC.z_planes + 3)
    assert set(manifest["channel"]) == {"BF", "DNA", "CYTO", "DAMAGE"}
    assert sorted(set(manifest.loc[manifest["channel"] == "BF", "z"])) == list(range(TINY_SPEC.z_planes))
    assert set(manifest.loc[manifest["channel"] != "BF", "z"]) == {0}
    assert manifest["file"].map(lambda f: f.endswith(".tif")).all()
    apply = read_manifest(tiny_screen / "T2" / "manifest.csv", plate="T2", root=tiny_screen)
    assert set(apply["channel"]) == {"BF"}


def test_manifest_problems_are_named_and_listed_at_once(tiny_screen):
    path = tiny_screen / "T1" / "manifest.csv"
    manifest = pd.read_csv(path, dtype=str)
    manifest.loc[0, "well"] = "Z99"
    manifest.loc[1, "site"] = "0"
    manifest.loc[2, "path"] = "../../../etc/passwd"
    manifest = pd.concat([manifest, manifest.iloc[[5]]])
    manifest.to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        read_manifest(path, plate="T1", root=tiny_screen)
    message = str(err.value)
    assert "well 'Z99' is not a 384-well plate well" in message
    assert "site '0' is not an integer from 1" in message
    assert "path '../../../etc/passwd' leaves the screen folder" in message
    assert "line 2" in message and "line 3" in message and "line 4" in message


def test_manifest_duplicate_rows_named(tiny_screen):
    path = tiny_screen / "T1" / "manifest.csv"
    manifest = pd.read_csv(path, dtype=str)
    pd.concat([manifest, manifest.iloc[[5]]]).to_csv(path, index=False)
    row = manifest.iloc[5]
    where = f"well {row['well']}, site {row['site']}, channel {row['channel']}"
    with pytest.raises(InputError, match=rf"{where}.*2 rows"):
        read_manifest(path, plate="T1", root=tiny_screen)


def test_manifest_wrong_plate(tiny_screen):
    with pytest.raises(InputError, match="the screen sheet expects only 'T2'"):
        read_manifest(tiny_screen / "T1" / "manifest.csv", plate="T2", root=tiny_screen)


def to_loaddata(manifest: pd.DataFrame) -> pd.DataFrame:
    """A LoadData CSV as CellProfiler users write it: one row per (well, site, z), a FileName_ /
    PathName_ pair per channel, empty where a channel has no image at that z."""
    rows = []
    for (well, site, z), group in manifest.groupby(["well", "site", "z"]):
        row = {"Metadata_Plate": group["plate"].iloc[0], "Metadata_Well": well,
               "Metadata_Site": site, "Metadata_Z": z}
        for channel in sorted(set(manifest["channel"])):
            match = group[group["channel"] == channel]
            path = match["path"].iloc[0] if len(match) else ""
            row[f"FileName_{channel}"] = path.rsplit("/", 1)[-1]
            row[f"PathName_{channel}"] = path.rsplit("/", 1)[0] if path else ""
        rows.append(row)
    return pd.DataFrame(rows)


def test_loaddata_csv_gives_the_same_manifest(tiny_screen):
    folder = tiny_screen / "T1"
    manifest = read_manifest(folder / "manifest.csv", plate="T1", root=tiny_screen)
    to_loaddata(manifest).to_csv(folder / "load_data.csv", index=False)
    from_loaddata = read_manifest(folder / "load_data.csv", plate="T1", root=tiny_screen)
    # the same images; each names the line of its own file
    pd.testing.assert_frame_equal(from_loaddata.drop(columns="line"), manifest.drop(columns="line"))
    assert from_loaddata["line"].max() == len(to_loaddata(manifest)) + 1


def test_loaddata_of_a_real_jump_site():
    """The Image.csv of a real CPJUMP1 site has LoadData's columns: 8 image channels plus 8
    illumination functions (.npy), which are not images and must not become manifest rows."""
    folder = shared_data("cytotable-cp-outputs")
    image_csv = folder / "tests/data/cellprofiler/cpg0043-segmentation/BR00116991-A01-1/Image.csv"
    table = pd.read_csv(image_csv, dtype=str, keep_default_na=False)
    manifest = loaddata_to_manifest(table, image_csv)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert sorted(manifest["channel"]) == sorted(
        f"Orig{c}" for c in ["AGP", "Brightfield", "DNA", "ER", "HighZBF", "LowZBF", "Mito", "RNA"])
    assert set(manifest["plate"]) == {"BR00116991"} and set(manifest["well"]) == {"A01"}
    dna = manifest[manifest["channel"] == "OrigDNA"].iloc[0]
    assert dna["path"].endswith("r01c01f01p01-ch5sk1fk1fl1.tiff")  # ch5 = DNA per the data's README


def test_manifest_from_folder_matches_generated_manifest(tiny_screen):
    folder = tiny_screen / "T1"
    built = manifest_from_folder(folder, "images/{well}_s{site}_{channel}_z{z}.tif", plate="T1")
    expected = pd.read_csv(folder / "manifest.csv")
    key = ["well", "site", "channel", "z"]
    built = built.sort_values(key).reset_index(drop=True)
    expected = expected.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(built, expected, check_dtype=False)


def test_manifest_from_folder_on_real_instrument_names():
    """BBBC016 file names (AS_09047_050428030001_O01f00d2.TIF): well O01..O24, field f00.. counted
    from 0, channel d2."""
    folder = shared_data("cp-example-illumcorr") / "ExampleIlluminationCorrection" / "images"
    manifest = manifest_from_folder(folder, "AS_*_{well}f{site}d{channel}.TIF", plate="BBBC016",
                                    site_offset=1)
    assert len(manifest) == 72
    assert set(manifest["site"]) == {1, 2, 3}
    assert set(manifest["channel"]) == {"2"}
    assert sorted(set(manifest["well"]))[:3] == ["O01", "O02", "O03"]
    assert manifest.groupby("well").size().eq(3).all()


def test_manifest_from_folder_requires_well_and_channel(tmp_path):
    with pytest.raises(ValueError, match="must contain"):
        manifest_from_folder(tmp_path, "{well}_{site}.tif", plate="P")


def test_platemap(tiny_screen):
    platemap = read_platemap(tiny_screen / "T1" / "platemap.csv")
    assert len(platemap) == TINY_SPEC.wells
    assert set(platemap["control_type"]) <= {"negcon", "poscon", "trt"}
    assert (platemap.loc[platemap["control_type"] == "negcon", "moa"] == "").all()


def test_platemap_problems(tmp_path):
    path = tmp_path / "platemap.csv"
    path.write_text("well,perturbation,dose,control_type,moa,target\n"
                    "A01,DMSO,0,negative,,\nA01,etoposide,high,trt,x,TOP2A\n")
    with pytest.raises(InputError) as err:
        read_platemap(path)
    message = str(err.value)
    assert "control_type 'negative'" in message
    assert "dose 'high' is not a number" in message
    assert "well A01: well listed 2 times" in message


def test_open_inside_opens_only_files_whose_real_path_stays_inside(tmp_path, monkeypatch):
    root, outside = tmp_path / "screen", tmp_path / "outside.bin"
    root.mkdir()
    (root / "image.bin").write_bytes(b"in")
    outside.write_bytes(b"out")
    (root / "link.bin").symlink_to(outside)
    handle, real = open_inside(root / "image.bin", root)
    with handle:
        assert handle.read() == b"in" and real == (root / "image.bin").resolve()
    for path in (root / "link.bin", root / ".." / "outside.bin"):
        assert open_inside(path, root) == (None, outside.resolve())
    # a path swapped between the check and the open: what the descriptor opened is checked too
    monkeypatch.setattr("brightpaint.io.os.readlink", lambda link: str(outside))
    assert open_inside(root / "image.bin", root) == (None, outside)


def test_platemap_control_labels_as_the_screen_writes_them(tmp_path):
    """A LINCS-style plate map (ctl_vehicle / trt_cp, no moa or target columns) reads with the
    screen's labels: the type in control_type, the written value in control_label; without them,
    or with a label under two types, the error names the value, the well and the config key."""
    path = tmp_path / "platemap.csv"
    path.write_text("well,perturbation,dose,control_type\nA01,DMSO,,ctl_vehicle\n"
                    "A02,BRD-K1,10,trt_cp\nA03,BRD-K1,3.3,trt_cp\n")
    labels = {"negcon": ["ctl_vehicle"], "trt": ["trt_cp"]}
    platemap = read_platemap(path, labels)
    assert list(platemap["control_type"]) == ["negcon", "trt", "trt"]
    assert list(platemap["control_label"]) == ["ctl_vehicle", "trt_cp", "trt_cp"]
    assert (platemap["moa"] == "").all() and (platemap["target"] == "").all()
    assert platemap["dose"].tolist()[1:] == [10.0, 3.3]
    with pytest.raises(InputError) as err:
        read_platemap(path)
    message = str(err.value)
    assert "well A01" in message and "control_type 'ctl_vehicle'" in message
    assert "platemap.control_types" in message and "well A02" in message
    with pytest.raises(UserError, match="'trt_cp' is listed under both negcon and trt"):
        read_platemap(path, {"negcon": ["ctl_vehicle", "trt_cp"], "trt": ["trt_cp"]})


def test_platemap_and_sheet_optional_columns(tmp_path):
    """Without a dose column a treated well needs no dose (with one, an empty dose on a treated
    well is still an error); a sheet without batch / cell_type gets 'unspecified'."""
    path = tmp_path / "platemap.csv"
    path.write_text("well,perturbation,control_type\nA01,DMSO,negcon\nA02,siRNA-7,trt\n")
    platemap = read_platemap(path)
    assert platemap["dose"].isna().all() and list(platemap["control_label"]) == ["negcon", "trt"]
    path.write_text("well,perturbation,dose,control_type\nA01,DMSO,,negcon\nA02,siRNA-7,,trt\n")
    with pytest.raises(InputError, match="well A02: empty dose on a treated"):
        read_platemap(path)
    path.write_text("well,dose\nA01,1\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['perturbation', 'control_type'\]"):
        read_platemap(path)
    (tmp_path / "m.csv").write_text("x")
    (tmp_path / "plates.tsv").write_text("plate\tmanifest\tplatemap\trole\nP1\tm.csv\tplatemap.csv\ttrain\n")
    sheet = read_screen_sheet(tmp_path / "plates.tsv")
    assert sheet.loc[0, "batch"] == "unspecified" and sheet.loc[0, "cell_type"] == "unspecified"
