"""Generalisation matrix of virtual staining: groups, the matrix arithmetic on known tables, and on
the demo screen the matrix the workflow stored (computed from the stored per-site metrics, every
model on every group's held-out wells, never on its own training wells, shown on the index page)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CHANNELS, DEMO_CONFIG

from brightpaint.generalisation import generalisation_matrix, generalisation_table, nuclei_features
from brightpaint.groups import screen_groups
from brightpaint.workflow import ConfigError, Screen


def test_groups_are_cell_types_times_phenotype_groups():
    groups = screen_groups(["flat", "dense"], {"non-toxic": "a == 0", "toxic": "a == 1"})
    assert [g.name for g in groups] == ["flat__non-toxic", "flat__toxic", "dense__non-toxic", "dense__toxic"]
    assert groups[3].cell_type == "dense" and groups[3].query == "a == 1"
    assert [g.name for g in screen_groups([], {"x": "", "y": ""})] == ["x", "y"]
    with pytest.raises(ValueError, match="at least two groups"):
        screen_groups(["flat"], {})
    with pytest.raises(ValueError, match="group name"):
        screen_groups(["flat", "de nse"], {})


def generalisation_plan(sheet: Path, phenotypes: dict) -> tuple[dict, dict]:
    screen = Screen.from_config({"screen": str(sheet), "channels": CHANNELS, "stain": {}})
    settings = {"enabled": True, "cell_types": True, "phenotypes": phenotypes}
    return screen.generalisation_groups(settings, screen.stain_training_plates())


def test_groups_that_no_plate_can_split_are_skipped_with_the_reason(tiny_screen):
    """The tiny screen's one training plate T1 (cell type flat) has 6 wells, one of them
    staurosporine (M13): a group needs two wells on a plate (one trains, one is held out)."""
    sheet = tiny_screen / "plates.tsv"
    groups, skipped = generalisation_plan(sheet, {"a": "well in ['E05', 'E13']", "b": "control_type == 'trt'",
                                                  "one": "well == 'M13'", "none": "perturbation == 'x'"})
    assert list(groups) == ["flat__a", "flat__b"] and groups["flat__b"]["query"] == "control_type == 'trt'"
    assert list(skipped) == ["flat__one", "flat__none"]
    assert "wells {'T1': ['M13']}" in skipped["flat__one"]
    assert "two of its wells on one plate" in skipped["flat__one"]
    assert "has no wells on the training plates" in skipped["flat__none"]
    # the demo's phenotype groups on this screen: toxic is M13 alone, so one group is left: no matrix
    demo_groups = yaml.safe_load(DEMO_CONFIG.read_text())["generalisation"]["phenotypes"]
    groups, skipped = generalisation_plan(sheet, demo_groups)
    assert groups == {} and sorted(skipped) == ["flat__non-toxic", "flat__toxic"]
    assert "M13" in skipped["flat__toxic"] and "no matrix" in skipped["flat__non-toxic"]
    with pytest.raises(ConfigError, match=r"generalisation.phenotypes: group flat__x, plate T1: cannot apply "
                                          r"\"colour == 'red'\" to the plate map \(columns \['well'"):
        generalisation_plan(sheet, {"x": "colour == 'red'", "y": ""})


def test_nuclei_features_are_mean_intensities_per_object():
    labels = np.zeros((4, 4), np.int32)
    labels[:2, :2], labels[2:, 2:] = 1, 3  # object 2 absent
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    features = nuclei_features(image, labels)
    assert features[0] == pytest.approx(np.mean([0, 1, 4, 5]))
    assert np.isnan(features[1]) and features[2] == pytest.approx(np.mean([10, 11, 14, 15]))


def test_matrix_is_the_difference_to_the_model_of_the_test_group():
    rows = []
    # model A: PCC 0.9 on A, 0.6 on B; model B: 0.7 on A, 0.8 on B; feature N-MAE lower is better
    for train, test, pcc, nmae in (("A", "A", 0.9, 0.1), ("A", "B", 0.6, 0.3), ("B", "A", 0.7, 0.2),
                                   ("B", "B", 0.8, 0.1)):
        for site in (1, 2):
            rows.append({"train_group": train, "test_group": test, "plate": "P", "well": "A01", "site": site,
                         "level": "pixels", "metric": "pcc", "channel": "DNA",
                         "value": pcc + (0.05 if site == 1 else -0.05)})
            rows.append({"train_group": train, "test_group": test, "plate": "P", "well": "A01", "site": site,
                         "level": "features", "metric": "feature_nmae", "channel": "DNA", "value": nmae})
    matrix = generalisation_matrix(pd.DataFrame(rows)).set_index(["metric", "train_group", "test_group"])
    assert matrix.loc[("pcc", "A", "B"), "difference"] == pytest.approx(0.6 - 0.8)
    assert matrix.loc[("pcc", "B", "A"), "baseline"] == pytest.approx(0.9)
    assert matrix.loc[("pcc", "A", "A"), "difference"] == 0
    assert matrix.loc[("feature_nmae", "A", "B"), "difference"] == pytest.approx(0.2)
    assert matrix.loc[("feature_nmae", "A", "B"), "better"] == pytest.approx(-0.2)  # worse
    table = generalisation_table(matrix.reset_index())
    assert list(table.columns) == ["level", "metric", "train_group", "A", "B"]
    assert table.iloc[0]["metric"] == "pcc"  # pixels first


# ---------------------------------------------------------------------------------------------
# On the demo screen
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run / "results"


@pytest.fixture(scope="module")
def stored(demo):
    folder = demo / "generalisation"
    groups = sorted(p.name for p in folder.iterdir() if p.is_dir())
    metrics = pd.concat([pd.read_parquet(folder / g / "metrics.parquet") for g in groups], ignore_index=True)
    cards = {g: json.loads((folder / g / "card.json").read_text()) for g in groups}
    return folder, groups, metrics, cards


def test_demo_matrix_is_computed_from_the_stored_metrics(stored):
    folder, groups, metrics, _ = stored
    config = yaml.safe_load(DEMO_CONFIG.read_text())["generalisation"]
    assert groups == sorted(f"{t}__{p}" for t in ("flat", "dense") for p in config["phenotypes"])
    matrix = pd.read_parquet(folder / "matrix.parquet")
    pd.testing.assert_frame_equal(matrix, generalisation_matrix(metrics))
    # every metric of every level, for every training x test group pair
    assert set(matrix["metric"]) == {"pcc", "ssim", "psnr", "ap50", "f1_70", "feature_nmae"}
    assert (matrix.groupby("metric").size() == len(groups) ** 2).all()
    diagonal = matrix[matrix["train_group"] == matrix["test_group"]]
    assert (diagonal["difference"] == 0).all()
    print(generalisation_table(matrix).to_string())


def test_every_model_is_scored_on_the_same_held_out_sites_and_never_on_its_training_wells(stored):
    _, groups, metrics, cards = stored
    for test_group in groups:
        held_out = {(p, w) for p, split in cards[test_group]["wells"].items() for w in split["validation"]}
        part = metrics[metrics["test_group"] == test_group]
        sites = {g: set(map(tuple, s[["plate", "well", "site"]].drop_duplicates().values))
                 for g, s in part.groupby("train_group")}
        assert set(sites) == set(groups)
        assert len({frozenset(s) for s in sites.values()}) == 1, "test sites differ between models"
        assert {(p, w) for p, w, _ in sites[test_group]} <= held_out
    for train_group, card in cards.items():
        trained = {(p, w) for p, split in card["wells"].items() for w in split["train"]}
        scored = set(map(tuple, metrics[metrics["train_group"] == train_group][["plate", "well"]].values))
        assert not scored & trained


def test_demo_toxic_group_query_selects_exactly_the_generators_toxic_wells(demo):
    phenotypes = yaml.safe_load(DEMO_CONFIG.read_text())["generalisation"]["phenotypes"]
    for plate in ("P1", "P2", "P3"):
        truth = pd.read_csv(demo / "demo" / "screen" / "truth" / plate / "platemap_truth.csv")
        platemap = pd.read_csv(demo / "demo" / "screen" / plate / "platemap.csv")
        toxic = set(platemap.query(phenotypes["toxic"])["well"])
        assert toxic == set(truth[truth["toxic"]]["well"]) and toxic
        assert set(platemap.query(phenotypes["non-toxic"])["well"]) == set(platemap["well"]) - toxic


def test_index_page_shows_the_matrix(demo):
    html = (demo / "index.html").read_text()
    assert 'data-file="generalisation_matrix"' in html and 'data-table="generalisation matrix"' in html
    assert Path(demo / "generalisation" / "matrix.png").stat().st_size > 0
