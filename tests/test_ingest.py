"""Validation of a plate and the OME-Zarr ingest: round trip, metadata, bad inputs, no partial output."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from conftest import CHANNELS, TINY_SPEC
from ome_zarr.io import parse_url
from ome_zarr.reader import Plate, Reader

from brightpaint.ingest import (
    assemble_plate_store,
    field_path,
    plan_layout,
    read_field,
    read_site_tiffs,
    shard_wells,
    site_qc_table,
    write_shard_store,
)
from brightpaint.io import InputError, well_row_column
from brightpaint.validate import validate_plate


def validate(screen: Path, plate: str = "T1", role: str = "train", on_missing: str = "error"):
    return validate_plate(str(screen / plate / "manifest.csv"), str(screen / plate / "platemap.csv"),
                          plate, role, CHANNELS, str(screen), on_missing)


def ingest(screen: Path, out: Path, plate: str = "T1", role: str = "train", n_shards: int = 2,
           on_missing: str = "error"):
    images, flags = validate(screen, plate, role, on_missing)
    layout = plan_layout(images, plate, CHANNELS)
    shards, qcs = [], []
    for shard in range(n_shards):
        store = out.parent / f"shard{shard}.zarr"
        qcs.append(write_shard_store(images, shard_wells(list(images["well"]), n_shards, shard),
                                     layout, store, root=screen))
        shards.append(store)
    assemble_plate_store(shards, out, layout)
    qc = pd.concat(qcs, ignore_index=True)
    return images, flags, layout, qc


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name or p.suffix == ".zarr")


def test_shard_wells_partition():
    wells = [f"{r}{c:02d}" for r in "AB" for c in range(1, 6)]
    shards = [shard_wells(wells, 3, k) for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(wells)
    assert [len(s) for s in shards] == [4, 3, 3]
    assert shard_wells(wells[:1], 3, 2) == []
    with pytest.raises(ValueError):
        shard_wells(wells, 3, 3)


def test_round_trip_pixels_equal_tiffs(tiny_screen, tmp_path):
    store = tmp_path / "T1.zarr"
    images, flags, layout, qc = ingest(tiny_screen, store)
    assert flags.empty
    assert layout.channels == ["BF", "DNA", "CYTO", "DAMAGE"]
    assert layout.n_z == TINY_SPEC.z_planes and layout.shape == (TINY_SPEC.size, TINY_SPEC.size)
    assert len(qc) == len(images)
    for (well, site), group in images.groupby(["well", "site"]):
        field = read_field(store, well, site)
        assert field.shape == (1, 4, TINY_SPEC.z_planes, TINY_SPEC.size, TINY_SPEC.size)
        for row in group.itertuples():
            expected = tifffile.imread(row.file)
            np.testing.assert_array_equal(field[0, layout.channels.index(row.channel), row.z], expected)
        # single-plane channels: nothing but zeros outside their plane, and no chunk on disk there
        assert not field[0, 1, 1:].any()
        row_name, column = well_row_column(well)
        chunk_dir = store / row_name / column / field_path(site) / "0" / "c" / "0" / "1"
        assert sorted(p.name for p in chunk_dir.iterdir()) == ["0"]
    assert leftovers(tmp_path) == ["T1.zarr", "shard0.zarr", "shard1.zarr"]


def test_store_is_readable_by_ome_zarr(tiny_screen, tmp_path):
    store = tmp_path / "T1.zarr"
    images, *_ = ingest(tiny_screen, store)
    nodes = list(Reader(parse_url(str(store)))())
    plate = nodes[0]
    assert any(isinstance(spec, Plate) for spec in plate.specs)
    wells = sorted(set(images["well"]))
    plate_meta = zarr.open_group(store, mode="r").attrs["ome"]["plate"]
    assert sorted(w["path"].replace("/", "") for w in plate_meta["wells"]) == wells
    assert plate_meta["field_count"] == TINY_SPEC.sites and plate_meta["name"] == "T1"
    # one field read through ome-zarr-py's own reader: channel names and pixels
    row, column = well_row_column(wells[0])
    field_nodes = list(Reader(parse_url(str(store / row / column / "0")))())
    assert field_nodes[0].metadata["channel_names"] == ["BF", "DNA", "CYTO", "DAMAGE"]
    pixels = np.asarray(field_nodes[0].data[0])
    first = images[(images["well"] == wells[0]) & (images["site"] == 1) & (images["channel"] == "BF")
                   & (images["z"] == 2)].iloc[0]
    np.testing.assert_array_equal(pixels[0, 0, 2], tifffile.imread(first.file))
    axes = zarr.open_group(store / row / column / "0", mode="r").attrs["ome"]["multiscales"][0]["axes"]
    assert [a["name"] for a in axes] == ["t", "c", "z", "y", "x"]


def test_apply_plate_has_brightfield_only(tiny_screen, tmp_path):
    _, _, layout, _ = ingest(tiny_screen, tmp_path / "T2.zarr", plate="T2", role="apply")
    assert layout.channels == ["BF"]


def test_qc_table_flags_saturated_and_blank_images(tiny_screen, tmp_path):
    images, *_ = validate(tiny_screen)
    bf = images[images["channel"] == "BF"]
    saturated, blank = bf.iloc[0], bf.iloc[1]
    pixels = tifffile.imread(saturated.file)
    pixels[: pixels.shape[0] // 4] = 65535
    tifffile.imwrite(saturated.file, pixels)
    tifffile.imwrite(blank.file, np.full_like(pixels, 100))
    _, flags, _, qc = ingest(tiny_screen, tmp_path / "T1.zarr")
    by_file = qc.set_index("file")["flag"]
    assert by_file[saturated.file].startswith("saturated: 25.00%")
    assert by_file[blank.file] == "blank image (constant value 100)"
    assert (qc["flag"] != "").sum() == 2
    sites = site_qc_table(qc, flags, images)
    flagged = sites[sites["status"] == "flagged"]
    assert set(zip(flagged["well"], flagged["site"], strict=True)) == {
        (saturated.well, saturated.site), (blank.well, blank.site)}


# --- bad inputs: each gives its named error, all problems at once, no partial output ---

def first_image(screen: Path, channel: str = "DNA") -> pd.Series:
    manifest = pd.read_csv(screen / "T1" / "manifest.csv")
    return manifest[manifest["channel"] == channel].iloc[0]


def damage(screen: Path, how: str, row: pd.Series) -> Path:
    path = screen / "T1" / row["path"]
    if how == "missing":
        path.unlink()
    elif how == "corrupt":
        path.write_bytes(b"this is not a TIFF file at all" * 100)
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "shape":
        tifffile.imwrite(path, np.zeros((TINY_SPEC.size, TINY_SPEC.size + 8), np.uint16))
    return path


@pytest.mark.parametrize("how, message", [
    ("missing", "file not found"),
    ("corrupt", "not a readable TIFF"),
    ("truncated", "truncated TIFF"),
    ("shape", f"shape ({TINY_SPEC.size}, {TINY_SPEC.size + 8}) differs from the plate's"),
])
def test_bad_image_is_named(tiny_screen, tmp_path, how, message):
    row = first_image(tiny_screen)
    path = damage(tiny_screen, how, row)
    with pytest.raises(InputError) as err:
        ingest(tiny_screen, tmp_path / "T1.zarr")
    text = str(err.value)
    assert message in text
    assert f"well {row['well']}, site {row['site']}, channel DNA, z 0" in text
    assert row["path"] in text or str(path) in text
    assert leftovers(tmp_path) == []


def test_unknown_well_is_named(tiny_screen, tmp_path):
    platemap = pd.read_csv(tiny_screen / "T1" / "platemap.csv", dtype=str)
    dropped = platemap.iloc[0]["well"]
    platemap.iloc[1:].to_csv(tiny_screen / "T1" / "platemap.csv", index=False)
    with pytest.raises(InputError, match=f"well {dropped}: well is in the manifest but not in the plate map"):
        ingest(tiny_screen, tmp_path / "T1.zarr")
    assert leftovers(tmp_path) == []


def test_all_problems_listed_at_once(tiny_screen, tmp_path):
    manifest = pd.read_csv(tiny_screen / "T1" / "manifest.csv")
    rows = manifest[manifest["channel"] == "CYTO"].iloc[:3]
    for how, (_, row) in zip(["missing", "corrupt", "truncated"], rows.iterrows(), strict=True):
        damage(tiny_screen, how, row)
    with pytest.raises(InputError) as err:
        validate(tiny_screen)
    assert len(err.value.problems) == 3
    for needle in ["file not found", "not a readable TIFF", "truncated TIFF"]:
        assert needle in str(err.value)


def test_missing_required_channel_and_plane(tiny_screen):
    manifest = pd.read_csv(tiny_screen / "T1" / "manifest.csv")
    first = manifest.iloc[0]
    site = (manifest["well"] == first["well"]) & (manifest["site"] == first["site"])
    drop = site & ((manifest["channel"] == "DAMAGE") | ((manifest["channel"] == "BF") & (manifest["z"] == 3)))
    manifest[~drop].to_csv(tiny_screen / "T1" / "manifest.csv", index=False)
    with pytest.raises(InputError) as err:
        validate(tiny_screen)
    text = str(err.value)
    where = f"well {first['well']}, site {first['site']}"
    assert f"{where}, channel DAMAGE: required channel DAMAGE has no image" in text
    assert f"{where}, channel BF: z-stack incomplete: plane(s) [3] missing" in text


def test_on_missing_flag_excludes_the_site_and_records_it(tiny_screen, tmp_path):
    row = first_image(tiny_screen)
    damage(tiny_screen, "missing", row)
    store = tmp_path / "T1.zarr"
    images, flags, _, qc = ingest(tiny_screen, store, on_missing="flag")
    assert list(zip(flags["well"], flags["site"], strict=True)) == [(row["well"], row["site"])]
    assert flags["reason"].iloc[0] == "file not found"
    assert not ((images["well"] == row["well"]) & (images["site"] == row["site"])).any()
    well_dir = store.joinpath(*well_row_column(row["well"]))
    assert not (well_dir / field_path(row["site"])).exists()
    sites = site_qc_table(qc, flags, images)
    excluded = sites[sites["status"] == "excluded"]
    assert len(excluded) == 1 and "file not found" in excluded["reasons"].iloc[0]
    assert len(sites) == TINY_SPEC.wells * TINY_SPEC.sites


def test_shape_error_is_fatal_even_with_flag(tiny_screen, tmp_path):
    damage(tiny_screen, "shape", first_image(tiny_screen))
    with pytest.raises(InputError, match="differs from the plate's"):
        ingest(tiny_screen, tmp_path / "T1.zarr", on_missing="flag")


def test_undecodable_data_fails_the_shard_without_partial_store(tiny_screen, tmp_path):
    """A TIFF whose header is fine but whose compressed data is damaged passes the header check;
    the shard that reads it must fail naming the file and leave nothing behind."""
    row = first_image(tiny_screen)
    path = tiny_screen / "T1" / row["path"]
    pixels = tifffile.imread(path)
    tifffile.imwrite(path, pixels, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages.first.dataoffsets[0], tif.pages.first.databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset: offset + count] = bytes(count)
    path.write_bytes(bytes(data))
    images, _ = validate(tiny_screen)
    layout = plan_layout(images, "T1", CHANNELS)
    with pytest.raises(InputError, match=rf"{row['path']} \(named at manifest line \d+\), well "
                                         rf"{row['well']}, site {row['site']}, channel DNA, z 0: "
                                         "cannot decode image data"):
        write_shard_store(images, sorted(set(images["well"])), layout, tmp_path / "shard.zarr",
                          root=tiny_screen)
    assert leftovers(tmp_path) == []


def swap_for_outside_link(screen: Path, row: pd.Series, outside: Path) -> Path:
    """Replace a validated image by a symlink to a valid TIFF outside the screen folder."""
    path = screen / "T1" / row["path"]
    tifffile.imwrite(outside, tifffile.imread(path))
    path.unlink()
    path.symlink_to(outside)
    return path


def test_image_replaced_after_validation_by_a_link_outside_is_not_read(tiny_screen, tmp_path):
    """validate_plate resolved the paths once; ingest resolves each again before reading, so a file
    swapped afterwards for a symlink leaving the screen folder fails the shard, naming it."""
    row = first_image(tiny_screen)
    images, _ = validate(tiny_screen)
    layout = plan_layout(images, "T1", CHANNELS)
    swap_for_outside_link(tiny_screen, row, tmp_path / "outside.tif")
    with pytest.raises(InputError) as err:
        write_shard_store(images, sorted(set(images["well"])), layout, tmp_path / "shard.zarr",
                          root=tiny_screen)
    text = str(err.value)
    assert "1 problem(s) in plate T1" in text
    validated = tiny_screen.resolve() / "T1" / row["path"]  # the path validate_plate resolved
    line = int(images.loc[images["file"] == str(validated), "line"].iloc[0])
    assert (f"{validated} (named at manifest line {line}), well {row['well']}, site {row['site']}, "
            "channel DNA, z 0") in text
    outside = tmp_path.resolve() / "outside.tif"
    assert f"its real path {outside} leaves the screen folder {tiny_screen.resolve()}" in text
    assert f"manifest path {row['path']!r}" in text
    assert leftovers(tmp_path) == []


def test_each_file_is_checked_again_as_it_is_opened(tiny_screen, tmp_path):
    """A swap after the shard's first check is caught where the file is opened."""
    row = first_image(tiny_screen)
    images, _ = validate(tiny_screen)
    layout = plan_layout(images, "T1", CHANNELS)
    swap_for_outside_link(tiny_screen, row, tmp_path / "outside.tif")
    site = images[(images["well"] == row["well"]) & (images["site"] == row["site"])]
    array = np.zeros((1, len(layout.channels), layout.n_z, *layout.shape), layout.dtype)
    with pytest.raises(InputError, match=r"leaves the screen folder .*nothing was read from it"):
        read_site_tiffs(array, layout, site, 0.01, tiny_screen)
    assert not array[0, layout.channels.index("DNA")].any()


