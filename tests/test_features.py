"""CellProfiler 5 features: the pipeline file, known values on synthetic sites (one CellProfiler run
for the module), object numbers joined across compartments, feature names against the Cell
Painting Gallery's (cpg0043) CellProfiler outputs, empty and unusable sites."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from conftest import REPO, shared_data

from brightpaint.allocator import ALLOCATOR_TUNABLES
from brightpaint.features.extract import batch_sites, extract_features, site_batches, write_features
from brightpaint.features.pipelines import (
    PIPELINE,
    SITE_PIPELINE,
    TILED_PIPELINE,
    pipeline_names,
    write_pipeline,
)
from brightpaint.features.runner import (
    BUFFERED_LAUNCHER,
    CELLPROFILER,
    cellprofiler_command,
    cellprofiler_environment,
    run_cellprofiler,
    write_loaddata,
    write_site_inputs,
)
from brightpaint.features.schema import CHANNELS, OBJECT_KEY, OBJECTS, SITE_KEYS, FeatureError
from brightpaint.features.tables import concat_tables, write_concatenated
from brightpaint.features.tiles import tile_sites, untile_cells

CP_PYTHON = REPO / ".venv-cellprofiler" / "bin" / "python"
CPG0043 = "cytotable-cp-outputs/tests/data/cellprofiler/cpg0043-segmentation/BR00116991-A01-1"
NAME_MATCH_FLOOR = 0.95  # measured 1.00 / 0.99-1.00: see test_feature_names_follow_the_cell_painting_gallery
SIZE = 96
ADU = 65535.0


def needs_cellprofiler():
    if not CP_PYTHON.exists() or not CELLPROFILER.exists():
        pytest.skip(f"{CP_PYTHON.parent.parent} absent: build it with `make env-cellprofiler`")


# ---------------------------------------------------------------------------------------------
# Synthetic sites with known answers
# ---------------------------------------------------------------------------------------------

# label -> (nucleus box, cell box) as (row0, row1, col0, col1), end-exclusive. Labels have a gap (no
# 3) and cell 5 is all nucleus (no cytoplasm), so CellProfiler's 1..n numbering differs per
# compartment and only a correct mapping joins them.
SITE_A = {1: ((10, 20, 10, 22), (5, 30, 5, 30)),
          2: ((10, 18, 50, 58), (4, 28, 44, 68)),
          4: ((60, 72, 10, 24), (55, 81, 5, 31)),
          5: ((60, 70, 60, 70), (60, 70, 60, 70))}
SITE_B = {1: ((20, 30, 20, 30), (12, 40, 12, 40)),
          2: ((50, 62, 50, 60), (44, 70, 44, 70))}
DNA_VALUE = 2000.0


def cyto_value(label: int) -> float:
    return 300.0 + 150.0 * label


def make_site(boxes: dict, seed: int) -> tuple[dict, dict]:
    nuclei = np.zeros((SIZE, SIZE), np.int32)
    cells = np.zeros((SIZE, SIZE), np.int32)
    for label, (nbox, cbox) in boxes.items():
        cells[cbox[0]:cbox[1], cbox[2]:cbox[3]] = label
        nuclei[nbox[0]:nbox[1], nbox[2]:nbox[3]] = label
    cytoplasm = np.where(nuclei > 0, 0, cells)
    dna = np.where(nuclei > 0, DNA_VALUE, 100.0)
    cyto = np.zeros((SIZE, SIZE))
    for label in boxes:
        cyto[cells == label] = cyto_value(label)
    damage = np.random.default_rng(seed).poisson(200.0, (SIZE, SIZE)).astype(float)
    return ({"DNA": dna, "CYTO": cyto, "DAMAGE": damage},
            {"Nuclei": nuclei, "Cells": cells, "Cytoplasm": cytoplasm})


SITES = {("P1", "A01", 1, "real"): make_site(SITE_A, 1),
         ("001", "B02", 2, "virtual"): make_site(SITE_B, 2),  # a plate id that looks like a number
         ("P1", "A01", 3, "real"): make_site({}, 3)}  # no objects
BAD = {("P1", "A02", 1, "real"): "missing",  # no DAMAGE channel
       ("P1", "A02", 2, "real"): "nan"}  # a NaN pixel


def read_images(plate, well, site, source):
    key = (plate, well, site, source)
    if key in BAD:
        images = dict(SITES[("P1", "A01", 1, "real")][0])
        if BAD[key] == "missing":
            del images["DAMAGE"]
        else:
            images["DNA"] = images["DNA"].copy()
            images["DNA"][3, 3] = np.nan
        return images
    return SITES[key][0]


def read_labels(plate, well, site, source):
    key = (plate, well, site, source)
    return SITES[("P1", "A01", 1, "real") if key in BAD else key][1]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    needs_cellprofiler()
    work = tmp_path_factory.mktemp("features")
    sites = [*SITES, *BAD, ("P1", "A01", 1, "real")]  # the last one is listed twice
    cells, images, qc = extract_features(sites, read_images, read_labels, PIPELINE, work)
    return cells, images, qc, work


# ---------------------------------------------------------------------------------------------
# Without CellProfiler
# ---------------------------------------------------------------------------------------------


def test_site_inputs_are_clipped_rounded_uint16_and_rows_name_them(tmp_path):
    image = np.array([[-5.0, 1.4], [1.6, 70000.0]])
    labels = np.array([[0, 2], [2, 7]])
    row = write_site_inputs(tmp_path, "P1", "A01", 3, {"DNA": image}, {"Nuclei": labels}, "real")
    assert row["Metadata_Plate"] == "P1" and row["Metadata_Site"] == 3
    assert row["Metadata_Source"] == "real"
    written = tifffile.imread(tmp_path / row["FileName_DNA"])
    assert written.dtype == np.uint16 and written.tolist() == [[0, 1], [2, 65535]]
    written = tifffile.imread(tmp_path / row["ObjectsFileName_Nuclei"])
    assert written.dtype == np.uint16 and written.tolist() == labels.tolist()
    assert row["PathName_DNA"] == row["ObjectsPathName_Nuclei"] == str(tmp_path.resolve())
    write_loaddata([row, row], tmp_path / "load.csv")
    table = pd.read_csv(tmp_path / "load.csv")
    assert len(table) == 2 and "ObjectsFileName_Nuclei" in table.columns


@pytest.mark.parametrize("images, labels, message", [
    ({"DNA": np.zeros((4, 4))}, {"Nuclei": np.zeros((4, 5), int)}, "shape"),
    ({"DNA": np.full((4, 4), np.nan)}, {}, "non-finite"),
    ({"DNA": np.zeros(4)}, {}, "2-D"),
    ({"DNA": np.zeros((4, 4))}, {"Nuclei": np.full((4, 4), 70000)}, "0..65535"),
    ({"DNA": np.zeros((4, 4))}, {"Nuclei": np.zeros((4, 4))}, "integers"),
])
def test_unusable_site_inputs_are_errors_naming_the_site(tmp_path, images, labels, message):
    with pytest.raises(ValueError, match=rf"plate P9 well H12 site 4.*{message}"):
        write_site_inputs(tmp_path, "P9", "H12", 4, images, labels)


def test_concat_tables_keeps_every_column_and_sorts_by_site():
    a = pd.DataFrame({"Metadata_Plate": ["P2"], "Metadata_Well": ["A01"], "Metadata_Site": [1],
                      "Metadata_Source": ["real"], "Metadata_ObjectNumber": [3],
                      "Nuclei_AreaShape_Area": [9.0]})
    b = a.assign(Metadata_Plate="P1", Metadata_ObjectNumber=1).drop(columns="Nuclei_AreaShape_Area")
    empty = a.iloc[:0]
    table = concat_tables([a, empty, b])
    assert list(table.columns) == list(a.columns) and list(table.Metadata_Plate) == ["P1", "P2"]
    assert np.isnan(table.Nuclei_AreaShape_Area[0]) and table.Nuclei_AreaShape_Area[1] == 9.0
    assert concat_tables([empty]).empty and list(concat_tables([empty]).columns) == list(a.columns)


def test_write_concatenated_streams_shards_into_what_concat_tables_makes(tmp_path):
    """Shards as features_shard writes them (contiguous runs of the sorted wells; one without cells,
    one lacking a column): the streamed file equals concat_tables' table, whatever the row groups."""
    rng = np.random.default_rng(0)

    def shard(wells, area=True):
        rows = [("P1", w, s, src, o) for w in wells for s in (2, 1) for src in ("virtual", "real")
                for o in (2, 1)]
        table = pd.DataFrame(rows, columns=[*SITE_KEYS, OBJECT_KEY])
        table["Cells_Intensity_Mean"] = rng.random(len(table)).astype(np.float32)
        if area:
            table["Nuclei_AreaShape_Area"] = rng.integers(10, 99, len(table))
        return table

    shards = [shard(["A01", "A02"]), shard([]).iloc[:0][SITE_KEYS], shard(["B01"], area=False),
              shard(["C05", "D07"])]
    # a nullable integer column one shard lacks; a text column that is all None in the first shard
    shards[0]["Nuclei_Neighbors_FirstClosestObjectNumber"] = pd.array(
        rng.integers(1, 9, len(shards[0])), dtype="Int64")
    shards[0]["Metadata_Note"] = None
    shards[3]["Metadata_Note"] = "refocused"
    shards[3]["Nuclei_AreaShape_Area"] = shards[3]["Nuclei_AreaShape_Area"].astype(float) + 0.5
    paths = []
    for i, table in enumerate(shards):
        paths.append(tmp_path / f"{i}.parquet")
        table.to_parquet(paths[-1], index=False)
    out = tmp_path / "cells.parquet"
    assert write_concatenated(paths, out, row_group_rows=7) == sum(len(t) for t in shards)
    expected = concat_tables(shards)
    pd.testing.assert_frame_equal(pd.read_parquet(out), expected, check_exact=True)
    assert pq.ParquetFile(out).metadata.num_row_groups > 3


