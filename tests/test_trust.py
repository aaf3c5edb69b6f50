"""Trust in virtual stains: the domain-of-applicability guard and test-time-augmentation uncertainty,
on generated brightfield with known shifts and on the demo screen's stored results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CHANNELS

from brightpaint import report as R
from brightpaint.demo.camera import plate_optics
from brightpaint.demo.screen import simulate_screen
from brightpaint.demo.site import simulate_site
from brightpaint.demo.spec import PlateSpec, ScreenSpec
from brightpaint.demo.treatments import plate_map
from brightpaint.layout import PlateFolder
from brightpaint.trust import (
    AUGMENTATIONS,
    DOMAIN_STATISTICS,
    attach_uncertainty,
    augment,
    brightfield_statistics,
    describe_domain,
    domain_scores,
    predict_augmented,
    site_uncertainty,
    uncertainty_error_correlation,
    undo_augment,
)


def generated_statistics(cell_type: str, bf_contrast: float = 1.0, wells: int = 12, seed: int = 5
                         ) -> pd.DataFrame:
    """Domain statistics of generated in-focus brightfield planes, corrected by the true flat field."""
    spec = ScreenSpec(plates=(PlateSpec("X", "B", cell_type, "apply", bf_contrast=bf_contrast),),
                      wells=wells, sites=1, seed=seed)
    flat = plate_optics(spec, "X")["BF"].flat
    rows = []
    for well in plate_map(wells)["well"]:
        site = simulate_site(spec, "X", well, 1, fluorescence=False)
        plane = site.images[("BF", site.focal_plane)].astype(np.float32) / flat
        rows.append({"well": well, "site": 1, **brightfield_statistics(plane)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def training_domain():
    """A domain described from flat and dense cells (as the demo's training plates), calibrated on
    other wells of the same kind."""
    train = pd.concat([generated_statistics("flat", wells=40, seed=1),
                       generated_statistics("dense", wells=40, seed=2)])
    validation = pd.concat([generated_statistics("flat", wells=12, seed=3),
                            generated_statistics("dense", wells=12, seed=4)])
    return describe_domain(train, validation)


@pytest.mark.parametrize("cell_type", ["flat", "dense"])
def test_domain_keeps_new_sites_of_the_training_kind_inside(training_domain, cell_type):
    same = domain_scores(generated_statistics(cell_type, wells=24, seed=9), training_domain)
    assert same["domain_outside"].mean() <= 0.10, same  # the report's default plate rule
    assert (same["domain_reason"] == "").sum() == (~same["domain_outside"]).sum()


@pytest.mark.parametrize("cell_type", ["flat", "dense"])
def test_domain_flags_a_brightfield_contrast_shift(training_domain, cell_type):
    shifted = domain_scores(generated_statistics(cell_type, bf_contrast=2.5, wells=24, seed=9),
                            training_domain)
    assert shifted["domain_outside"].mean() >= 0.75, shifted
    reasons = shifted.loc[shifted["domain_outside"], "domain_reason"]
    assert reasons.str.contains("above the training sites'").all(), reasons


def test_domain_threshold_is_the_validation_quantile_with_a_floor():
    rng = np.random.default_rng(0)
    train = pd.DataFrame({name: rng.normal(1.0, 0.1, 400) for name in DOMAIN_STATISTICS})
    validation = pd.DataFrame({name: rng.normal(1.0, 0.1, 200) for name in DOMAIN_STATISTICS})
    wide = validation.assign(bf_cv=rng.normal(1.0, 0.5, 200))
    loose = describe_domain(train, wide, quantile=0.9, floor=0.0)
    scores = domain_scores(wide, loose)["domain_score"]
    assert loose["threshold"] == pytest.approx(np.quantile(scores, 0.9, method="higher"))
    assert loose["threshold"] in set(scores)  # an observed held-out score
    assert (scores > loose["threshold"]).mean() == pytest.approx(0.1, abs=0.01)
    tight = describe_domain(train, validation, quantile=0.5, floor=3.0)
    assert tight["threshold"] == 3.0  # the median held-out score is well below 3 robust SD
    median = train["bf_cv"].median()
    assert tight["statistics"]["bf_cv"]["median"] == pytest.approx(median)
    assert tight["statistics"]["bf_cv"]["spread"] == pytest.approx(
        1.4826 * np.median(np.abs(train["bf_cv"] - median)))


def test_a_blank_plane_is_outside_with_its_reason(training_domain):
    values = pd.DataFrame([brightfield_statistics(np.zeros((64, 64), np.float32))])
    scored = domain_scores(values, training_domain)
    assert bool(scored["domain_outside"].iloc[0])
    assert "not computable" in scored["domain_reason"].iloc[0]


def test_augmentations_are_undone_exactly():
    image = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    seen = set()
    for index in range(len(AUGMENTATIONS)):
        moved = augment(image, index)
        seen.add(moved.tobytes() + bytes(moved.shape))
        np.testing.assert_array_equal(undo_augment(moved, index), image)
    assert len(seen) == len(AUGMENTATIONS)  # eight distinct views


def test_augmented_prediction_mean_and_spread():
    image = np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32)
    # an equivariant model has no spread; a model that adds a ramp along x does
    mean, spread = predict_augmented(lambda x: 2 * x, image, 8)
    np.testing.assert_allclose(mean, 2 * image, atol=1e-5)
    assert spread.max() < 1e-5
    ramp = np.linspace(-1, 1, 16, dtype=np.float32)[None, None, :]
    mean, spread = predict_augmented(lambda x: x + ramp, image, 2)  # identity and a flip along x
    np.testing.assert_allclose(mean, image, atol=1e-5)
    np.testing.assert_allclose(spread, np.abs(np.broadcast_to(ramp, image.shape)), atol=1e-5)
    assert site_uncertainty(mean[0], spread[0]) == pytest.approx(
        np.sqrt(np.mean(ramp ** 2)) / image.std(), rel=1e-4)
    with pytest.raises(ValueError, match="1..8"):
        predict_augmented(lambda x: x, image, 9)


def test_uncertainty_is_attached_per_site_and_channel_and_ranked_against_error():
    rng = np.random.default_rng(1)
    n = 40
    noise = rng.uniform(0.05, 0.5, n)
    sites = pd.DataFrame({"well": [f"A{i:02d}" for i in range(n)], "site": 1, "status": "ok",
                          "uncertainty_DNA": noise, "uncertainty_CYTO": rng.uniform(0, 1, n)})
    metrics = pd.DataFrame({"plate": "P", "well": np.repeat(sites["well"], 2), "site": 1,
                            "split": "validation", "channel": ["DNA", "CYTO"] * n,
                            "pcc": np.ravel(np.column_stack([1 - noise, rng.uniform(0.5, 1, n)]))})
    attached = attach_uncertainty(metrics, sites)
    assert len(attached) == len(metrics)
    dna = attached[attached["channel"] == "DNA"]
    np.testing.assert_allclose(dna["uncertainty"], noise)
    table = uncertainty_error_correlation(attached).set_index("channel")
    assert table.loc["DNA", "spearman"] == pytest.approx(1.0)
    assert abs(table.loc["CYTO", "spearman"]) < 0.5
    assert table.loc["all", "sites"] == n


# ---------------------------------------------------------------------------------------------
# On the demo screen (the workflow's own outputs)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run / "results"


def demo_sheet(demo: Path) -> pd.DataFrame:
    return pd.read_csv(demo / "demo" / "screen" / "plates.tsv", sep="\t")


def test_every_demo_plate_lies_inside_the_stain_models_domain(demo):
    card = json.loads((demo / "models" / "stain" / "all" / "card.json").read_text())
    domain = card["domain"]
    assert domain["n_validation"] == card["n_sites"]["validation"] and domain["threshold"] >= domain["floor"]
    for plate in demo_sheet(demo)["plate"]:
        sites = pd.read_csv(demo / "plates" / plate / "stain" / "sites.csv", keep_default_na=False)
        ok = sites[sites["status"] == "ok"]
        # the stored scores are those of the stored statistics against the card
        rescored = domain_scores(ok[list(DOMAIN_STATISTICS)].astype(float), domain)
        np.testing.assert_allclose(ok["domain_score"].astype(float), rescored["domain_score"], rtol=1e-6)
        outside = ok["domain_outside"].astype(str).eq("True")
        assert outside.mean() <= 0.10, (plate, ok.loc[outside, ["well", "site", "domain_reason"]])
        summary = json.loads((demo / "plates" / plate / "report.json").read_text())
        check = next(c for c in summary["checks"] if "stain model's domain" in c["rule"])
        assert not check["triggered"] and check["value"] == pytest.approx(outside.mean(), abs=1e-4)


def test_uncertainty_ranks_held_out_sites_by_their_error(demo):
    """Spearman's rho between the test-time-augmentation uncertainty and the error (1 - PCC with the
    real stain) of the sites in held-out wells, over every demo plate with real stains; each
    plate's stored table is the one its stored metrics give."""
    sheet = demo_sheet(demo)
    metrics = []
    for plate in sheet[sheet["role"] != "apply"]["plate"]:
        folder = demo / "plates" / plate / "stain"
        table = pd.read_parquet(folder / "metrics.parquet")
        assert table["uncertainty"].notna().all() and (table["uncertainty"] > 0).all()
        stored = pd.read_csv(folder / "uncertainty.csv")
        pd.testing.assert_frame_equal(stored, uncertainty_error_correlation(table), check_dtype=False)
        metrics.append(table)
    held_out = pd.concat(metrics)
    held_out = held_out[held_out["split"] != "train"]
    rho = uncertainty_error_correlation(held_out).set_index(["split", "channel"])["spearman"]
    print("uncertainty vs error, held-out demo wells:\n", rho.to_string())
    assert rho.loc[("validation", "all")] > 0.3