def test_mixed_dtypes_get_a_common_store_dtype(tiny_screen, tmp_path):
    manifest = pd.read_csv(tiny_screen / "T1" / "manifest.csv")
    for row in manifest[manifest["channel"] == "DAMAGE"].itertuples():
        path = tiny_screen / "T1" / row.path
        tifffile.imwrite(path, (tifffile.imread(path) // 256).astype(np.uint8))
    store = tmp_path / "T1.zarr"
    images, _, layout, _ = ingest(tiny_screen, store)
    assert layout.dtype == "uint16" and layout.source_dtypes["DAMAGE"] == "uint8"
    row = images[images["channel"] == "DAMAGE"].iloc[0]
    np.testing.assert_array_equal(read_field(store, row.well, row.site)[0, 3, 0], tifffile.imread(row.file))


def test_assemble_links_instead_of_copying(tiny_screen, tmp_path):
    store = tmp_path / "T1.zarr"
    ingest(tiny_screen, store, n_shards=1)
    chunk = next(p for p in store.rglob("*") if p.is_file() and p.parent.name.isdigit()
                 and "c" in p.parts)
    assert chunk.stat().st_nlink == 2  # the shard's copy and the store's: one file on disk
    shutil.rmtree(tmp_path / "shard0.zarr")
    assert chunk.stat().st_nlink == 1 and chunk.read_bytes()


def test_site_absent_from_manifest_is_reported(tiny_screen, tmp_path):
    manifest = pd.read_csv(tiny_screen / "T1" / "manifest.csv")
    well = manifest["well"].iloc[0]
    manifest[~((manifest["well"] == well) & (manifest["site"] == 2))].to_csv(
        tiny_screen / "T1" / "manifest.csv", index=False)
    with pytest.raises(InputError, match=f"well {well}, site 2: site missing"):
        validate(tiny_screen)
    images, flags, _, qc = ingest(tiny_screen, tmp_path / "T1.zarr", on_missing="flag")
    sites = site_qc_table(qc, flags, images)
    excluded = sites[sites["status"] == "excluded"]
    assert list(zip(excluded["well"], excluded["site"], strict=True)) == [(well, 2)]
    assert excluded["reasons"].iloc[0].startswith("site missing (other wells have it)")


def test_an_image_changed_after_validation_is_refused_naming_it(tiny_screen, tmp_path):
    """Validation records each file's size and modification time; ingest reads only files that still
    have them (issue 22): an image rewritten since, even with the same pixels, fails the shard."""
    images, _ = validate(tiny_screen)
    row = first_image(tiny_screen)
    path = (tiny_screen / "T1" / row["path"]).resolve()
    validated = images[images["file"] == str(path)].iloc[0]
    assert (validated["bytes"], validated["mtime_ns"]) == (path.stat().st_size, path.stat().st_mtime_ns)
    assert (images["bytes"] > 0).all() and (images["mtime_ns"] > 0).all()
    layout = plan_layout(images, "T1", CHANNELS)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    with pytest.raises(InputError) as err:
        write_shard_store(images, sorted(set(images["well"])), layout, tmp_path / "shard.zarr",
                          root=tiny_screen)
    text = str(err.value)
    assert str(path) in text and f"well {row['well']}, site {row['site']}" in text
    assert "changed since validation" in text and "--forcerun" in text
    assert leftovers(tmp_path) == []
    # validated again, the same file is read
    images, _ = validate(tiny_screen)
    write_shard_store(images, sorted(set(images["well"])), layout, tmp_path / "again.zarr", root=tiny_screen)