@pytest.mark.parametrize("pipeline", [PIPELINE, SITE_PIPELINE, TILED_PIPELINE])
def test_pipeline_names_are_read_from_the_shipped_pipelines(pipeline):
    assert pipeline_names(pipeline) == (list(CHANNELS), list(OBJECTS))


def crowded_site(seed: int, size: int = 112) -> tuple[dict, dict]:
    """Ten touching cells (nearest-centre regions), some cut by the site border, nuclei of three
    sizes, textured intensities and bright foci."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(4, size - 4, (10, 2))
    rows, cols = np.mgrid[:size, :size]
    distance = np.stack([np.hypot(rows - r, cols - c) for r, c in centres])
    nearest, closest = distance.argmin(0), distance.min(0)
    cells = np.where(closest < 16, nearest + 1, 0)
    nuclei = np.where(closest < 6 + nearest % 3, nearest + 1, 0)
    texture = rng.normal(0, 1, (3, size, size)).cumsum(axis=2) * 20
    dna = 100 + (nuclei > 0) * (1500 + texture[0]) + rng.normal(0, 20, (size, size))
    cyto = 80 + (cells > 0) * (400 + 50 * (nearest % 5)) + texture[1]
    damage = rng.poisson(150, (size, size)) + (rng.random((size, size)) < 0.01) * 3000 * (cells > 0)
    return ({"DNA": np.clip(dna, 0, None), "CYTO": np.clip(cyto, 0, None), "DAMAGE": damage.astype(float)},
            {"Nuclei": nuclei, "Cells": cells, "Cytoplasm": np.where(nuclei > 0, 0, cells)})


def test_tiles_keep_every_site_and_untiling_restores_keys_labels_and_positions():
    keys = [("P1", "A01", s, "real") for s in (1, 2, 3)]
    sites = [(k, *crowded_site(i, size=40)) for i, k in enumerate(keys)]
    images, labels, placed = tile_sites(sites, gap=8)
    assert images["DNA"].shape == labels["Cells"].shape == (88, 88)  # 2 x 2 grid, one cell empty
    assert list(placed["y0"]) == [0, 0, 48] and list(placed["x0"]) == [0, 48, 0]
    for (_, site_images, site_labels), row in zip(sites, placed.itertuples(), strict=True):
        window = np.s_[row.y0:row.y0 + 40, row.x0:row.x0 + 40]
        np.testing.assert_array_equal(images["CYTO"][window], site_images["CYTO"].astype(np.float32))
        for name in OBJECTS:
            np.testing.assert_array_equal(labels[name][window],
                                          np.where(site_labels[name] > 0, site_labels[name] + row.offset, 0))
        assert row.top == site_labels["Cells"].max()
    assert labels["Nuclei"][:, 40:48].max() == 0 and images["DNA"][:, 40:48].max() == 0  # the gap
    # a tiled run's per-cell table: tile numbers as sites, tile label values, tile positions
    tiled = pd.DataFrame({"Metadata_Plate": "", "Metadata_Well": "tile1", "Metadata_Site": 1,
                          "Metadata_Source": "tile", OBJECT_KEY: [placed.offset[1] + 2, 1],
                          "Metadata_Cells_AreaShape_Center_X": [50.5, 3.0],
                          "Metadata_Cells_AreaShape_Center_Y": [7.0, 9.0],
                          "Cells_AreaShape_Area": [10.0, 20.0]})
    back = untile_cells(tiled, placed.assign(tile=1))
    assert back[[*SITE_KEYS, OBJECT_KEY]].values.tolist() == [["P1", "A01", 1, "real", 1],
                                                               ["P1", "A01", 2, "real", 2]]
    assert back["Metadata_Cells_AreaShape_Center_X"].tolist() == [3.0, 2.5]
    assert back["Metadata_Cells_AreaShape_Center_Y"].tolist() == [9.0, 7.0]
    assert back["Cells_AreaShape_Area"].tolist() == [20.0, 10.0]
    with pytest.raises(FeatureError, match="belong to no tiled site"):
        untile_cells(tiled.assign(**{OBJECT_KEY: 999}), placed.assign(tile=1))


# ---------------------------------------------------------------------------------------------
# With CellProfiler
# ---------------------------------------------------------------------------------------------


@pytest.mark.cellprofiler
@pytest.mark.parametrize("part, shipped", [("all", PIPELINE), ("site", SITE_PIPELINE),
                                           ("tiled", TILED_PIPELINE)])
def test_building_the_pipeline_reproduces_the_shipped_file(tmp_path, part, shipped):
    needs_cellprofiler()
    built = write_pipeline(tmp_path / "features.cppipe", CHANNELS, OBJECTS, python=CP_PYTHON,
                           part=part)
    # the header (Version:5, DateRevision:500, GitHash:) carries no date: the bytes must agree
    assert built.read_bytes() == shipped.read_bytes()


@pytest.mark.cellprofiler
def test_a_pipeline_built_for_other_channel_names_measures_them(tmp_path):
    """A screen whose stains are not the demo's (Hoechst, Actin, gH2AX): the pipeline the workflow
    builds for its channels (features.pipeline: auto) measures every object on them, with the known
    intensities under the screen's own names."""
    needs_cellprofiler()
    names = {"DNA": "Hoechst", "CYTO": "Actin", "DAMAGE": "gH2AX"}
    site, tiled = (write_pipeline(tmp_path / f"{part}.cppipe", list(names.values()), python=CP_PYTHON,
                                  part=part) for part in ("site", "tiled"))
    images, labels = SITES[("P1", "A01", 1, "real")]
    renamed = {names[channel]: image for channel, image in images.items()}
    cells, _, qc = extract_features([("S9", "A01", 1, "real")], lambda *key: renamed,
                                    lambda *key: labels, site, tmp_path / "work", tiled_pipeline=tiled)
    assert qc["status"].tolist() == ["ok"] and qc["cells"].tolist() == [len(SITE_A)]
    by_label = cells.set_index(OBJECT_KEY)
    for label in SITE_A:
        row = by_label.loc[label]
        assert row["Nuclei_Intensity_MeanIntensity_Hoechst"] * ADU == pytest.approx(DNA_VALUE)
        assert row["Cells_Intensity_MeanIntensity_Actin"] * ADU == pytest.approx(cyto_value(label))
    assert not [c for c in cells.columns if re.search(r"_(DNA|CYTO|DAMAGE)(_|$)", c)]


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


