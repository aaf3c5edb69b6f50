"""Matching and evaluation on planted structures with known answers (NSC / NSCB accuracy, top-k,
target matching, copairs mAP, percent replicating, real-vs-virtual feature agreement) and the
BBBC021 1-NN not-same-compound MoA accuracy."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.linalg import hadamard
from test_profiles import BBBC021_OPERATIONS, bbbc021  # noqa: F401  (fixture)

from brightpaint.io import read_platemap
from brightpaint.match import (
    SHAPE_ONLY,
    agreement_summary,
    chance_correlation,
    consistency_map,
    feature_agreement,
    knn_accuracy,
    match_profiles,
    matching_summary,
    nearest_neighbours,
    percent_replicating,
    replicate_map,
    shape_only_matching,
    similarity,
    target_matching,
    top_feature_nmae,
    top_k_hit_rate,
    trusted_virtual_features,
    virtual_feature_agreement,
)
from brightpaint.profiles import (
    consensus_profiles,
    normalise_profiles,
    profiles_from_wells,
    screen_profiles,
    select_features,
)

H = hadamard(16).astype(float)  # rows 1..15: orthogonal, zero-mean (cosine = Pearson)
FEATURES = [f"Cells_Intensity_F{i:02d}" for i in range(16)]
CENTROID = {"A": H[1], "B": H[2], "C": H[3], "D": H[4], "E": H[5], "F": H[8]}
# Compound -> (MoA, target, direction). d2 sits next to MoA A, so its queries are wrong (nearest
# not-same-compound neighbour = an A compound); d1 still finds d2. E has one compound (no positive
# under NSC).
COMPOUNDS = {
    "a1": ("A", "T1", H[1]), "a2": ("A", "T1|T9", H[1]),
    "b1": ("B", "T2", H[2]), "b2": ("B", "T2", H[2]),
    "c1": ("C", "T3", H[3]), "c2": ("C", "T4", H[3]),
    "d1": ("D", "T5", H[4] + 0.3 * H[1]), "d2": ("D", "T6", H[1] + 0.6 * H[4]),
    "e1": ("E", "T7", H[5]),
}


def _row(compound, dose, vector, control="trt", moa=None, target=None, **meta):
    m, t, _ = COMPOUNDS.get(compound, (moa, target, None))
    return {"Metadata_treatment": f"{compound}@{dose}", "Metadata_perturbation": compound,
            "Metadata_dose": dose, "Metadata_control_type": control,
            "Metadata_moa": m if moa is None else moa, "Metadata_target": t if target is None
            else target, **meta, **dict(zip(FEATURES, vector, strict=True))}


def planted_treatments(seed=0) -> pd.DataFrame:
    """One profile per treatment: 9 compounds x 2 doses + DMSO + a poscon that copies d2 with
    MoA D (found by d2's query if controls were candidates)."""
    rng = np.random.default_rng(seed)
    rows = [_row(c, dose, v + 0.02 * rng.normal(size=16))
            for c, (_, _, v) in COMPOUNDS.items() for dose in (1, 10)]
    rows.append(_row("DMSO", 0, 0.02 * rng.normal(size=16), "negcon", np.nan, np.nan))
    rows.append(_row("pos", 1, COMPOUNDS["d2"][2], "poscon", "D", "T6"))
    return pd.DataFrame(rows)


def test_similarity_cosine_and_pearson():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(5, 7)) + 3
    np.testing.assert_allclose(similarity(X, "pearson"), np.corrcoef(X), atol=1e-12)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(similarity(X, "cosine"), unit @ unit.T, atol=1e-12)
    Z = np.vstack([X[:2], np.zeros(7)])
    assert similarity(Z)[2].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="NaN"):
        similarity(np.array([[1.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="metric"):
        similarity(X, "euclid")


@pytest.mark.parametrize("metric", ["cosine", "pearson"])
def test_nsc_accuracy_on_planted_moa_structure(metric):
    profiles = planted_treatments()
    nn = nearest_neighbours(profiles, metric=metric, k=5)
    assert len(nn) == 18  # 9 compounds x 2 doses; DMSO and the poscon are not queries
    assert not nn["neighbour"].str.startswith(("DMSO", "pos")).any()
    assert set(nn.loc[~nn["has_positive"], "query"]) == {"e1@1", "e1@10"}
    assert knn_accuracy(nn) == 14 / 16
    wrong = nn[nn["has_positive"] & ~nn["match"]]
    assert set(wrong["query"]) == {"d2@1", "d2@10"}
    assert wrong["neighbour"].str.startswith("a").all()
    # NSC: never the own compound
    assert (nn["neighbour"].str[:2] != nn["query"].str[:2]).all()
    # d2's first D neighbour (d1) comes after the 4 A profiles
    assert wrong["first_hit_rank"].tolist() == [5.0, 5.0]
    assert top_k_hit_rate(nn, 1) == 14 / 16
    assert top_k_hit_rate(nn, 3) == 14 / 16 and top_k_hit_rate(nn, 5) == 1.0
    # with controls as queries/candidates, d2 finds the poscon copy of itself
    everything = nearest_neighbours(profiles, metric=metric, controls=())
    assert everything.set_index("query").loc["d2@1", "neighbour"] == "pos@1"
    # without NSC, a dose finds its own compound's other dose
    same = nearest_neighbours(profiles, metric=metric, exclude=())
    assert knn_accuracy(same) == 1.0


def test_nscb_excludes_same_batch_candidates():
    rng = np.random.default_rng(2)
    batch_vector = {"B1": 0.8 * H[6], "B2": 0.8 * H[7]}
    rows = []
    for batch, shift in batch_vector.items():
        for c, (_, _, v) in COMPOUNDS.items():
            for dose in (1, 10):
                rows.append(_row(c, dose, v + shift + 0.02 * rng.normal(size=16),
                                 Metadata_batch=batch))
    for c in ("f1", "f2"):  # MoA F only in batch B1
        for dose in (1, 10):
            rows.append(_row(c, dose, H[8] + batch_vector["B1"] + 0.02 * rng.normal(size=16),
                             moa="F", target="T8", Metadata_batch="B1"))
    per_batch = pd.DataFrame(rows)
    nscb = nearest_neighbours(per_batch, exclude=("Metadata_perturbation", "Metadata_batch"))
    query_batch = nscb["query"].str.split(" / ").str[1]
    neighbour_batch = nscb["neighbour"].str.split(" / ").str[1]
    assert (query_batch != neighbour_batch).all()
    assert set(nscb.loc[~nscb["has_positive"], "query"].str[:2]) == {"e1", "f1", "f2"}
    assert knn_accuracy(nscb) == 28 / 32  # d2's 2 doses x 2 batches wrong
    nsc = nearest_neighbours(per_batch, exclude=("Metadata_perturbation",))
    assert (nsc["query"].str.split(" / ").str[1] == nsc["neighbour"].str.split(" / ").str[1]).all()
    assert nsc.set_index("query").loc["f1@1 / B1", "has_positive"]


def test_target_matching_and_mtdist():
    profiles = planted_treatments()
    result = target_matching(profiles, metric="cosine")
    # a1/a2 (share T1 via 'T1|T9') and b1/b2 (T2): 8 queries, all matched
    assert result["n"] == 8 and result["match_rate"] == 1.0
    assert result["n_without_positive"] == 10
    pool = profiles[profiles["Metadata_control_type"] == "trt"].reset_index(drop=True)
    S = similarity(pool[FEATURES].to_numpy(), "cosine")
    targets = [set(t.split("|")) for t in pool["Metadata_target"]]
    same, every = [], []
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            if pool.loc[i, "Metadata_perturbation"] == pool.loc[j, "Metadata_perturbation"]:
                continue
            every.append(1 - S[i, j])
            if targets[i] & targets[j]:
                same.append(1 - S[i, j])
    assert result["n_pairs_same_target"] == len(same) == 8
    assert result["n_pairs_all"] == len(every) == 18 * 16 // 2
    assert result["mtdist"] == pytest.approx(np.mean(same))
    assert result["mtdist_all"] == pytest.approx(np.mean(every))
    assert result["mtdist"] < 0.01 < 0.5 < result["mtdist_all"]


def planted_wells(seed=0, treatments=8, replicates=2, negcon=8, effect=3.0):
    """Wells on 2 plates (batches B1, B2): per plate `negcon` DMSO wells (noise) and `replicates`
    wells of each treatment (its own compound; a random direction plus its MoA's direction, x
    effect, + noise); MoA = treatment index % 4, so each MoA has two compounds."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(treatments, 16))
    moa_directions = rng.normal(size=(4, 16))
    rows = []
    for p, plate in enumerate(("P1", "P2")):
        well = 0
        for _ in range(negcon):
            well += 1
            rows.append(_row("DMSO", 0, rng.normal(size=16), "negcon", np.nan, np.nan,
                             Metadata_Plate=plate, Metadata_Well=f"A{well:02d}",
                             Metadata_batch=f"B{p + 1}"))
        for t in range(treatments):
            vector = effect * (directions[t] + 1.5 * moa_directions[t % 4])
            for _ in range(replicates):
                well += 1
                rows.append(_row(f"cpd{t}", 1, vector + rng.normal(size=16), "trt",
                                 f"moa{t % 4}", f"T{t % 4}", Metadata_Plate=plate,
                                 Metadata_Well=f"A{well:02d}", Metadata_batch=f"B{p + 1}"))
    df = pd.DataFrame(rows)
    return df[[c for c in df.columns if c.startswith("Metadata_")] + FEATURES]


def _shuffled(wells, seed=0):
    """The feature rows permuted over all wells (controls included): metadata no longer says
    anything about the profiles, so every score should be at chance."""
    out = wells.copy()
    order = np.random.default_rng(seed).permutation(len(out))
    out[FEATURES] = out[FEATURES].to_numpy()[order]
    return out


def test_replicate_map_planted_and_shuffled():
    wells = planted_wells()
    planted = replicate_map(wells, null_size=1000)
    assert len(planted) == 8 and planted["n_profiles"].eq(4).all()
    assert planted["mAP"].mean() > 0.95 and planted["retrieved"].all()
    shuffled = replicate_map(_shuffled(wells), null_size=1000)
    # chance: 3 positives ranked at random among 3 + 8 negatives -> expected AP ~0.45
    assert shuffled["mAP"].mean() < 0.6 and shuffled["retrieved"].mean() <= 0.25
    again = replicate_map(wells, null_size=1000)
    pd.testing.assert_frame_equal(planted, again)  # deterministic (private copairs cache)
    with pytest.raises(ValueError, match="no negcon wells"):
        replicate_map(wells[wells["Metadata_control_type"] == "trt"], null_size=100)


def test_consistency_map_planted_moa():
    con = consistency_map(planted_treatments(), null_size=1000)
    table = con.set_index("Metadata_moa")
    assert set(table.index) == {"A", "B", "C", "D"}  # E has one compound: no positive pair
    assert table.loc[["A", "B", "C"], "mAP"].eq(1.0).all()
    assert table.loc["D", "mAP"] < 1.0


def test_percent_replicating_planted_and_shuffled():
    wells = planted_wells(replicates=3)
    planted = percent_replicating(wells, n_null=500, seed=0)
    assert len(planted) == 8 and planted["n_wells"].eq(6).all()
    assert planted["replicating"].all()
    assert planted.equals(percent_replicating(wells, n_null=500, seed=0))
    shuffled = percent_replicating(_shuffled(wells, 1), n_null=500, seed=0)
    assert shuffled["replicating"].mean() <= 0.25
    other_seed = percent_replicating(wells, n_null=500, seed=1)
    assert other_seed["replicating"].all()
    assert not other_seed["null_threshold"].equals(planted["null_threshold"])


def _real_virtual(noise, seed=0, n=40):
    rng = np.random.default_rng(seed)
    informative = rng.normal(size=n)
    real = pd.DataFrame({
        "Metadata_Plate": "P1", "Metadata_Well": [f"W{i:02d}" for i in range(n)],
        "Metadata_moa": np.where(informative > 0, "m1", "m2"),
        "Nuclei_Intensity_MeanIntensity_DNA": informative,
        "Nuclei_AreaShape_Area": rng.normal(size=n) * 5 + 100,
        "Cells_Texture_Contrast_CYTO_3_00_256": rng.normal(size=n),
        "Cytoplasm_Granularity_1_CYTO": rng.normal(size=n),
        "Cells_Children_Cytoplasm_Count": np.ones(n),
    })
    virtual = real.copy()
    for column in real.columns[3:]:
        virtual[column] = real[column] + noise * real[column].std() * rng.normal(size=n)
    return real, virtual.sample(frac=1, random_state=0)  # matched on (plate, well), not order


def test_feature_agreement_identical_and_noisy():
    real, virtual = _real_virtual(0.0)
    same = feature_agreement(real, virtual).set_index("feature")
    assert same.loc["Nuclei_AreaShape_Area", "compartment"] == "Nuclei"
    assert same.loc["Cells_Texture_Contrast_CYTO_3_00_256", "group"] == "Texture"
    assert pd.isna(same.loc["Cells_Children_Cytoplasm_Count", "pearson"])  # constant
    assert same["pearson"].dropna().eq(1.0).all() and same["n_wells"].eq(40).all()
    real, noisy = _real_virtual(0.7)
    agreement = feature_agreement(real, noisy)
    assert agreement["pearson"].dropna().between(0.3, 0.95).all()
    summary = agreement_summary(agreement).set_index(["compartment", "group"])
    assert summary.loc[("all", "all"), "n_features"] == 5
    assert summary.loc[("all", "all"), "n_undefined"] == 1
    assert summary.loc[("Nuclei", "all"), "n_features"] == 2
    assert summary.loc[("Cells", "Texture"), "median_pearson"] < 0.95


def test_top_feature_nmae():
    real, virtual = _real_virtual(0.0)
    same = top_feature_nmae(real, virtual, n=3, seed=0)
    assert same["rank"].tolist() == [1, 2, 3]
    assert same.loc[0, "feature"] == "Nuclei_Intensity_MeanIntensity_DNA"
    assert same["nmae"].eq(0.0).all()
    real, noisy = _real_virtual(0.5)
    top = top_feature_nmae(real, noisy, n=2, seed=0)
    assert top.equals(top_feature_nmae(real, noisy, n=2, seed=0))
    # E|N(0, 0.5)| = 0.5 * sqrt(2 / pi) ~ 0.40
    assert 0.25 < top.loc[0, "nmae"] < 0.6


def test_matching_summary_on_planted_wells():
    wells = planted_wells()
    summary = matching_summary(wells, null_size=200).set_index("metric")
    for name in ("moa_nsc_accuracy_cosine", "moa_nsc_accuracy_pearson", "moa_nsc_top3_cosine",
                 "moa_nsc_top5_pearson", "moa_nscb_accuracy_cosine", "target_match_rate_cosine",
                 "mtdist_cosine", "mtdist_all_pairs_cosine", "replicate_mAP",
                 "replicate_fraction_retrieved", "moa_consistency_mAP", "percent_replicating"):
        assert np.isfinite(summary.loc[name, "value"]), name
    assert summary.loc["moa_nsc_accuracy_cosine", "value"] == 1.0
    assert summary.loc["moa_nsc_accuracy_cosine", "n"] == 8
    assert summary.loc["moa_nscb_accuracy_cosine", "n"] == 16  # 8 treatments x 2 batches
    assert summary.loc["percent_replicating", "value"] == 100.0
    one_plate = matching_summary(wells[wells["Metadata_Plate"] == "P1"], null_size=200)
    nscb = one_plate.set_index("metric").loc["moa_nscb_accuracy_cosine"]
    assert np.isnan(nscb["value"]) and "2 batches" in nscb["details"]


def test_match_profiles_tables():
    wells = planted_wells()
    both = pd.concat([wells.assign(Metadata_Source="real"),
                      wells.assign(Metadata_Source="virtual")], ignore_index=True)
    tables = match_profiles(both, consensus_profiles(both), both,
                            {"null_size": 100, "top_features": 5})
    assert set(tables) == {"summary", "neighbours", "agreement"}
    summary = tables["summary"]
    assert set(summary["source"]) == {"real", "virtual", "real vs virtual", SHAPE_ONLY}
    level3 = summary[summary["source"] == "real vs virtual"].set_index("metric")
    assert level3.loc["feature_agreement_median_pearson", "value"] == pytest.approx(1.0)
    assert level3.loc["top5_feature_nmae", "value"] == 0.0
    assert tables["agreement"]["rank"].notna().sum() == 5
    # the real profiles' NSC from shape features alone: none here (all Intensity), so NaN with why
    shape_only = summary[summary["source"] == SHAPE_ONLY].set_index("metric")
    assert np.isnan(shape_only.loc["moa_nsc_accuracy_cosine", "value"])
    assert "no shape feature" in shape_only.loc["moa_nsc_accuracy_cosine", "details"]


def test_shape_only_matching_reads_the_shape_features_alone():
    wells = planted_wells()
    # the MoA sits in the Intensity features; the AreaShape ones are noise
    shape = {f"Cells_Intensity_F{i:02d}": f"Cells_AreaShape_F{i:02d}" for i in range(8, 16)}
    noise = np.random.default_rng(1).normal(size=(len(wells), 8))
    wells[list(shape)] = noise
    wells = wells.rename(columns=shape)
    consensus = consensus_profiles(wells)
    row = shape_only_matching(consensus).set_index("metric").loc["moa_nsc_accuracy_cosine"]
    expected = knn_accuracy(nearest_neighbours(consensus, features=list(shape.values())))
    assert row["value"] == expected and row["n"] == 8 and "8 shape features" in row["details"]
    # noise alone retrieves the MoA less often than the profiles' Intensity features do
    assert expected < matching_summary(wells, null_size=100).set_index("metric").loc[
        "moa_nsc_accuracy_cosine", "value"]


# --------------------------------------------------------------------------- BBBC021


def test_bbbc021_nsc_moa_accuracy(bbbc021):  # noqa: F811
    """1-NN not-same-compound MoA accuracy over the 103 BBBC021 treatments, mean profile per
    treatment (as the cytominergallery vignette), on the reference normalisation/selection
    (mad_robustize over all wells, BBBC021_OPERATIONS). Measured: 0.913 for cosine and for
    Pearson (mean and median consensus); the vignette reports 0.82 (95% CI 0.73-0.89) and
    Ljosa et al. 2013 ~0.83 for mean profiles. A plate's own profiles (robust MAD against that
    plate's 6 DMSO wells) give 0.78 (median consensus): six control wells make a noisy MAD (the
    screen's profiles pool the scale: test_bbbc021_screen_defaults_beat_the_published_accuracy);
    it is printed, and must stay well above chance (1/12)."""
    raw, _ = bbbc021
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        normalised = normalise_profiles(raw, samples="all", by=())
        per_plate = normalise_profiles(raw)
    selected = select_features(normalised, BBBC021_OPERATIONS)
    treatments = consensus_profiles(selected, operation="mean")
    results = {}
    for metric in ("cosine", "pearson"):
        nn = nearest_neighbours(treatments, metric=metric)
        assert len(nn) == 103 and nn["has_positive"].all()
        results[metric] = knn_accuracy(nn)
    print(f"BBBC021 NSC 1-NN MoA accuracy (mean per treatment): cosine {results['cosine']:.3f}, "
          f"pearson {results['pearson']:.3f}")
    assert results["cosine"] >= 0.82 and results["pearson"] >= 0.82
    default = consensus_profiles(select_features(per_plate), operation="median")
    accuracy = knn_accuracy(nearest_neighbours(default, metric="cosine"))
    print(f"BBBC021 NSC accuracy, pipeline defaults (per-plate DMSO MAD, median): {accuracy:.3f}")
    assert accuracy > 0.5


# --------------------------------------------------------------------------- real plate designs


def _dose_response_plate(tmp_path, seed=0):
    """A LINCS-style plate: 40 compounds x 4 doses, one well each, and 16 vehicle wells, with the
    plate map's own control labels (ctl_vehicle / trt_cp) and no target column. Compounds 0-19
    are active: a signature of their MoA (one of 4, two compounds 'm0|m1') whose size grows with
    the dose; compounds 20-39 are inactive (noise only). Returns (wells, plate map)."""
    rng = np.random.default_rng(seed)
    wells = [f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)][:176]
    signatures = rng.normal(size=(4, 60))
    rows, features = [], []
    for i, well in enumerate(wells):
        if i < 16:
            pert, dose, label, moa, signal = "DMSO", "", "ctl_vehicle", "", np.zeros(60)
        else:
            compound, level = divmod(i - 16, 4)
            dose = [0.3, 1.0, 3.0, 10.0][level]
            moa = "m0|m1" if compound in (0, 1) else f"m{compound % 4}"
            active = compound < 20
            signal = (signatures[compound % 4] * (1 + level) * 0.8 if active else np.zeros(60))
            pert, label = f"BRD-{compound:02d}", "trt_cp"
        rows.append((well, pert, dose, label, moa if pert != "DMSO" else ""))
        features.append(signal + rng.normal(size=60))
    platemap_path = tmp_path / "platemap.csv"
    pd.DataFrame(rows, columns=["well", "perturbation", "dose", "control_type", "moa"]).to_csv(
        platemap_path, index=False)
    table = pd.DataFrame(np.array(features), columns=[f"Cells_Intensity_F{j:02d}" for j in range(60)])
    table.insert(0, "Metadata_Well", wells)
    table.insert(0, "Metadata_Plate", "LINCS1")
    return table, platemap_path


def test_dose_response_plate_replicates_by_compound(tmp_path):
    """On a plate with one well per compound and dose, replicate groups by compound + dose leave
    nothing to measure and the summary says so and what to set; by compound, replicate mAP and
    percent replicating are per compound and find the 20 active of 40 compounds. The plate map's
    own control labels are the reference wells."""
    wells, path = _dose_response_plate(tmp_path)
    platemap = read_platemap(path, {"negcon": ["ctl_vehicle"], "trt": ["trt_cp"]})
    info = {"plate": "LINCS1", "batch": "unspecified", "cell_type": "unspecified"}
    settings = {"feature_select": ["drop_na_columns"]}
    by_dose = profiles_from_wells(wells, platemap, info, settings)
    summary = matching_summary(by_dose["selected"], by_dose["consensus"], null_size=200)
    row = summary.set_index("metric").loc["percent_replicating"]
    assert row["n"] == 0 and "0 of 160 treatments have >= 2 wells" in row["details"]
    assert "profiles.replicate_by: [perturbation]" in row["details"]
    tables = profiles_from_wells(wells, platemap, info, {**settings, "replicate_by": ["perturbation"]})
    selected = tables["selected"]
    assert set(selected.loc[selected["Metadata_control_label"] == "ctl_vehicle",
                            "Metadata_control_type"]) == {"negcon"}
    summary = matching_summary(selected, tables["consensus"], null_size=200).set_index("metric")
    assert summary.loc["replicate_mAP", "n"] == 40 and summary.loc["percent_replicating", "n"] == 40
    assert "40 of 40 treatments" in summary.loc["percent_replicating", "details"]
    pr = percent_replicating(selected, n_null=200)
    active = pr["Metadata_treatment"].str[4:].astype(int) < 20
    assert pr.loc[active, "replicating"].mean() >= 0.9 and pr.loc[~active, "replicating"].mean() <= 0.15
    rep = replicate_map(selected, null_size=200).set_index("Metadata_treatment")
    assert rep.loc[[f"BRD-{c:02d}" for c in range(20)], "retrieved"].mean() >= 0.9
    assert rep.loc[[f"BRD-{c:02d}" for c in range(20, 40)], "retrieved"].mean() <= 0.15
    # no target column: target metrics are absent or NaN, never an error; nor without MoAs
    assert "target_match_rate_cosine" not in summary.index or \
        not np.isfinite(summary.loc["target_match_rate_cosine", "value"])
    bare = matching_summary(selected.drop(columns=["Metadata_moa"]).assign(Metadata_moa=np.nan),
                            tables["consensus"].assign(Metadata_moa=np.nan), null_size=50)
    bare = bare.set_index("metric")
    assert not np.isfinite(bare.loc[["moa_nsc_accuracy_cosine", "moa_consistency_mAP"], "value"]).any()
    assert "no non-control profile has a label" in bare.loc["moa_nsc_accuracy_cosine", "details"]
    assert "no Metadata_moa value is carried by two compounds" in bare.loc["moa_consistency_mAP", "details"]


def test_consistency_map_is_multilabel_like_knn():
    """'m0|m1' counts towards m0 and m1 (as kNN's share-any rule); single labels give exactly the
    single-label copairs mAP."""
    table = pd.DataFrame(
        [{"Metadata_perturbation": c, "Metadata_moa": m, "Metadata_control_type": "trt",
          **dict(zip(FEATURES, vector + 0.2 * np.random.default_rng(k).normal(size=16), strict=True))}
         for k, (c, (m, _, vector)) in enumerate(COMPOUNDS.items())])
    single = consistency_map(table, null_size=100).set_index("Metadata_moa")
    assert single.loc["A", "n_profiles"] == 2 and single.loc["A", "mAP"] > 0.9
    both = table.copy()
    both.loc[both["Metadata_perturbation"] == "b1", "Metadata_moa"] = "A|B"
    multi = consistency_map(both, null_size=100).set_index("Metadata_moa")
    assert "A|B" not in multi.index
    assert multi.loc["A", "n_profiles"] == 3 and multi.loc["B", "n_profiles"] == 2
    # b1's own profile lies with B: as an A positive it lowers A's mAP
    assert multi.loc["A", "mAP"] < single.loc["A", "mAP"]
    np.testing.assert_allclose(multi.loc["C", "mAP"], single.loc["C", "mAP"])


def test_bbbc021_screen_defaults_beat_the_published_accuracy(bbbc021):  # noqa: F811
    """The screen's profiles with the pipeline's defaults (screen_profiles: each of the 55 plates
    centred on its 6 DMSO wells, the scale pooled over the plates of the cell line, the default
    feature selection, median consensus) reach NSC 1-NN MoA accuracy >= 0.85 over the 103
    treatments; measured 0.893 (0.903 without profiles.outlier_limit; published: 0.82, 95 % CI
    0.73-0.89). Each plate's own scale (scale_by: [plate]) gives 0.78."""
    raw, _ = bbbc021
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plates = [plate for _, plate in raw.groupby("Metadata_Plate")]
        accuracy = {}
        for scale_by in (["cell_type"], ["plate"]):
            tables = screen_profiles(plates, {"scale_by": scale_by})
            accuracy[scale_by[0]] = knn_accuracy(nearest_neighbours(tables["consensus"]))
    print(f"BBBC021 NSC accuracy, screen defaults: {accuracy}")
    assert accuracy["cell_type"] >= 0.85 and accuracy["plate"] < accuracy["cell_type"] - 0.05


def test_virtual_profiles_are_matched_on_the_features_that_follow_the_real_ones():
    """Virtual features 0-7 follow the real ones from well to well; 8-15 are a stain brightfield
    does not show (noise). Matched on the trusted ones, the virtual profiles retrieve MoA and
    replicates as those features do; on all, the noise drags them down."""
    real = planted_wells()
    virtual = real.copy()
    noise = np.random.default_rng(3).normal(scale=4, size=(len(real), 8))
    virtual[FEATURES[8:]] = noise
    virtual[FEATURES[:8]] += np.random.default_rng(4).normal(scale=0.2, size=(len(real), 8))
    both = pd.concat([real.assign(Metadata_Source="real"), virtual.assign(Metadata_Source="virtual")],
                     ignore_index=True)
    agreement = virtual_feature_agreement(both)
    assert set(agreement.loc[agreement["pearson"] > 0.9, "feature"]) == set(FEATURES[:8])
    assert agreement.set_index("feature").loc[FEATURES[8:], "pearson"].abs().max() < 0.5
    assert trusted_virtual_features(agreement, 0.5) == FEATURES[:8]
    assert trusted_virtual_features(agreement, 0) is None
    assert trusted_virtual_features(virtual_feature_agreement(real), 0.5) is None  # no pairs

    settings = {"null_size": 100, "top_features": 5}
    consensus = consensus_profiles(both)
    tables = match_profiles(both, consensus, both, settings)
    summary = tables["summary"]
    assert tables["agreement"]["pearson"].tolist() == agreement["pearson"].tolist()
    got = summary[summary["source"] == "virtual"].set_index("metric")
    expected = matching_summary(virtual[[c for c in virtual.columns if c not in FEATURES[8:]]],
                                null_size=100).set_index("metric")
    for metric in ("moa_nsc_accuracy_cosine", "replicate_mAP", "percent_replicating"):
        assert got.loc[metric, "value"] == pytest.approx(expected.loc[metric, "value"]), metric
    assert (got.loc["virtual_features_trusted", "value"], got.loc["virtual_features_trusted", "n"]) == (8, 16)
    everything = match_profiles(both, consensus, both, {**settings, "virtual_feature_min_r": 0})["summary"]
    everything = everything[everything["source"] == "virtual"].set_index("metric")
    assert "virtual_feature_min_r is off" in everything.loc["virtual_features_trusted", "details"]
    assert everything.loc["replicate_mAP", "value"] < got.loc["replicate_mAP", "value"]
    # virtual profiles alone (an apply-only plate): every feature, and the row says why
    alone = match_profiles(both[both["Metadata_Source"] == "virtual"], consensus[consensus["Metadata_Source"]
                           == "virtual"], both[both["Metadata_Source"] == "virtual"], settings)["summary"]
    alone = alone.set_index("metric")
    assert alone.loc["virtual_features_trusted", "value"] == 16
    assert "no well measured on both" in alone.loc["virtual_features_trusted", "details"]
    # the real profiles are matched on every feature either way
    real_rows = summary[summary["source"] == "real"].set_index("metric")
    assert real_rows.loc["replicate_mAP", "value"] == pytest.approx(
        matching_summary(real, null_size=100).set_index("metric").loc["replicate_mAP", "value"])


def test_shape_only_replicate_map_reads_the_shape_features_alone():
    wells = planted_wells()
    shape = {f"Cells_Intensity_F{i:02d}": f"Cells_AreaShape_F{i:02d}" for i in range(8)}
    wells = wells.rename(columns=shape)
    table = shape_only_matching(consensus_profiles(wells), wells=wells, null_size=100).set_index("metric")
    expected = replicate_map(wells, null_size=100, features=list(shape.values()))["mAP"].mean()
    assert table.loc["replicate_mAP", "value"] == pytest.approx(expected)
    assert "8 shape features" in table.loc["replicate_mAP", "details"]
    no_shape = shape_only_matching(consensus_profiles(planted_wells()), wells=planted_wells(), null_size=100)
    assert no_shape["value"].isna().all() and len(no_shape) == 2


def test_few_wells_cannot_make_a_virtual_feature_trusted():
    """r 0.6 passes the 0.5 threshold over 24 wells, not over 8 (chance reaches 0.79 there)."""
    assert chance_correlation(24) == pytest.approx(0.4716, abs=1e-3)
    assert chance_correlation(8) > 0.75 and chance_correlation(2) == 1.0
    # r's own t statistic over n wells has one-sided p 0.01
    for n in (8, 24, 72):
        r = float(chance_correlation(n))
        assert stats.t.sf(r * np.sqrt((n - 2) / (1 - r * r)), n - 2) == pytest.approx(0.01, rel=1e-6)
    agreement = pd.DataFrame({"feature": ["many", "few", "weak"], "pearson": [0.6, 0.6, 0.4],
                              "n_wells": [24, 8, 200]})
    assert trusted_virtual_features(agreement, 0.5) == ["many"]
