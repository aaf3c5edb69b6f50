"""Profiles: aggregation, annotation, normalisation, feature selection and consensus on small
tables with known answers, and the BBBC021 pycytominer reference (Morpheus exercise) reproduced
with these functions."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pycytominer
import pytest
from conftest import shared_data
from scipy.stats import median_abs_deviation

from brightpaint.profiles import (
    aggregate_parquet_wells,
    aggregate_wells,
    annotate_wells,
    clip_outliers,
    consensus_profiles,
    feature_columns,
    metadata_columns,
    normalise_profiles,
    outlier_summary,
    plate_profiles,
    select_features,
    select_features_by_source,
    source_profiles,
    treatment_name,
)

NEGCON = "Metadata_control_type == 'negcon'"


def test_columns_split_metadata_and_features():
    df = pd.DataFrame(columns=["Metadata_Plate", "Cells_AreaShape_Area", "Metadata_Well",
                               "Nuclei_Intensity_MeanIntensity_DNA"])
    assert metadata_columns(df) == ["Metadata_Plate", "Metadata_Well"]
    assert feature_columns(df) == ["Cells_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"]


def test_aggregate_wells_median_and_object_count():
    cells = pd.DataFrame({
        "Metadata_Plate": "P1",
        "Metadata_Well": ["A01"] * 3 + ["A02"] * 2 + ["A01"] * 2,
        "Metadata_Site": [1, 1, 2, 1, 1, 1, 2],
        "Metadata_Source": ["real"] * 5 + ["virtual"] * 2,
        "Metadata_ObjectNumber": [1, 2, 1, 1, 2, 1, 1],
        "Cells_AreaShape_Area": [10.0, 30.0, 20.0, 5.0, 7.0, 100.0, 300.0],
        "Nuclei_Intensity_MeanIntensity_DNA": [1.0, 2.0, 9.0, 0.0, 1.0, 3.0, 5.0],
    })
    wells = aggregate_wells(cells)
    assert list(wells.columns[:4]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Source",
                                       "Metadata_Object_Count"]
    assert "Metadata_Site" not in wells and len(wells) == 3
    row = wells.set_index(["Metadata_Well", "Metadata_Source"])
    assert row.loc[("A01", "real"), "Cells_AreaShape_Area"] == 20.0
    assert row.loc[("A01", "real"), "Metadata_Object_Count"] == 3
    assert row.loc[("A02", "real"), "Nuclei_Intensity_MeanIntensity_DNA"] == 0.5
    assert row.loc[("A01", "virtual"), "Cells_AreaShape_Area"] == 200.0
    mean = aggregate_wells(cells, operation="mean").set_index(["Metadata_Well", "Metadata_Source"])
    assert mean.loc[("A01", "real"), "Nuclei_Intensity_MeanIntensity_DNA"] == pytest.approx(4.0)


@pytest.mark.parametrize("batch_rows", [1, 5, 64, 10_000])
def test_aggregate_parquet_wells_in_batches_equals_aggregate_wells(tmp_path, batch_rows):
    rng = np.random.default_rng(1)
    rows = [("P1", well, site, source, obj) for well in ("A01", "A02", "B07", "C03")
            for site in (1, 2) for source in ("real", "virtual") for obj in range(1, int(rng.integers(1, 9)))]
    cells = pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site",
                                        "Metadata_Source", "Metadata_ObjectNumber"])
    cells["Cells_AreaShape_Area"] = rng.random(len(cells)) * 100
    cells["Nuclei_Intensity_MeanIntensity_DNA"] = rng.random(len(cells))
    path = tmp_path / "cells.parquet"
    cells.to_parquet(path, index=False, row_group_size=7)
    pd.testing.assert_frame_equal(aggregate_parquet_wells(path, batch_rows=batch_rows),
                                  aggregate_wells(cells), check_exact=True)


def test_aggregate_parquet_wells_refuses_a_well_split_in_two_runs(tmp_path):
    cells = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": ["A01", "A01", "A02", "A01"],
                          "Cells_AreaShape_Area": [1.0, 2.0, 3.0, 4.0]})
    cells.to_parquet(tmp_path / "cells.parquet", index=False)
    with pytest.raises(ValueError, match=r"A01.*grouped by well"):
        aggregate_parquet_wells(tmp_path / "cells.parquet", batch_rows=2)


def _platemap():
    return pd.DataFrame({
        "well": ["A1", "A02", "B01", "B02"],
        "perturbation": ["DMSO", "etoposide", "etoposide", "staurosporine"],
        "dose": [np.nan, 1.0, 10.0, 1.0],
        "control_type": ["negcon", "trt", "trt", "poscon"],
        "moa": ["", "topoisomerase inhibitor", "topoisomerase inhibitor", "PKC inhibitor"],
        "target": ["", "TOP2A", "TOP2A", "PRKCA"],
    })


def _wells(wells=("A01", "A02", "B01")):
    return pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": list(wells),
                         "Cells_AreaShape_Area": np.arange(len(wells), dtype=float)})


def test_annotate_wells_adds_metadata_and_treatment():
    info = {"plate": "P1", "batch": "B7", "cell_type": "flat", "role": "train",
            "manifest": "x.csv"}
    out = annotate_wells(_wells(), _platemap(), info)
    assert feature_columns(out) == ["Cells_AreaShape_Area"]
    assert out["Metadata_treatment"].tolist() == ["DMSO", "etoposide@1", "etoposide@10"]
    assert out["Metadata_control_type"].tolist() == ["negcon", "trt", "trt"]
    assert out["Metadata_batch"].eq("B7").all() and out["Metadata_cell_type"].eq("flat").all()
    assert pd.isna(out.loc[0, "Metadata_moa"]) and pd.isna(out.loc[0, "Metadata_target"])
    assert out.loc[2, "Metadata_dose"] == 10.0 and out.loc[1, "Metadata_target"] == "TOP2A"
    assert "Metadata_role" not in out and "Metadata_manifest" not in out


def test_treatment_name_is_stable():
    assert treatment_name("X", 0.1, "trt") == "X@0.1"
    assert treatment_name("X", 10.0, "trt") == "X@10"
    assert treatment_name("X", 3e-5, "trt") == "X@3e-05"
    assert treatment_name("DMSO", 0.1, "negcon") == "DMSO"


def test_annotate_wells_missing_platemap_well_is_an_error():
    with pytest.raises(ValueError, match=r"plate P1: well\(s\) C05 .*not in the plate map"):
        annotate_wells(_wells(("A01", "C05")), _platemap(), {"batch": "B1"})


def test_annotate_wells_other_errors():
    doubled = pd.concat([_platemap(), _platemap().iloc[[1]]], ignore_index=True)
    with pytest.raises(ValueError, match="more than once"):
        annotate_wells(_wells(), doubled, {})
    with pytest.raises(ValueError, match="plate_info is for plate 'P2'"):
        annotate_wells(_wells(), _platemap(), {"plate": "P2"})
    two = pd.concat([_wells(), _wells().assign(Metadata_Plate="P2")], ignore_index=True)
    with pytest.raises(ValueError, match="one plate at a time"):
        annotate_wells(two, _platemap(), {})


def _plates(seed=0):
    """Two plates, each 6 negcon + 6 treated wells, features with plate-specific location and
    scale; treated wells = negcon median + 3 (negcon MAD units) on feature f0."""
    rng = np.random.default_rng(seed)
    rows = []
    for plate, (loc, scale) in {"P1": (10.0, 2.0), "P2": (-5.0, 0.5)}.items():
        for i in range(12):
            control = "negcon" if i < 6 else "trt"
            rows.append({"Metadata_Plate": plate, "Metadata_Well": f"A{i + 1:02d}",
                         "Metadata_control_type": control,
                         **{f"Cells_F_f{j}": loc + scale * rng.normal() for j in range(4)}})
    return pd.DataFrame(rows)


def test_normalise_negcon_median_zero_mad_one():
    wells = _plates()
    out = normalise_profiles(wells)
    assert list(out.columns) == list(wells.columns) and out.index.equals(wells.index)
    for _, plate in out.groupby("Metadata_Plate"):
        neg = plate[plate["Metadata_control_type"] == "negcon"][feature_columns(out)]
        np.testing.assert_allclose(neg.median(), 0, atol=1e-12)
        np.testing.assert_allclose(median_abs_deviation(neg, scale=1 / 1.4826), 1, rtol=1e-12)
    # a treated value is (x - negcon median) / (1.4826 MAD) of its own plate (pycytominer uses
    # the constant 1.4826, not scipy's exact 1.482602...)
    p2 = wells[wells["Metadata_Plate"] == "P2"]
    neg = p2[p2["Metadata_control_type"] == "negcon"]["Cells_F_f0"]
    expected = (p2["Cells_F_f0"] - neg.median()) / median_abs_deviation(neg, scale=1 / 1.4826)
    np.testing.assert_allclose(out.loc[p2.index, "Cells_F_f0"], expected, rtol=1e-12)
    # the same as pycytominer.normalize on each plate
    direct = pycytominer.normalize(p2, features=feature_columns(p2),
                                   meta_features=metadata_columns(p2), samples=NEGCON,
                                   method="mad_robustize")
    np.testing.assert_allclose(out.loc[p2.index, feature_columns(p2)],
                               direct[feature_columns(p2)], rtol=1e-12)
    every = normalise_profiles(wells, samples="all")
    for _, plate in every.groupby("Metadata_Plate"):
        np.testing.assert_allclose(plate[feature_columns(every)].median(), 0, atol=1e-12)
    standard = normalise_profiles(wells, method="standardize")
    neg = standard[standard["Metadata_control_type"] == "negcon"].groupby("Metadata_Plate")
    np.testing.assert_allclose(neg["Cells_F_f1"].mean(), 0, atol=1e-12)


def test_normalise_pooled_scale_centres_each_plate_and_scales_each_cell_type():
    """scale_by: each plate centred on its own controls, each feature scaled by the controls of
    all plates of a cell type pooled. Twelve plates: two cell types whose spreads differ 10x,
    offsets from plate to plate. Pooled, the controls of each cell type have MAD 1 and each plate's
    controls median 0; a plate's own MAD (of 6 wells) scatters around it."""
    rng = np.random.default_rng(3)
    rows = []
    for k in range(12):
        plate, offset = f"P{k + 1}", float(rng.normal(0, 20))
        cell_type, spread = ("flat", 1.0) if k % 2 else ("dense", 10.0)
        for i in range(30):
            rows.append({"Metadata_Plate": plate, "Metadata_cell_type": cell_type,
                         "Metadata_Well": f"A{i + 1:02d}",
                         "Metadata_control_type": "negcon" if i < 6 else "trt",
                         **{f"Cells_F_f{j}": offset + spread * rng.normal() for j in range(40)}})
    wells = pd.DataFrame(rows)
    pooled = normalise_profiles(wells, scale_by=("Metadata_cell_type",))
    features = feature_columns(pooled)
    negcon = pooled[pooled["Metadata_control_type"] == "negcon"]
    for _, plate in negcon.groupby("Metadata_Plate"):
        np.testing.assert_allclose(plate[features].median(), 0, atol=1e-12)
    for _, cells in negcon.groupby("Metadata_cell_type"):
        np.testing.assert_allclose(median_abs_deviation(cells[features], scale="normal"), 1,
                                   rtol=1e-9)
    # a treated well's spread is its cell type's (1 in both), not its plate's noisy estimate
    treated = pooled[pooled["Metadata_control_type"] == "trt"]
    pooled_sd = treated.groupby("Metadata_Plate")[features].std().to_numpy()
    own = normalise_profiles(wells)
    own_sd = own[own["Metadata_control_type"] == "trt"].groupby("Metadata_Plate")[features].std()
    # (measured: mean |log SD| 0.26 pooled, 0.46 each plate's own)
    assert np.abs(np.log(pooled_sd)).mean() < 0.7 * np.abs(np.log(own_sd.to_numpy())).mean()
    # one control well centres its plate (the scale comes from plates with more); a pool without
    # a plate of two is an error
    few = wells[(wells["Metadata_control_type"] == "trt") | wells["Metadata_Well"].isin(["A01"])
                | wells["Metadata_Plate"].isin(["P1", "P2"])]
    sparse = normalise_profiles(few, scale_by=("Metadata_cell_type",))
    assert np.isfinite(sparse[features].to_numpy()).all()
    one = sparse[(sparse["Metadata_control_type"] == "negcon") & ~sparse["Metadata_Plate"].isin(["P1", "P2"])]
    assert len(one) == 10 and (one[features] == 0).all().all()
    with pytest.raises(ValueError, match="no plate .* has 2 or more rows"):
        normalise_profiles(few[few["Metadata_Plate"] == "P3"], scale_by=())