@pytest.mark.cellprofiler
def test_tiled_half_and_site_half_give_the_whole_pipelines_features(tmp_path):
    """The workflow's split (per-object modules on tiles of sites, the rest site by site) against
    the whole pipeline run site by site: same cells, same columns, same values -- except the edge
    intensities of objects cut by the site border, where a tile's gap counts as edge and the
    image border does not (segment.exclude_border, on by default, removes such objects)."""
    needs_cellprofiler()
    sites = {("P1", "A01", s, "real"): crowded_site(s) for s in range(1, 6)}
    sites[("P1", "A02", 1, "virtual")] = (sites[("P1", "A01", 1, "real")][0],
                                          {o: np.zeros((112, 112), int) for o in OBJECTS})
    def read_images(*key):
        return sites[key][0]

    def read_labels(*key):
        return sites[key][1]

    whole, whole_images, whole_qc = extract_features(list(sites), read_images, read_labels,
                                                     PIPELINE, tmp_path / "whole")
    split, split_images, split_qc = extract_features(
        list(sites), read_images, read_labels, SITE_PIPELINE, tmp_path / "split",
        tiled_pipeline=TILED_PIPELINE, tile_pixels=4 * 120 * 120)  # tiles of 4 sites and of 2
    assert len(pd.read_csv(tmp_path / "split" / "tiles" / "loaddata.csv")) == 2
    pd.testing.assert_frame_equal(split_qc, whole_qc)
    pd.testing.assert_frame_equal(split_images, whole_images[split_images.columns], check_like=True)
    assert sorted(split.columns) == sorted(whole.columns) and len(whole) == 50
    as_extracted, split = split, split[whole.columns]
    keys = [*SITE_KEYS, OBJECT_KEY]
    pd.testing.assert_frame_equal(split[keys], whole[keys])
    border = np.array([any(_touches_border(sites[tuple(r[:4])][1][o] == r[4]) for o in OBJECTS)
                       for r in whole[keys].itertuples(index=False)])
    assert 0 < border.sum() < len(whole)

    def differing_columns(other: pd.DataFrame) -> set[str]:
        differing = set()
        for column in whole.columns[len(keys):]:
            a, b = whole[column].to_numpy(float), other[column].to_numpy(float)
            same = np.isclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True)  # float32 round-off
            if not same.all():
                assert border[~same].all(), (f"{column} differs for objects inside the site: "
                                             f"{a[~same & ~border]} vs {b[~same & ~border]}")
                differing.add(column)
        return differing

    differing = differing_columns(split)
    assert differing and all("IntensityEdge" in c for c in differing), sorted(differing)

    # the workflow's way: batches of whole wells, each batch's tables on disk, streamed into one file
    batched_qc = write_features([*sites][::-1], read_images, read_labels, tmp_path / "cells.parquet",
                                tmp_path / "images.parquet", SITE_PIPELINE, tmp_path / "batched",
                                sites_per_batch=3, tiled_pipeline=TILED_PIPELINE,
                                tile_pixels=4 * 120 * 120, log=tmp_path / "batched.log")
    assert len(list((tmp_path / "batched").glob("cells*.parquet"))) == 2  # A01's 5 sites, then A02
    assert not list((tmp_path / "batched").glob("batch*"))  # each batch's inputs removed
    log = (tmp_path / "batched.log").read_text()
    assert "batch0" in log and "batch1" in log  # every batch's command and output, none overwritten
    pd.testing.assert_frame_equal(batched_qc, split_qc)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "images.parquet"), split_images)
    batched = pd.read_parquet(tmp_path / "cells.parquet")
    # the columns and their order of one extract_features call; only the tiles differ (A01's 5
    # sites now fill tiles of 4 and 1), which changes the edge intensities of border objects only
    assert list(batched.columns) == list(as_extracted.columns)
    pd.testing.assert_frame_equal(batched[keys], whole[keys])
    assert differing_columns(batched[whole.columns]) <= differing