def test_a_plate_with_shifted_brightfield_contrast_is_flagged_end_to_end(demo, tmp_path, run_snakemake):
    """Two new plates of a cell type the model saw, one imaged with 2.5x the brightfield contrast,
    through ingest, illumination, focus and virtual staining with the demo's model as the user's
    weights: the shifted plate's sites are flagged and its report goes to review, the other's not."""
    spec = ScreenSpec(plates=(PlateSpec("IN", "B9", "dense", "apply"),
                              PlateSpec("OUT", "B9", "dense", "apply", bf_contrast=2.5)),
                      wells=6, sites=2, seed=11)
    simulate_screen(tmp_path / "screen", spec)
    weights = demo / "models" / "stain" / "all" / "model.safetensors"
    config = tmp_path / "config.yaml"
    # the generator's camera offset, as the demo config gives it
    config.write_text(yaml.safe_dump({"screen": "screen/plates.tsv", "channels": CHANNELS,
                                      "illumination": {"dark": 100}, "stain": {"weights": str(weights)}}))
    targets = [f"results/plates/{p}/stain/sites.csv" for p in ("IN", "OUT")]
    result = run_snakemake(tmp_path, *targets, "--cores", "2", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    card = [weights.with_name("card.json")]
    for plate, shifted in (("IN", False), ("OUT", True)):
        folder = tmp_path / "results" / "plates" / plate
        sites = pd.read_csv(folder / "stain" / "sites.csv", keep_default_na=False)
        outside = sites["domain_outside"].astype(str).eq("True")
        if shifted:
            assert outside.mean() >= 0.75, sites[["well", "site", "domain_score"]]
            assert sites.loc[outside, "domain_reason"].str.contains("above the training sites'").all()
        else:
            assert outside.mean() <= 0.10, sites.loc[outside, ["well", "site", "domain_reason"]]
        report = R.plate_report(PlateFolder(folder).results_on_disk(), {"plate": plate}, {}, stain_cards=card)
        check = next(c for c in report["checks"] if "stain model's domain" in c["rule"])
        assert check["triggered"] == shifted
        assert (report["verdict"] == "review") == shifted
        flagged = report["flags"][report["flags"]["stage"] == "stain"]
        assert len(flagged) == outside.sum()