def test_normalise_per_source():
    wells = pd.concat([_plates().assign(Metadata_Source="real"),
                       _plates(1).assign(Metadata_Source="virtual")], ignore_index=True)
    wells.loc[wells["Metadata_Source"] == "virtual", "Cells_F_f2"] *= 100
    out = normalise_profiles(wells)
    for _, group in out.groupby(["Metadata_Plate", "Metadata_Source"]):
        neg = group[group["Metadata_control_type"] == "negcon"]["Cells_F_f2"]
        assert neg.median() == pytest.approx(0, abs=1e-12)
        assert median_abs_deviation(neg, scale=1 / 1.4826) == pytest.approx(1)


def test_normalise_errors_name_the_plate():
    wells = _plates()
    wells.loc[wells["Metadata_Plate"] == "P2", "Metadata_control_type"] = "trt"
    with pytest.raises(ValueError, match="Plate P2: no rows match samples"):
        normalise_profiles(wells)
    one = _plates()
    one.loc[(one["Metadata_Plate"] == "P1") & (one.index > 0), "Metadata_control_type"] = "trt"
    with pytest.raises(ValueError, match="Plate P1: only 1 row"):
        normalise_profiles(one)
    with pytest.raises(ValueError, match="failed"):
        normalise_profiles(_plates(), samples="Metadata_nothing == 1")