def test_batch_sites_bounds_a_batch_by_pixels():
    assert batch_sites((1080, 1080)) == 64 and batch_sites((2160, 2160)) == 16
    assert batch_sites((256, 256), 75) == 1144
    assert batch_sites((4000, 4000), 1) == 1  # a site larger than the bound is a batch of its own
    with pytest.raises(ValueError, match="batch_megapixels"):
        batch_sites((1080, 1080), 0)


def test_site_batches_are_sorted_runs_of_whole_wells():
    sites = [("P1", w, s, src) for w in ("B02", "A01", "A03") for s in (2, 1) for src in ("virtual", "real")]
    sites.append(("P1", "A01", 1, "real"))  # listed twice: kept in its well's batch
    batches = site_batches(sites, 5)
    assert [len(b) for b in batches] == [5, 4, 4]  # a well larger than the batch is a batch alone
    assert [k for b in batches for k in b] == sorted(sites)
    assert all(len({k[1] for k in b}) == 1 for b in batches)
    assert [len(b) for b in site_batches(sites, 9)] == [9, 4]
    assert site_batches([], 4) == []
    with pytest.raises(ValueError, match="sites_per_batch"):
        site_batches(sites, 0)


@pytest.mark.cellprofiler
def test_known_areas_and_intensities(extracted):
    cells, _, _, _ = extracted
    site = cells[(cells.Metadata_Plate == "P1") & (cells.Metadata_Site == 1)].set_index(
        "Metadata_ObjectNumber")
    assert sorted(site.index) == sorted(SITE_A)  # label values, not CellProfiler's 1..n
    for label, (nbox, cbox) in SITE_A.items():
        n_area = (nbox[1] - nbox[0]) * (nbox[3] - nbox[2])
        c_area = (cbox[1] - cbox[0]) * (cbox[3] - cbox[2])
        row = site.loc[label]
        assert row["Nuclei_AreaShape_Area"] == n_area
        assert row["Cells_AreaShape_Area"] == c_area
        value = cyto_value(label) / ADU
        assert row["Cells_Intensity_MeanIntensity_CYTO"] == pytest.approx(value, rel=1e-6)
        assert row["Cells_Intensity_IntegratedIntensity_CYTO"] == pytest.approx(value * c_area, rel=1e-5)
        assert row["Nuclei_Intensity_MeanIntensity_DNA"] == pytest.approx(DNA_VALUE / ADU, rel=1e-6)
        assert row["Nuclei_Intensity_IntegratedIntensity_DNA"] == pytest.approx(
            DNA_VALUE / ADU * n_area, rel=1e-5)
        if c_area > n_area:
            assert row["Cytoplasm_AreaShape_Area"] == c_area - n_area
            assert row["Cytoplasm_Intensity_MeanIntensity_CYTO"] == pytest.approx(value, rel=1e-6)
        else:  # cell 5 is all nucleus: no cytoplasm object, NaN cytoplasm features
            assert np.isnan(row["Cytoplasm_AreaShape_Area"])
        # each compartment's centre lies in its own box: the rows were joined on the right objects
        for objects, box in (("Nuclei", nbox), ("Cells", cbox)):
            assert box[2] <= row[f"Metadata_{objects}_AreaShape_Center_X"] < box[3]
            assert box[0] <= row[f"Metadata_{objects}_AreaShape_Center_Y"] < box[1]
    # neighbour numbers are label values too: cell 1's closest cell is cell 2 or 4, never "3"
    assert set(site["Metadata_Cells_Neighbors_FirstClosestObjectNumber_Adjacent"].dropna()) <= set(SITE_A)


