"""Audit report (brightpaint.report) on a small plate folder written here with known flags and
tables: every flag collected, the verdict's rules, numbers in the HTML equal to the tables, figures
embedded and downsampled, provenance read from the environments."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from brightpaint import report as R
from brightpaint.layout import PlateFolder, PlateResults
from brightpaint.provenance import environment_versions, sha256_file


class Tables(HTMLParser):
    """Tables with data-table=NAME as lists of rows (header first), images' src, data-* values."""

    def __init__(self, html: str):
        super().__init__()
        self.tables, self.images, self.data = {}, [], {}
        self._table, self._row, self._cell, self._data_key = None, None, None, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "data-table" in attrs:
            self._table = attrs["data-table"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("data-verdict", "data-count", "data-provenance", "data-info", "data-virtual-stains"):
            if key in attrs:
                self._data_key = (key, attrs[key])
                self.data[self._data_key] = attrs[key] if key == "data-verdict" else ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._data_key and self._data_key[0] != "data-verdict":
            self.data[self._data_key] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "span" or tag == "code":
            self._data_key = None


def frame(rows: list[list[str]]) -> pd.DataFrame:
    return pd.DataFrame(rows[1:], columns=rows[0])


def results(plate: Path) -> PlateResults:
    """The files of the fixture plate the report reads: those written (it has no layout; its only
    illumination figure is DNA's)."""
    return PlateFolder(plate).results(["BF", "DNA", "CYTO"]).existing()


@pytest.fixture
def plate(tmp_path):
    """A plate folder of 20 sites: site A01/1 left out at ingest, A02/1 blur-flagged, A03/1 skipped
    by segmentation and features, A04/2 without objects; matching and figures present."""
    folder = tmp_path / "plates" / "P9"
    wells = [f"A{i:02d}" for i in range(1, 11)]
    sites = pd.DataFrame([(w, s) for w in wells for s in (1, 2)], columns=["well", "site"])
    (folder / "ingest").mkdir(parents=True)
    ingest = sites.assign(n_images=8, status="ok", reasons="")
    ingest.loc[0, ["status", "reasons"]] = ["excluded", "well A01, site 1, channel DNA: missing"]
    ingest.to_csv(folder / "ingest" / "qc_sites.csv", index=False)
    pd.DataFrame({"well": ["A01"] * 4, "site": 1, "channel": ["BF", "DNA", "CYTO", "CYTO"], "z": 0,
                  "flag": ["", "", "saturated", ""]}).to_parquet(folder / "ingest" / "qc_images.parquet")
    focus = sites.assign(plane=2, flag="", reason="")
    focus.loc[2, ["flag", "reason"]] = ["out_of_focus", "no plane is sharp"]
    focus.to_parquet(folder / "focus.parquet")
    for stage, count in (("segment", "objects"), ("features", "cells")):
        (folder / stage).mkdir()
        table = pd.concat([sites.assign(source="real"), sites.assign(source="virtual")], ignore_index=True)
        table = table.assign(status="ok", reason="", **{count: 9})
        table.loc[(table.well == "A03") & (table.site == 1), ["status", "reason", count]] = [
            "skipped", "site A03/1 has no focus plane", 0]
        if stage == "features":
            table.loc[(table.well == "A04") & (table.site == 2), ["status", "reason", count]] = [
                "no_objects", "label images hold no objects", 0]
        table.to_csv(folder / stage / "sites.csv", index=False)
    (folder / "match").mkdir()
    pd.DataFrame({"source": ["real", "virtual"], "metric": "cosine", "nsc_accuracy": [0.9375, 0.6875],
                  "map_replicate": [0.84123, 0.5]}).to_parquet(folder / "match" / "summary.parquet")
    pd.DataFrame({"feature": ["Cells_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA", "Cells_X_Y"],
                  "compartment": ["Cells", "Nuclei", "Cells"], "group": ["AreaShape", "Intensity", "X"],
                  "pearson": [0.5, 0.25, np.nan], "n_wells": 10}).to_parquet(
        folder / "match" / "agreement.parquet")
    (folder / "illum").mkdir()
    Image.fromarray((np.random.default_rng(0).random((3000, 1500)) * 255).astype(np.uint8)).save(
        folder / "illum" / "DNA.png")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(folder / "focus.png")
    bench = tmp_path / "benchmarks" / "P9"
    bench.mkdir(parents=True)
    (bench / "focus_plate.tsv").write_text("s\th:m:s\tmax_rss\tmax_vms\tcpu_time\n"
                                           "12.5\t0:00:12\t321.5\t900\t11.0\n")
    return folder


def test_every_flag_is_collected_with_stage_site_and_reason(plate):
    flags = R.collect_flags(results(plate))
    got = set(map(tuple, flags[["stage", "well", "site", "source", "flag"]].astype(str).values))
    both = [(stage, "A03", "1", source, "skipped") for stage in ("segment", "features")
            for source in ("real", "virtual")]
    both += [("features", "A04", "2", source, "no_objects") for source in ("real", "virtual")]
    assert got == {("ingest", "A01", "1", "", "excluded"), ("focus", "A02", "1", "", "out_of_focus"),
                   *both}
    assert (flags["reason"] != "").all()


@pytest.mark.parametrize("rules, verdict", [
    ({}, "review"),  # 4 of 20 sites flagged (0.2 > 0.1); 2 lost (0.1, not above 0.1)
    ({"review_flagged_fraction": 0.25}, "pass"),
    ({"fail_lost_fraction": 0.05}, "fail"),
])
def test_verdict_follows_its_rules(plate, rules, verdict):
    got, checks = R.plate_verdict(R.collect_flags(results(plate)), 20, rules)
    assert got == verdict
    assert [c["value"] for c in checks] == [0.1, 0.2]


def test_report_html_shows_the_tables_numbers_and_embeds_downsampled_figures(plate, tmp_path):
    config = {"screen": "x.tsv", "report": {"review_flagged_fraction": 0.1}}
    sheet = tmp_path / "plates.tsv"
    sheet.write_text("plate\tmanifest\n")
    prov = R.provenance(config, tmp_path, {"input: screen sheet": sheet, "absent": tmp_path / "nope"},
                        tmp_path / "benchmarks" / "P9", None)
    info = {"plate": "P9", "batch": "B1", "cell_type": "flat", "role": "train"}
    report = R.plate_report(results(plate), info, prov)
    html = R.render_plate_report(report)
    page = Tables(html)
    assert page.data[("data-verdict", "review")] == "review"
    assert page.data[("data-count", "sites")] == "20" and page.data[("data-count", "wells")] == "10"
    assert page.data[("data-count", "flags")] == str(len(R.collect_flags(results(plate))))
    shown = frame(page.tables["flags"])
    flags = R.collect_flags(results(plate))
    assert shown[["stage", "well", "site", "flag"]].values.tolist() == flags[
        ["stage", "well", "site", "flag"]].astype(str).values.tolist()
    summary = frame(page.tables["match_summary"])
    assert summary["nsc_accuracy"].astype(float).tolist() == [0.9375, 0.6875]
    assert np.allclose(summary["map_replicate"].astype(float), [0.8412, 0.5])  # 4 significant digits
    level3 = frame(page.tables["level3_cpcor"]).set_index(["compartment", "group"])
    assert level3.loc[("all", "all"), "median_pearson"] == "0.375"
    assert level3.loc[("Cells", "all"), ["n_features", "n_undefined"]].tolist() == ["2", "1"]
    channels = frame(page.tables["images_per_channel"])
    assert channels.set_index("channel")["flagged"].to_dict() == {"BF": "0", "CYTO": "1", "DNA": "0"}
    bench = frame(page.tables["benchmarks"])
    assert bench.iloc[0].tolist() == ["focus_plate", "12.5", "321.5", "11"]
    # provenance: real versions of this environment, the config's hash, file checksums
    versions = dict(page.tables["main_environment"][1:])
    assert versions["pandas"] == pd.__version__ and versions["numpy"] == np.__version__
    assert page.data[("data-provenance", "config_sha256")] == prov["config_sha256"]
    assert yaml.safe_load(prov["config_yaml"]) == config
    files = frame(page.tables["files"])
    assert files["what"].tolist() == ["input: screen sheet"]
    assert files["sha256"].tolist() == [sha256_file(sheet)]
    # figures: embedded PNGs (no external reference), the large one downsampled
    # illumination, focus and the cells-per-well maps of both stain sources
    assert len(page.images) == 4 and all(src.startswith("data:image/png;base64,") for src in page.images)
    sizes = [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size for src in page.images]
    assert (R.FIGURE_MAX_PX // 2, R.FIGURE_MAX_PX) in sizes and (60, 40) in sizes
    assert not re.search(r'(src|href)="(?!data:)', html)


def test_index_links_each_plate_with_its_verdict(plate, tmp_path):
    prov = R.provenance({}, tmp_path, {}, tmp_path / "benchmarks" / "P9", None)
    summary = R.report_summary(R.plate_report(results(plate), {"plate": "P9", "batch": "B1"}, prov))
    html = R.render_index([{**summary, "href": "plates/P9/report.html"}],
                          {"screen matching": pd.DataFrame({"nsc": [0.75]})})
    page = Tables(html)
    rows = frame(page.tables["plates"])
    assert rows.iloc[0][["plate", "verdict", "sites", "QC flags"]].tolist() == ["P9", "review", "20", "8"]
    assert 'href="plates/P9/report.html"' in html
    assert frame(page.tables["screen matching"])["nsc"].tolist() == ["0.75"]


def test_versions_of_another_environment_are_read_from_its_metadata(tmp_path):
    for name, version in (("cellprofiler_nightly", "5.0.0.dev784"), ("numpy", "1.26.4"), ("other", "1")):
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    assert environment_versions(tmp_path, ["cellprofiler-nightly", "numpy"]) == {
        "cellprofiler-nightly": "5.0.0.dev784", "numpy": "1.26.4"}


DOMAIN_CARD = {"domain": {"threshold": 3.0, "statistics": {
    "bf_cv": {"label": "brightfield contrast (std / mean)", "median": 0.04, "spread": 0.01},
    "bf_plls": {"label": "power-spectrum slope", "median": -1.8, "spread": 0.25}}}}


def stain_sites(plate: Path, outside: list[str]) -> pd.DataFrame:
    """stain/sites.csv of the fixture plate: site 1 of the wells in `outside` has twice the
    training contrast; A01/1 (left out at ingest) has no row, A02/2 was skipped."""
    sites = pd.read_csv(plate / "ingest" / "qc_sites.csv")[["well", "site"]].iloc[1:]
    table = sites.assign(status="ok", reason="", seconds=0.1, bf_cv=0.04, bf_plls=-1.8, domain_score=0.0,
                         domain_outside=False, domain_reason="").reset_index(drop=True)
    far = table["well"].isin(outside) & (table["site"] == 1)
    table.loc[far, ["bf_cv", "domain_score", "domain_outside"]] = [0.08, 4.0, True]
    table.loc[far, "domain_reason"] = "brightfield contrast (std / mean) 4.0 robust SD above"
    skipped = (table["well"] == "A02") & (table["site"] == 2)
    table.loc[skipped, ["status", "reason", "bf_cv", "bf_plls", "domain_score", "domain_outside"]] = [
        "skipped", "no in-focus plane", np.nan, np.nan, np.nan, False]
    (plate / "stain").mkdir(exist_ok=True)
    table.to_csv(plate / "stain" / "sites.csv", index=False)
    return table


@pytest.mark.parametrize("outside, triggered", [(["A05", "A06", "A07"], True), (["A05"], False)])
def test_sites_outside_the_stain_domain_are_flagged_and_can_set_the_plate_to_review(
        plate, tmp_path, outside, triggered):
    stain_sites(plate, outside)
    flags = R.collect_flags(results(plate))
    domain_flags = flags[flags["stage"] == "stain"]
    assert sorted(domain_flags["well"]) == outside and (domain_flags["flag"] == "outside_domain").all()
    assert domain_flags["reason"].str.contains("robust SD above").all()
    card = tmp_path / "card.json"
    card.write_text(json.dumps(DOMAIN_CARD))
    report = R.plate_report(results(plate), {"plate": "P9"}, {}, {"review_flagged_fraction": 1.0},
                            stain_cards=[card])
    check = next(c for c in report["checks"] if "stain model's domain" in c["rule"])
    # 18 scored sites (A01/1 not ingested, A02/2 skipped)
    assert check["value"] == pytest.approx(len(outside) / 18, abs=1e-4) and check["triggered"] == triggered
    assert report["verdict"] == ("review" if triggered else "pass")
    section = next(s for s in report["sections"] if s["title"] == "Virtual staining")
    table = section["tables"]["brightfield_domain"].set_index("statistic")
    expected_cv = float(np.median([0.08] * len(outside) + [0.04] * (18 - len(outside))))
    assert table.loc["brightfield contrast (std / mean)", "plate median"] == pytest.approx(expected_cv)
    assert table.loc["brightfield contrast (std / mean)", "z"] == pytest.approx((expected_cv - 0.04) / 0.01)


def _evidence_tables(virtual_nsc: float):
    stain = pd.DataFrame({"split": ["train", "validation", "validation", "validation"],
                          "channel": ["DNA", "DNA", "DNA", "CYTO"], "pcc": [0.99, 0.95, 0.91, 0.5],
                          "ssim": 0.8, "psnr": 30.0, "nmae": 0.1})
    segment = pd.DataFrame({"objects": ["nuclei"] * 3 + ["cells"],
                            "comparison": ["real_vs_truth", "virtual_vs_real", "virtual_vs_real",
                                           "virtual_vs_real"],
                            "ap50": [0.95, 0.9, 0.88, 0.1], "f1_70": 0.8})
    summary = pd.DataFrame({"metric": ["moa_nsc_accuracy_cosine"] * 2 + ["replicate_mAP"] * 2
                            + ["feature_agreement_median_pearson", "moa_nsc_accuracy_cosine",
                               "replicate_mAP"],
                            "source": ["real", "virtual"] * 2 + ["real vs virtual"] + [R.SHAPE_ONLY] * 2,
                            "value": [0.8, virtual_nsc, 0.5, 0.45, 0.6, 0.5, 0.4]})
    return stain, segment, summary


@pytest.mark.parametrize("virtual_nsc, verdict", [(0.75, "fit for profiling"), (0.7, "not fit")])
def test_virtual_stain_evidence_holds_each_level_against_its_floor(virtual_nsc, verdict):
    stain, segment, summary = _evidence_tables(virtual_nsc)
    table, found = R.virtual_stain_evidence(stain, segment, summary, "DNA")
    rows = table.set_index("measure")
    # pixels: held-out sites only (the training site's 0.99 is not evidence); CYTO shown, not judged
    assert rows.loc["DNA PCC, held-out sites", "compared"] == pytest.approx(0.93)
    assert rows.loc["DNA PCC, held-out sites", "fit"] == "yes"
    assert rows.loc["CYTO PCC, held-out sites", "fit"] == ""
    nuclei = table[table["level"] == "nuclei"].iloc[0]
    assert nuclei["compared"] == pytest.approx(0.89 / 0.95) and nuclei["fit"] == "yes"  # cells ignored
    nsc = rows.loc["MoA NSC 1-NN accuracy"]
    assert nsc["compared"] == pytest.approx(virtual_nsc / 0.8)  # 0.9375 meets 0.9, 0.875 does not
    assert rows.loc["replicate mAP", "compared"] == pytest.approx(0.9)
    assert rows.loc["replicate mAP", "fit"] == "yes"
    shape = table[table["measure"].str.contains("shape features only")].set_index("measure")
    nsc_shape = shape.loc[shape.index.str.startswith("MoA NSC")].iloc[0]
    assert nsc_shape["real"] == 0.5 and nsc_shape["virtual"] == virtual_nsc and nsc_shape["fit"] == ""
    map_shape = shape.loc[shape.index.str.startswith("replicate mAP")].iloc[0]
    assert map_shape["real"] == 0.4 and map_shape["virtual"] == 0.45
    assert map_shape["compared"] == pytest.approx(0.45 / 0.4) and map_shape["fit"] == ""
    assert found == verdict
    # stricter floors from the config's report.virtual_fit
    _, strict = R.virtual_stain_evidence(stain, segment, summary, "DNA", {"nuclei_pcc": 0.95})
    assert strict == "not fit"


def test_virtual_stain_evidence_without_real_stains_is_not_measured():
    _, _, summary = _evidence_tables(0.75)
    virtual_only = summary[summary["source"] == "virtual"]
    table, verdict = R.virtual_stain_evidence(None, None, virtual_only, "DNA")
    assert verdict == "not measured"
    judged = table[table["floor"].notna()]
    assert len(judged) == 4 and (judged["fit"] == "not measured").all()
    # without truth masks the nuclei floor is against perfect agreement
    _, segment, _ = _evidence_tables(0.75)
    table, _ = R.virtual_stain_evidence(None, segment[segment["comparison"] != "real_vs_truth"], None, "DNA")
    assert table[table["level"] == "nuclei"].iloc[0]["compared"] == pytest.approx(0.89)


def test_report_shows_the_virtual_stain_evidence_and_its_verdict(plate, tmp_path):
    stain, segment, summary = _evidence_tables(0.7)
    (plate / "stain").mkdir()
    stain.to_parquet(plate / "stain" / "metrics.parquet")
    segment.to_parquet(plate / "segment" / "metrics.parquet")
    summary.assign(n=1, details="").to_parquet(plate / "match" / "summary.parquet")
    prov = R.provenance({}, tmp_path, {}, tmp_path / "benchmarks" / "P9", None)
    report = R.plate_report(results(plate), {"plate": "P9"}, prov, nuclei="DNA")
    page = Tables(R.render_plate_report(report))
    evidence = frame(page.tables["virtual_vs_real"]).set_index("measure")
    assert evidence.loc["MoA NSC 1-NN accuracy", "fit"] == "no"
    assert page.data[("data-virtual-stains", "not fit")] == "not fit"
    summary_json = R.report_summary(report)
    assert summary_json["virtual_stains"] == "not fit"
    index = Tables(R.render_index([{**summary_json, "href": "plates/P9/report.html"}]))
    assert frame(index.tables["plates"]).iloc[0]["virtual stains"] == "not fit"