def test_normalise_zero_spread_feature_becomes_nan():
    wells = _plates()
    wells["Cells_Children_Count"] = 3.0
    wells.loc[wells["Metadata_control_type"] == "trt", "Cells_Children_Count"] = 4.0
    with pytest.warns(UserWarning, match="Cells_Children_Count"):
        out = normalise_profiles(wells)
    assert out["Cells_Children_Count"].isna().all()
    assert out[["Cells_F_f0", "Cells_F_f3"]].notna().all().all()
    assert out.attrs["zero_scale_features"] == {"Plate P1": ["Cells_Children_Count"],
                                                "Plate P2": ["Cells_Children_Count"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = normalise_profiles(wells, zero_scale="keep")
    assert kept["Cells_Children_Count"].abs().max() > 1e17  # pycytominer's epsilon division
    selected = select_features(out)
    assert "Cells_Children_Count" not in selected


def test_clip_outliers_drops_heavy_tailed_features_per_source_and_clips_the_rest():
    """A feature with no spread in the controls but for one well normalises to |z| ~ 1e4: it goes
    (NaN) in the source where that happens, not in the other; a lone value just over the limit
    is clipped to it; metadata, other values and the input table are untouched."""
    wells = _plates()
    features = feature_columns(wells)
    wells = pd.concat([wells.assign(Metadata_Source="real"), wells.assign(Metadata_Source="virtual")],
                      ignore_index=True)
    normalised = normalise_profiles(wells)
    virtual = np.flatnonzero(normalised["Metadata_Source"] == "virtual")
    blown, edged = features[0], features[1]
    normalised.loc[virtual[:3], blown] = [1e4, -2e4, 5e3]  # 3 of the rows: beyond the 99th percentile
    normalised.loc[virtual[-1], edged] = 110.0  # alone: under the 99th percentile
    before = normalised.copy()
    out = clip_outliers(normalised, 100)
    pd.testing.assert_frame_equal(normalised, before)
    assert out.loc[virtual, blown].isna().all()
    assert out.loc[normalised["Metadata_Source"] == "real", blown].notna().all()
    assert out.loc[virtual[-1], edged] == 100.0
    kept = features[1:]
    untouched = before[kept].abs() <= 100
    assert (out[kept][untouched] == before[kept][untouched]).sum().sum() == untouched.sum().sum()
    pd.testing.assert_frame_equal(out[metadata_columns(out)], before[metadata_columns(before)])
    assert out.attrs["outliers"] == {"real": {"dropped": [], "values_clipped": 0},
                                     "virtual": {"dropped": [blown], "values_clipped": 1}}
    assert "virtual: 1 feature(s) dropped" in outlier_summary(out)
    selected = select_features_by_source(out, ["drop_na_columns"])
    assert blown not in feature_columns(source_profiles(selected, "virtual"))
    assert blown in feature_columns(source_profiles(selected, "real"))
    for off in (None, 0):
        assert clip_outliers(normalised, off) is normalised
    with pytest.raises(ValueError, match="limit"):
        clip_outliers(normalised, -1)


def test_select_features_drops_planted_features():
    rng = np.random.default_rng(3)
    n = 200
    base = rng.normal(size=(n, 4))
    df = pd.DataFrame(base, columns=[f"Cells_Intensity_F{i}" for i in range(4)])
    df.insert(0, "Metadata_Well", [f"W{i}" for i in range(n)])
    df["Cells_Intensity_Copy"] = 2 * df["Cells_Intensity_F0"] + 0.1 * rng.normal(size=n)  # r ~ 0.999
    df["Cells_Intensity_Constant"] = 1.0
    df["Cells_Intensity_Rare"] = np.where(np.arange(n) < 3, 5.0, 0.0)  # 3 distinct of 200
    df["Cells_Intensity_Gappy"] = np.where(np.arange(n) < 40, np.nan, rng.normal(size=n))
    df["Nuclei_Correlation_Manders_AGP_DNA"] = rng.normal(size=n)  # on the default blocklist
    out = select_features(df)
    kept = set(feature_columns(out))
    assert "Metadata_Well" in out
    assert {"Cells_Intensity_F1", "Cells_Intensity_F2", "Cells_Intensity_F3"} <= kept
    assert len(kept & {"Cells_Intensity_F0", "Cells_Intensity_Copy"}) == 1
    for dropped in ("Cells_Intensity_Constant", "Cells_Intensity_Rare", "Cells_Intensity_Gappy",
                    "Nuclei_Correlation_Manders_AGP_DNA"):
        assert dropped not in kept
    loose = select_features(df, ["correlation_threshold"], corr_threshold=0.9999)
    assert {"Cells_Intensity_F0", "Cells_Intensity_Copy"} <= set(feature_columns(loose))


def test_each_stain_source_keeps_its_own_features():
    """The real profiles' selection does not move with the virtual ones: a virtual copy of a real
    feature, or a virtual feature gone constant, changes only the virtual rows' kept features."""
    rng = np.random.default_rng(5)
    n = 60
    real = pd.DataFrame(rng.normal(size=(n, 4)), columns=[f"Cells_Intensity_F{i}" for i in range(4)])
    real.insert(0, "Metadata_Well", [f"W{i}" for i in range(n)])
    virtual = real.copy()
    virtual["Cells_Intensity_F1"] = 2 * virtual["Cells_Intensity_F0"]  # correlated: one goes
    virtual["Cells_Intensity_F3"] = 0.5  # no spread: dropped
    both = pd.concat([real.assign(Metadata_Source="real"), virtual.assign(Metadata_Source="virtual")],
                     ignore_index=True)
    selected = select_features_by_source(both)
    assert selected["Metadata_Source"].tolist() == both["Metadata_Source"].tolist()
    assert feature_columns(source_profiles(selected, "real")) == feature_columns(select_features(real))
    assert feature_columns(source_profiles(selected, "real")) == [f"Cells_Intensity_F{i}" for i in range(4)]
    kept_virtual = feature_columns(source_profiles(selected, "virtual"))
    assert kept_virtual == feature_columns(select_features(virtual))
    assert "Cells_Intensity_F3" not in kept_virtual and len(kept_virtual) == 2
    # a source's rows are NaN only for the features kept for the other source alone
    assert selected.loc[selected["Metadata_Source"] == "virtual", "Cells_Intensity_F3"].isna().all()
    pd.testing.assert_frame_equal(source_profiles(selected, "real").reset_index(drop=True),
                                  select_features(real.assign(Metadata_Source="real")).reset_index(drop=True),
                                  check_like=True)
    # one source: plain select_features
    pd.testing.assert_frame_equal(select_features_by_source(real), select_features(real))


def _profiles_for_consensus():
    return pd.DataFrame({
        "Metadata_Plate": ["P1", "P1", "P2", "P2", "P1", "P3"],
        "Metadata_Well": ["A01", "A02", "A01", "A02", "B01", "B01"],
        "Metadata_batch": ["B1", "B1", "B2", "B2", "B1", "B1"],
        "Metadata_treatment": ["X@1", "X@1", "X@1", "Y@1", "Y@1", "Y@1"],
        "Metadata_perturbation": ["X", "X", "X", "Y", "Y", "Y"],
        "Metadata_moa": ["m1", "m1", "m1", "m2", "m2", "m2"],
        "Metadata_Object_Count": [10, 20, 30, 1, 2, 3],
        "Cells_F_a": [1.0, 2.0, 9.0, 0.0, 4.0, 8.0],
        "Cells_F_b": [0.0, 0.0, 3.0, 1.0, 1.0, 1.0],
    })


def test_consensus_keeps_constant_metadata_and_batch_where_constant():
    profiles = _profiles_for_consensus()
    out = consensus_profiles(profiles).set_index("Metadata_treatment")
    assert out.loc["X@1", "Cells_F_a"] == 2.0 and out.loc["Y@1", "Cells_F_a"] == 4.0
    assert out.loc["X@1", "Metadata_moa"] == "m1" and out.loc["Y@1", "Metadata_perturbation"] == "Y"
    assert out.loc["X@1", "Metadata_Replicate_Count"] == 3
    assert out.loc["X@1", "Metadata_Object_Count"] == 60
    assert pd.isna(out.loc["X@1", "Metadata_batch"]) and pd.isna(out.loc["Y@1", "Metadata_Plate"])
    assert "Metadata_Well" not in out
    per_batch = consensus_profiles(profiles, ("Metadata_treatment", "Metadata_batch"))
    assert len(per_batch) == 4
    row = per_batch.set_index(["Metadata_treatment", "Metadata_batch"]).loc[("X@1", "B1")]
    assert row["Cells_F_a"] == 1.5 and row["Metadata_Replicate_Count"] == 2
    mean = consensus_profiles(profiles, operation="mean").set_index("Metadata_treatment")
    assert mean.loc["X@1", "Cells_F_a"] == pytest.approx(4.0)


def test_plate_profiles_levels():
    rng = np.random.default_rng(5)
    platemap = pd.DataFrame({
        "well": [f"A{i:02d}" for i in range(1, 13)],
        "perturbation": ["DMSO"] * 4 + ["a", "a", "b", "b", "c", "c", "d", "d"],
        "dose": [np.nan] * 4 + [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0],
        "control_type": ["negcon"] * 4 + ["trt"] * 8,
        "moa": [""] * 4 + ["m1", "m1", "m1", "m1", "m2", "m2", "m2", "m2"],
        "target": [""] * 4 + ["t1"] * 4 + ["t2"] * 4,
    })
    rows = []
    for source in ("real", "virtual"):
        for well in platemap["well"]:
            for obj in range(1, 6):
                rows.append({"Metadata_Plate": "P1", "Metadata_Well": well, "Metadata_Site": 1,
                             "Metadata_Source": source, "Metadata_ObjectNumber": obj,
                             **{f"Nuclei_Intensity_F{j}": rng.normal() for j in range(6)}})
    tables = plate_profiles(pd.DataFrame(rows), platemap,
                            {"plate": "P1", "batch": "B1", "cell_type": "flat"},
                            {"feature_select": ["drop_na_columns", "correlation_threshold"]})
    assert set(tables) == {"wells", "normalised", "selected", "consensus"}
    assert len(tables["wells"]) == 24 and tables["wells"]["Metadata_Object_Count"].eq(5).all()
    assert len(tables["consensus"]) == 2 * 5  # (DMSO + 4 treatments) x 2 sources
    assert set(tables["consensus"]["Metadata_Source"]) == {"real", "virtual"}
    # a plate where no cell was measured (every site no_objects) is an error naming the plate
    empty = pd.DataFrame(columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Source",
                                  "Metadata_ObjectNumber"])
    with pytest.raises(ValueError, match="plate P1: no cell was measured"):
        plate_profiles(empty, platemap, {"plate": "P1"})


# --------------------------------------------------------------------------- BBBC021 reference

BBBC021_OPERATIONS = ("frequency_threshold", "correlation_threshold", "drop_na_columns",
                      "blocklist")


def load_bbbc021(folder) -> pd.DataFrame:
    """The raw per-well table joined with compound / concentration / MoA as the Morpheus notebook
    (input_data/BBBC021.ipynb) does it: site-1 image rows give each well's compound, an inner join
    with the MoA table keeps the 103 treatments + DMSO (632 wells). Annotated in this project's
    columns (perturbation, dose, control_type, treatment, moa, batch = the 'WeekN' of the plate)."""
    extdata = folder / "inst" / "extdata"
    wells = pd.read_csv(extdata / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz")
    images = pd.read_csv(extdata / "BBBC021_v1_image.csv.gz")
    moa = pd.read_csv(extdata / "BBBC021_v1_moa.csv")
    images = images[images["Image_FileName_Actin"].str.contains("_s1_")]
    images = images[["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI",
                     "Image_Metadata_Compound", "Image_Metadata_Concentration"]]
    joined = wells.merge(images, left_on=["Image_Metadata_Plate", "Image_Metadata_Well"],
                         right_on=["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"],
                         how="left")
    joined = joined.merge(moa, left_on=["Image_Metadata_Compound", "Image_Metadata_Concentration"],
                          right_on=["compound", "concentration"], how="inner")
    control = np.where(joined["compound"] == "DMSO", "negcon", "trt")
    meta = pd.DataFrame({
        "Metadata_Plate": joined["Image_Metadata_Plate"],
        "Metadata_Well": joined["Image_Metadata_Well"],
        "Metadata_batch": joined["Image_Metadata_Plate"].str.split("_").str[0],
        "Metadata_perturbation": joined["compound"],
        "Metadata_dose": joined["concentration"],
        "Metadata_control_type": control,
        "Metadata_moa": joined["moa"],
        "Metadata_treatment": [treatment_name(p, d, c) for p, d, c in
                               zip(joined["compound"], joined["concentration"], control,
                                   strict=True)],
    })
    features = [c for c in wells.columns if not c.startswith("Image_")]
    return pd.concat([meta, joined[features]], axis=1)


@pytest.fixture(scope="module")
def bbbc021():
    folder = shared_data("bbbc021-moa-profiles")
    reference = pd.read_csv(folder / "BBBC021_Morpheus_Exercise" / "csvs"
                            / "BBBC021_feature_selected_mad_robustize.csv")
    return load_bbbc021(folder), reference


def test_bbbc021_reproduces_pycytominer_reference(bbbc021):
    """The Morpheus table = pycytominer (commit b8fb8659) normalize(method='mad_robustize',
    samples='all') over all 632 wells at once + feature_select(['variance_threshold',
    'correlation_threshold', 'drop_na_columns', 'blocklist']) with the defaults of the time.
    pycytominer 1.7 renamed that variance_threshold (freq_cut 0.05, unique_cut 0.01) to
    frequency_threshold ("variance_threshold" is now a min-variance filter that keeps 2 more
    count features here), so the reproducing settings are: normalise_profiles(by=(),
    samples='all') + select_features(frequency_threshold, correlation_threshold (0.9, pearson),
    drop_na_columns (0.05), blocklist (default)).

    Result: 189 features like the reference; 188 by name. The one difference is a tie:
    Nuclei_Neighbors_SecondClosestDistance_10 and _20 are identical columns in the raw data
    (correlation 1, equal correlation sums), and which one the correlation filter keeps
    depends on pandas' sort of equal values; their values are identical. Values agree to
    1e-9 (measured max |difference| ~1e-14) on every well and kept feature."""
    raw, reference = bbbc021
    assert raw.shape == (632, 8 + 516) and raw["Metadata_treatment"].nunique() == 104
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 count features have MAD 0 over all wells
        normalised = normalise_profiles(raw, samples="all", by=())
    selected = select_features(normalised, BBBC021_OPERATIONS)
    ours, theirs = set(feature_columns(selected)), set(feature_columns(reference))
    alias = {"Nuclei_Neighbors_SecondClosestDistance_10": "Nuclei_Neighbors_SecondClosestDistance_20"}
    assert len(ours) == len(theirs) == 189
    assert len(ours & theirs) >= 188
    assert {alias.get(f, f) for f in ours} == theirs
    assert (raw["Nuclei_Neighbors_SecondClosestDistance_10"]
            == raw["Nuclei_Neighbors_SecondClosestDistance_20"]).all()
    keys = ["Metadata_Plate", "Metadata_Well"]
    paired = selected.merge(reference, on=keys, suffixes=("", "_ref"), validate="one_to_one")
    assert len(paired) == 632
    names = sorted(ours)
    targets = [alias.get(f, f) for f in names]  # a reference column shared with ours has _ref
    ref_names = [f"{t}_ref" if t in ours else t for t in targets]
    difference = np.abs(paired[names].to_numpy() - paired[ref_names].to_numpy())
    assert difference.max() < 1e-9
    # the default selection (frequency + min-variance filters) keeps the same 189 here
    default = select_features(normalised)
    assert set(feature_columns(default)) == ours