@pytest.mark.cellprofiler
def test_tables_keys_and_bookkeeping(extracted):
    cells, images, _, _ = extracted
    assert list(cells.columns[:5]) == [*SITE_KEYS, OBJECT_KEY]
    assert not cells.duplicated([*SITE_KEYS, OBJECT_KEY]).any()
    assert not [c for c in cells.columns if c in ("ImageNumber", "ObjectNumber")
                or re.search(r"_(Location_|Number_Object_Number)", c)]
    features = [c for c in cells.columns if not c.startswith("Metadata_")]
    assert all(c.split("_")[0] in OBJECTS for c in features)
    b = cells[cells.Metadata_Plate == "001"]  # kept as text, not turned into 1
    assert sorted(b.Metadata_ObjectNumber) == [1, 2] and set(b.Metadata_Source) == {"virtual"}
    assert set(b.Metadata_Site) == {2}
    assert len(images) == 3  # the empty site has image features, and no cells
    counts = images.set_index(["Metadata_Plate", "Metadata_Site"])["Image_Count_Nuclei"]
    assert counts[("P1", 1)] == 4 and counts[("001", 2)] == 2 and counts[("P1", 3)] == 0
    assert "Image_ImageQuality_FocusScore_DNA" in images.columns
    assert not [c for c in images.columns if c.startswith(("Image_FileName", "Image_ExecutionTime",
                                                           "Image_Mean_", "Image_MD5"))]


@pytest.mark.cellprofiler
def test_empty_and_unusable_sites_give_no_rows_and_a_qc_reason(extracted):
    cells, _, qc, _ = extracted
    assert cells[(cells.Metadata_Plate == "P1") & (cells.Metadata_Site == 3)].empty
    assert list(qc.columns) == ["plate", "well", "site", "source", "status", "reason", "cells"]
    status = {tuple(r[:4]): (r.status, r.reason, r.cells) for r in qc.itertuples(index=False)}
    assert status[("P1", "A01", 3, "real")][0] == "no_objects"
    assert "plate P1 well A01 site 3" in status[("P1", "A01", 3, "real")][1]
    assert status[("P1", "A01", 1, "real")][0] == "ok" and status[("P1", "A01", 1, "real")][2] == 4
    skipped = qc[qc.status == "skipped"]
    assert len(skipped) == 3  # missing channel, NaN pixel, listed twice
    reasons = " | ".join(skipped.reason)
    assert "plate P1 well A02 site 1" in reasons and "'DAMAGE'" in reasons
    assert "plate P1 well A02 site 2" in reasons and "non-finite" in reasons
    assert "listed twice" in reasons
    assert cells[cells.Metadata_Well == "A02"].empty


def _pattern(name: str, channels: list[str]) -> str:
    """A feature name with each channel name (as a whole `_`-separated token) replaced by {C}, and
    a neighbour distance (`Neighbors_..._5`, a setting: we use 5 px for nuclei, cpg0043 1 px) by {D}."""
    tokens = ["{C}" if t in channels else t for t in name.split("_")]
    if tokens[0] == "Neighbors" and tokens[-1].isdigit():
        tokens[-1] = "{D}"
    return "_".join(tokens)


OUR_CHANNELS = list(CHANNELS)
THEIR_CHANNELS = ["AGP", "BFHigh", "BFLow", "Brightfield", "DNA", "ER", "Mito", "RNA"]
BOOKKEEPING = {"ImageNumber", "ObjectNumber"}
# settings of theirs we do not use, left out of the reverse comparison
NOT_OUR_SETTINGS = re.compile(r"(_(5|10)_0\d_256$)|mito_tubeness|_Zernike_|^ObjectSkeleton_|"
                              r"^Children_|^Parent_")


@pytest.mark.cellprofiler
def test_feature_names_follow_the_cell_painting_gallery(extracted):
    """Every feature name pattern (channel -> {C}) we produce exists in cpg0043's CellProfiler
    output for the same compartment, and theirs, for the settings we use, exist in ours."""
    _, _, _, work = extracted
    real = shared_data(CPG0043)
    report = []
    for objects in OBJECTS:
        ours = set(pd.read_csv(work / "cellprofiler" / f"{objects}.csv", nrows=0).columns) - BOOKKEEPING
        theirs = set(pd.read_csv(real / f"{objects}.csv", nrows=0).columns) - BOOKKEEPING
        ours_p = {_pattern(n, OUR_CHANNELS) for n in ours}
        theirs_p = {_pattern(n, THEIR_CHANNELS) for n in theirs}
        forward = len(ours_p & theirs_p) / len(ours_p)
        groups = {"_".join(p.split("_")[:2]) for p in ours_p}
        neighbour_kinds = {p.rsplit("_", 1)[1] for p in ours_p if p.startswith("Neighbors_")}
        wanted = {p for p in theirs_p if "_".join(p.split("_")[:2]) in groups
                  and not NOT_OUR_SETTINGS.search(p)
                  and not (p.startswith("Neighbors_") and p.rsplit("_", 1)[1] not in neighbour_kinds)}
        reverse = len(wanted & ours_p) / len(wanted)
        report.append(f"{objects}: {len(ours)} names, {len(ours_p)} patterns, {forward:.3f} in "
                      f"cpg0043; cpg0043's {len(wanted)} for our settings {reverse:.3f} in ours; "
                      f"ours only {sorted(ours_p - theirs_p)}; theirs only {sorted(wanted - ours_p)}")
        assert forward >= NAME_MATCH_FLOOR, report[-1]
        assert reverse >= NAME_MATCH_FLOOR, report[-1]
    print("\n".join(report))


@pytest.mark.cellprofiler
def test_cellprofiler_failure_is_an_error_quoting_its_output(tmp_path):
    needs_cellprofiler()
    bad = tmp_path / "bad.cppipe"
    bad.write_text("CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\nNotAModule:[x]\n")
    images, labels = SITES[("P1", "A01", 1, "real")]
    row = write_site_inputs(tmp_path / "in", "P1", "A01", 1, images, labels)
    csv = write_loaddata([row], tmp_path / "in" / "load.csv")
    with pytest.raises(FeatureError, match=r"CellProfiler failed \(exit \d+\)[\s\S]*\S"):
        run_cellprofiler(bad, csv, tmp_path / "out", log=tmp_path / "cp.log")
    assert (tmp_path / "cp.log").read_text().startswith(" ".join(cellprofiler_command(CELLPROFILER)))


def test_cellprofiler_starts_with_its_own_python_and_the_buffered_store(tmp_path):
    """A pip or conda entry-point script (a #! line, or pip's /bin/sh wrapper for long paths) runs
    as its interpreter + cellprofiler_measurements.py; anything else (an env lookup, a binary, a
    missing file) runs as it is."""
    python = Path(sys.executable)
    pip_sh = "#!/bin/sh\n" + "'" * 3 + f"exec' {python} \"$0\" \"$@\"\n' " + "'" * 3 + "\nimport sys\n"
    scripts = {"shebang": f"#!{python}\nimport sys\n", "pip_sh": pip_sh,
               "env": "#!/usr/bin/env python\nimport sys\n", "binary": "\x7fELF\x02\x01",
               "no_python": "#!/bin/bash\necho\n"}
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
    for name in ("shebang", "pip_sh"):
        assert cellprofiler_command(tmp_path / name) == [str(python), str(BUFFERED_LAUNCHER)], name
    for name in ("env", "binary", "no_python", "missing"):
        assert cellprofiler_command(tmp_path / name) == [str(tmp_path / name)], name


def test_cellprofiler_runs_with_the_allocator_tunables_and_the_users_own(monkeypatch):
    """CellProfiler's environment adds the allocator tunables to GLIBC_TUNABLES, keeps what the user
    set there (their value wins) and caps the threads."""
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.top_pad=4096:glibc.malloc.arena_max=2")
    env = cellprofiler_environment(3)
    assert env["OMP_NUM_THREADS"] == "3"
    tunables = dict(item.split("=", 1) for item in env["GLIBC_TUNABLES"].split(":"))
    assert tunables == {**ALLOCATOR_TUNABLES, "glibc.malloc.top_pad": "4096", "glibc.malloc.arena_max": "2"}


def test_buffered_measurement_store_answers_as_cellprofilers_own():
    """BufferedMeasurementStore against CellProfiler's HDF5Dict under 2,000 random operations of
    CellProfiler's Measurements (writes of numbers, text and nothing that make features change type,
    reads of one and several image sets, names, columns, removals), then every feature read back:
    every answer equal, errors included. And that it buffers: in a pipeline's pattern (20 image sets
    writing 30 object and 30 image features each, then all read back) CellProfiler's store writes to
    HDF5 once per image set and feature, the buffered one once per feature."""
    needs_cellprofiler()
    result = subprocess.run([str(CP_PYTHON), str(REPO / "tests" / "cellprofiler_store_check.py"),
                             str(BUFFERED_LAUNCHER), "0", "2000"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["reads"] > 500
    assert report["n_differences"] == 0, report["differences"][:3]
    writes = report["hdf5_writes"]
    assert writes["stock"] >= 20 * 60 and writes["buffered"] <= 60 + 2, writes


@pytest.mark.cellprofiler
def test_buffered_measurements_give_the_tables_of_cellprofilers_own_store(tmp_path):
    """The site pipeline started through cellprofiler_measurements.py and through the `cellprofiler`
    executable, on two crowded sites and one without objects: every table equal bit for bit, but
    for the run's own timings."""
    needs_cellprofiler()
    assert cellprofiler_command(CELLPROFILER)[1:] == [str(BUFFERED_LAUNCHER)]
    empty_images, empty_labels = crowded_site(3)
    sites = [crowded_site(1), crowded_site(2),
             (empty_images, {name: np.zeros_like(label) for name, label in empty_labels.items()})]
    rows = [write_site_inputs(tmp_path / "in", "P1", "A01", site, images, labels)
            for site, (images, labels) in enumerate(sites, start=1)]
    csv = write_loaddata(rows, tmp_path / "in" / "load.csv")
    out = {buffered: run_cellprofiler(SITE_PIPELINE, csv, tmp_path / str(buffered), buffered=buffered)
           for buffered in (True, False)}
    for table in ("Image", *OBJECTS):
        buffered, stock = (pd.read_csv(out[flag] / f"{table}.csv") for flag in (True, False))
        assert list(buffered.columns) == list(stock.columns)
        timings = [c for c in stock.columns if c.startswith("ExecutionTime_")]
        assert bool(timings) == (table == "Image")
        pd.testing.assert_frame_equal(buffered.drop(columns=timings), stock.drop(columns=timings),
                                      check_exact=True, obj=table)
        if table != "Image":
            assert (out[True] / f"{table}.csv").read_bytes() == (out[False] / f"{table}.csv").read_bytes()


def test_granularity_plugin_measures_what_cellprofilers_module_does_without_the_summaries(tmp_path):
    """MeasureGranularitySpectrum (the project's plugin) against CellProfiler's own MeasureGranularity
    with the same settings, on two crowded sites: every object and image column equal bit for bit;
    only CellProfiler's per-image Mean/Median/Max/Min/StDev of each object feature are gone."""
    needs_cellprofiler()
    rows = [write_site_inputs(tmp_path / "in", "P1", "A01", site, *crowded_site(site)) for site in (1, 2)]
    csv = write_loaddata(rows, tmp_path / "in" / "load.csv")
    standard = tmp_path / "standard.cppipe"
    text = SITE_PIPELINE.read_text()
    assert text.count("MeasureGranularitySpectrum:[") == 1
    standard.write_text(text.replace("MeasureGranularitySpectrum:[", "MeasureGranularity:["))
    out = {name: run_cellprofiler(pipeline, csv, tmp_path / name)
           for name, pipeline in (("plugin", SITE_PIPELINE), ("standard", standard))}
    summary = re.compile(r"^(Mean|Median|Max|Min|StDev)_Granularity_")
    bookkeeping = re.compile(r"ExecutionTime|ModuleError|PathName|URL")  # module names, folders
    for table in ("Image", *OBJECTS):
        plugin, cellprofiler = (pd.read_csv(out[name] / f"{table}.csv")
                                .pipe(lambda t: t[[c for c in t.columns if not bookkeeping.search(c)]])
                                for name in ("plugin", "standard"))
        dropped = sorted(set(cellprofiler.columns) - set(plugin.columns))
        assert set(plugin.columns) <= set(cellprofiler.columns)
        assert all(summary.match(name) for name in dropped), dropped[:5]
        # 3 channels x 3 objects x 16 steps x 5 statistics, in the image table only
        assert len(dropped) == (3 * 3 * 16 * 5 if table == "Image" else 0)
        assert any(name.startswith("Granularity_16_") for name in plugin.columns)
        pd.testing.assert_frame_equal(plugin, cellprofiler[plugin.columns], check_exact=True, obj=table)


def test_a_digest_that_looks_like_a_huge_exponent_is_read_as_text(tmp_path):
    """CellProfiler writes each image's MD5 digest; "94e80911345122afdc..." (met in a demo run) starts
    like a float with an 11-digit exponent, which crashed pandas' C parser (a segfault, so the read runs
    in a child process here). The digest and the metadata come back as text, measurements as numbers."""
    csv = tmp_path / "Image.csv"
    csv.write_text("ImageNumber,Metadata_Plate,MD5Digest_CYTO,Count_Nuclei\n"
                   "1,001,94e80911345122afdc979c5e559655fd,7\n")
    code = ("import sys; from pathlib import Path; from brightpaint.features.tables import _read_csv; "
            "t = _read_csv(Path(sys.argv[1])); "
            "print(t.loc[0, 'MD5Digest_CYTO'], t.loc[0, 'Metadata_Plate'], t['Count_Nuclei'].dtype)")
    result = subprocess.run([sys.executable, "-c", code, str(csv)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["94e80911345122afdc979c5e559655fd", "001", "int64"]
