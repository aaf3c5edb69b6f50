"""The per-plate audit report and the screen index (self-contained HTML: figures embedded, opens
offline).

Everything shown is read from the plate's result files; no number is typed by hand. Which files,
the caller says (`brightpaint.layout.PlateResults`: the report rule's named inputs, or a finished
folder's files): nothing here looks for files in a folder. The pieces:

* `collect_flags` gathers every QC flag of a plate, one row per (stage, well, site, source): ingest
  (sites left out or flagged), focus (blur QC), segmentation (sites skipped) and features (sites
  skipped or without objects).
* `plate_verdict` turns the flags into pass / review / fail with the rules that decided it
  (thresholds from config `report`).
* `provenance` lists the workflow's git commit, the package versions of both environments, the
  config and its hash, the sha256 of models and pipelines, per-rule run times and peak memory (from
  `benchmark:` files) and the host.
* `plate_report` collects the sections that exist for a plate; `render_plate_report` and
  `render_index` write HTML with jinja2 (templates in `templates/`). Figures are PNGs downsampled
  to at most `FIGURE_MAX_PX` on their long side and embedded as base64.

Tables carry `data-table="<name>"` so that tests (and scripts) can find them in the HTML.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import yaml
import zarr

from .defaults import config_default
from .illumination import camera_offset_estimate
from .ingest import stored_sites
from .layout import PlateFolder, PlateResults, PlateSources
from .match import SHAPE_ONLY, agreement_summary
from .plate import fluorescence_plane, open_plate_source
from .provenance import (
    CELLPROFILER_PACKAGES,
    environment_versions,
    git_commit,
    sha256_file,
)

TEMPLATES = Path(__file__).with_name("templates")
FIGURE_MAX_PX = 1200
FLAG_COLUMNS = ["stage", "well", "site", "source", "flag", "reason"]
DEFAULT_RULES = {"review_flagged_fraction": 0.10, "fail_lost_fraction": 0.10, "domain_fraction": 0.10}
EVIDENCE_COLUMNS = ["level", "measure", "real", "virtual", "compared", "floor", "fit"]
# paths relative to a plate folder, as the captions name them
RELATIVE = PlateFolder("")


def _read_csv(path: str | None) -> pd.DataFrame | None:
    return pd.read_csv(path, keep_default_na=False) if path else None


def _flag_rows(table: pd.DataFrame, stage: str, flag: pd.Series, reason: pd.Series) -> pd.DataFrame:
    source = table["source"].astype(str) if "source" in table.columns else pd.Series("", index=table.index)
    return pd.DataFrame({"stage": stage, "well": table["well"].astype(str),
                         "site": table["site"].astype(int), "source": source,
                         "flag": flag.astype(str), "reason": reason.astype(str)})


def collect_flags(files: PlateResults) -> pd.DataFrame:
    """Every QC flag of a plate, from the result files it has: ingest's site table (status other
    than ok), focus (non-empty flag), virtual staining (sites outside the stain model's domain),
    segmentation and features (status skipped / no_objects)."""
    parts = []
    sites = _read_csv(files.qc_sites)
    if sites is not None:
        bad = sites[sites["status"].astype(str) != "ok"]
        parts.append(_flag_rows(bad, "ingest", bad["status"], bad.get("reasons", bad["status"])))
    if files.focus:
        focus = pd.read_parquet(files.focus, columns=["well", "site", "flag", "reason"])
        bad = focus[focus["flag"].fillna("").astype(str) != ""]
        parts.append(_flag_rows(bad, "focus", bad["flag"], bad["reason"].fillna("")))
    stain = _read_csv(files.stain_sites)
    if stain is not None and "domain_outside" in stain.columns:
        bad = stain[stain["domain_outside"].astype(str) == "True"]
        parts.append(_flag_rows(bad, "stain", pd.Series("outside_domain", index=bad.index),
                                bad["domain_reason"]))
    for stage, path in (("segment", files.segment_sites), ("features", files.features_sites)):
        table = _read_csv(path)
        if table is not None:
            bad = table[table["status"].isin(["skipped", "no_objects"])]
            parts.append(_flag_rows(bad, stage, bad["status"], bad["reason"]))
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=FLAG_COLUMNS)
    return pd.concat(parts, ignore_index=True).sort_values(["stage", "well", "site", "source"],
                                                          kind="stable").reset_index(drop=True)


def _distinct_sites(flags: pd.DataFrame) -> int:
    return len(flags[["well", "site"]].astype(str).drop_duplicates()) if len(flags) else 0


def plate_verdict(flags: pd.DataFrame, n_sites: int, rules: Mapping | None = None
                  ) -> tuple[str, list[dict]]:
    """pass / review / fail and the rules checked, each with its measured value, threshold and
    outcome. `lost`: sites without any measurement (left out at ingest, or skipped by the
    features); `flagged`: sites with any QC flag. fail if lost > fail_lost_fraction, review if
    flagged > review_flagged_fraction."""
    rules = {**DEFAULT_RULES, **(rules or {})}
    n = max(int(n_sites), 1)
    flagged = _distinct_sites(flags) / n
    lost_rows = flags[((flags["stage"] == "ingest") & (flags["flag"] == "excluded"))
                      | ((flags["stage"] == "features") & (flags["flag"] == "skipped"))]
    lost = _distinct_sites(lost_rows) / n
    checks = [
        {"rule": "sites without any measurement (ingest excluded, features skipped)",
         "value": round(lost, 4), "threshold": rules["fail_lost_fraction"], "outcome": "fail",
         "triggered": bool(lost > rules["fail_lost_fraction"])},
        {"rule": "sites with any QC flag", "value": round(flagged, 4),
         "threshold": rules["review_flagged_fraction"], "outcome": "review",
         "triggered": bool(flagged > rules["review_flagged_fraction"])},
    ]
    verdict = "pass"
    if any(c["triggered"] and c["outcome"] == "review" for c in checks):
        verdict = "review"
    if any(c["triggered"] and c["outcome"] == "fail" for c in checks):
        verdict = "fail"
    return verdict, checks


def _summary_value(summary: pd.DataFrame, metric: str, source: str) -> float:
    if not {"metric", "source", "value"} <= set(summary.columns):
        return float("nan")
    rows = summary[(summary["metric"] == metric) & (summary["source"] == source)]["value"]
    return float(rows.iloc[0]) if len(rows) and pd.notna(rows.iloc[0]) else float("nan")


def virtual_stain_evidence(stain_metrics: pd.DataFrame | None, segment_metrics: pd.DataFrame | None,
                           match_summary: pd.DataFrame | None, nuclei: str,
                           floors: Mapping | None = None) -> tuple[pd.DataFrame, str]:
    """A plate's virtual stains against its real ones at the three levels, side by side, and the
    verdict "fit for profiling" from them. Returns (table, verdict): one row per measure with
    EVIDENCE_COLUMNS (`compared` is the figure held against `floor`; `fit` yes / no, `not measured`
    where the plate lacks what it needs, empty for measures shown without a floor) and the verdict
    `fit for profiling` (every measured floor met), `not fit` (any missed) or `not measured`
    (none could be measured: a plate without real stains, or without held-out sites).

    Floors (`floors` over config/config.yaml's report.virtual_fit): pixels, the PCC of the virtual
    `nuclei` stain on held-out sites (every split but `train`) >= nuclei_pcc; nuclei, AP@0.5 of
    virtual-stain nuclei against real-stain nuclei >= nuclei_ap_ratio x that of real-stain nuclei
    against truth masks (x 1 without truth masks); profiles, the MoA NSC 1-NN accuracy (cosine) and
    the replicate mAP from virtual stains >= nsc_ratio and replicate_map_ratio x those from real
    stains. A table without the columns it needs counts as not measured. Shown without a floor: the
    other stains' PCC, percent replicating, the level-3 agreement, and the real profiles' NSC and
    replicate mAP from shape features alone (`brightpaint.match.shape_only_matching`) beside the
    virtual ones."""
    floors = {**config_default("report", "virtual_fit"), **(floors or {})}
    nan = float("nan")
    rows = []

    def add(level, measure, real, virtual, compared, floor):
        if floor is None:
            fit = ""
        elif not np.isfinite(compared):
            fit = "not measured"
        else:
            fit = "yes" if compared >= floor else "no"
        rows.append(dict(zip(EVIDENCE_COLUMNS, [level, measure, real, virtual, compared,
                                                nan if floor is None else floor, fit], strict=True)))

    if stain_metrics is not None and not {"channel", "split", "pcc"} <= set(stain_metrics.columns):
        stain_metrics = None
    if segment_metrics is not None and not {"objects", "comparison", "ap50"} <= set(segment_metrics.columns):
        segment_metrics = None
    for channel in ([] if stain_metrics is None else sorted(set(stain_metrics["channel"]))):
        held_out = stain_metrics[(stain_metrics["channel"] == channel) & (stain_metrics["split"] != "train")]
        pcc = float(held_out["pcc"].mean()) if len(held_out) else nan
        add("pixels", f"{channel} PCC, held-out sites", nan, pcc, pcc,
            floors["nuclei_pcc"] if channel == nuclei else None)
    if stain_metrics is None or nuclei not in set(stain_metrics["channel"]):
        add("pixels", f"{nuclei} PCC, held-out sites", nan, nan, nan, floors["nuclei_pcc"])
    ap = {}
    if segment_metrics is not None and len(segment_metrics):
        nuclei_rows = segment_metrics[segment_metrics["objects"] == "nuclei"]
        ap = nuclei_rows.groupby("comparison")["ap50"].mean().to_dict()
    real_ap = float(ap.get("real_vs_truth", 1.0)) if "virtual_vs_real" in ap else nan
    virtual_ap = float(ap.get("virtual_vs_real", nan))
    add("nuclei", "AP@0.5 (virtual: against real-stain nuclei; real: against truth, 1 without)",
        real_ap, virtual_ap, virtual_ap / real_ap if real_ap > 0 else nan, floors["nuclei_ap_ratio"])
    summary = (match_summary if match_summary is not None
               else pd.DataFrame(columns=["metric", "source", "value"]))
    for metric, measure, floor in (
            ("moa_nsc_accuracy_cosine", "MoA NSC 1-NN accuracy", floors["nsc_ratio"]),
            ("replicate_mAP", "replicate mAP", floors["replicate_map_ratio"]),
            ("percent_replicating", "percent replicating", None)):
        real, virtual = _summary_value(summary, metric, "real"), _summary_value(summary, metric, "virtual")
        add("profiles", measure, real, virtual, virtual / real if real > 0 else nan, floor)
    # the real stains' shape features alone: about what brightfield can carry, so a virtual NSC near
    # it and far below the real one points at the stains' physics, not the model
    for metric, measure in (("moa_nsc_accuracy_cosine", "MoA NSC 1-NN accuracy"),
                            ("replicate_mAP", "replicate mAP")):
        shape = _summary_value(summary, metric, SHAPE_ONLY)
        virtual = _summary_value(summary, metric, "virtual")
        add("profiles", f"{measure}; real: from shape features only (about what brightfield shows)",
            shape, virtual, virtual / shape if shape > 0 else nan, None)
    for metric, measure in (
            ("feature_agreement_median_pearson", "median per-feature Pearson r, real vs virtual"),
            ("top20_feature_nmae", "top-20 MoA features' N-MAE, real vs virtual")):
        value = _summary_value(summary, metric, "real vs virtual")
        add("profiles", measure, nan, nan, value, None)
    table = pd.DataFrame(rows, columns=EVIDENCE_COLUMNS)
    judged = table[table["fit"].isin(["yes", "no"])]
    verdict = ("not measured" if judged.empty else "not fit" if (judged["fit"] == "no").any()
               else "fit for profiling")
    return table, verdict


def domain_table(sites: pd.DataFrame, cards: Iterable[Mapping]) -> pd.DataFrame:
    """Per stain model and domain statistic: the training sites' median and robust spread (from the
    model card), the plate's median, its robust z, and the share of the plate's sites outside
    the model's domain (any statistic beyond the card's threshold)."""
    rows = []
    score = pd.to_numeric(sites["domain_score"], errors="coerce") if "domain_score" in sites else None
    scored = sites[score.notna()] if score is not None else sites.iloc[:0]
    outside = float(scored["domain_outside"].astype(str).eq("True").mean()) if len(scored) else 0.0
    for i, card in enumerate(cards):
        domain = card.get("domain") or {}
        for name, stat in domain.get("statistics", {}).items():
            if name not in scored:
                continue
            median = float(pd.to_numeric(scored[name], errors="coerce").median())
            rows.append({"model": i + 1, "statistic": stat["label"], "training median": stat["median"],
                         "training spread": stat["spread"], "plate median": median,
                         "z": (median - stat["median"]) / stat["spread"], "threshold": domain["threshold"],
                         "sites outside": round(outside, 4)})
    return pd.DataFrame(rows, columns=["model", "statistic", "training median", "training spread",
                                       "plate median", "z", "threshold", "sites outside"])


def well_heatmap(values: pd.Series, title: str, label: str) -> str:
    """A plate map (rows x columns, cropped to the wells present) of one value per well, as a PNG
    data URI; wells without a value are white."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import PLATE_ROWS

    present_rows = [PLATE_ROWS.index(w[0]) for w in values.index]
    present_columns = [int(w[1:]) for w in values.index]
    rows = list(range(min(present_rows), max(present_rows) + 1))
    columns = list(range(min(present_columns), max(present_columns) + 1))
    grid = np.full((len(rows), len(columns)), np.nan)
    for well, value in values.items():
        grid[rows.index(PLATE_ROWS.index(well[0])), columns.index(int(well[1:]))] = value
    fig = Figure(figsize=(min(2.5 + 0.4 * len(columns), 12), min(1.5 + 0.4 * len(rows), 8)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], fontsize=7)
    ax.set_yticks(range(len(rows)), [PLATE_ROWS[r] for r in rows], fontsize=7)
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.02)
    ax.set_title(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def illumination_table(meta: Mapping[str, str]) -> pd.DataFrame:
    """Per channel: how its illumination function was made (method, images used and excluded, dark
    offset), where the data could not support a flat field the identity flat and why, and the
    images' darkest level and share of pixels below the offset (with a check when most are)."""
    rows = []
    for channel, path in sorted(meta.items()):
        recorded = json.loads(Path(path).read_text())
        params = recorded.get("params", {})
        halves = params.get("split_half") or {}
        rows.append({"channel": channel, "method": recorded.get("method", ""),
                     "images": recorded.get("n_images"), "excluded": recorded.get("n_excluded"),
                     "dark": params.get("dark"),
                     "flat": "identity" if params.get("fallback") else "estimated",
                     "split_half_disagreement": halves.get("disagreement"),
                     "split_half_shading": halves.get("shading"), "reason": params.get("fallback", ""),
                     "darkest_level": params.get("darkest_level"),
                     "below_dark_fraction": params.get("below_dark_fraction"),
                     "offset_check": params.get("offset_check", "")})
    return pd.DataFrame(rows)


def camera_offset_table(illumination: pd.DataFrame, brightfield: str | None = None) -> pd.DataFrame:
    """The plate's camera offset: the configured `dark` beside the bound the data give
    (`camera_offset_estimate`: the darkest fluorescence channel's darkest level), with a note where
    no offset is subtracted though every channel stays above one (not where that channel reaches 0,
    as an offset-subtracted export does), or the offset is above most pixels of a channel."""
    if "darkest_level" not in illumination or illumination["darkest_level"].isna().all():
        return pd.DataFrame(columns=["dark", "offset_at_most", "darkest_channel", "note"])
    levels = dict(zip(illumination["channel"], illumination["darkest_level"], strict=True))
    estimate = camera_offset_estimate({c: v for c, v in levels.items() if pd.notna(v)}, brightfield)
    if estimate is None:
        return pd.DataFrame(columns=["dark", "offset_at_most", "darkest_channel", "note"])
    channel, level = estimate
    dark = float(illumination["dark"].fillna(0).max())
    below = illumination.set_index("channel").get("below_dark_fraction")
    reaches_zero = below is not None and pd.notna(below.get(channel)) and below[channel] > 0.01
    note = ""
    # an offset-subtracted export clips its background at 0: its darkest areas are a fraction of
    # an ADU above it, and it reaches 0; a raw frame with an unsubtracted offset never does
    if dark == 0 and level > 0 and not reaches_zero:
        note = (f"no offset is subtracted, yet no channel's darkest areas go below {level:.4g}: where "
                "that is the camera's offset (an sCMOS camera adds ~100 ADU), set illumination.dark; "
                "dim stains' intensities and flat fields depend on it")
    elif illumination["offset_check"].fillna("").astype(bool).any():
        note = (f"the offset ({dark:g}) is above most pixels of some channel (offset_check): is it the "
                "camera's?")
    return pd.DataFrame([{"dark": dark, "offset_at_most": level, "darkest_channel": channel,
                          "note": note}])


ASSESSMENT_COLUMNS = ["channel", "apply", "estimated_gain_db", "min_gain_db", "decided_by", "noise_variance",
                      "blind_spot_loss", "n_images", "held_out"]


def denoise_assessment(store: str | Path) -> pd.DataFrame:
    """Per stain of the denoised store: was Noise2Void applied, on what evidence (the estimated gain
    and its terms, brightpaint.denoise.assess_denoising). Empty for a store written before the
    assessment existed."""
    attrs = zarr.open_group(str(store), mode="r").attrs.get("brightpaint", {})
    recorded = attrs.get("denoise_assessment", {})
    rows = [{"channel": channel, **values} for channel, values in recorded.items()]
    return pd.DataFrame(rows).reindex(columns=ASSESSMENT_COLUMNS)


def denoise_crops(sources: PlateSources, brightfield: str, size: int = 128) -> str:
    """Before / after crops of Noise2Void for every denoised channel of a plate's first stored site
    (the illumination-corrected raw plane and the denoised one, centre crop, same contrast), as a PNG
    data URI; `sources` name the plate's denoised store."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    denoised = open_plate_source(sources, brightfield)
    raw = open_plate_source(sources, brightfield, use_denoised=False)
    well, site = stored_sites(denoised.denoised)[0]
    channels = list(denoised.denoised_layout.channels)
    fig = Figure(figsize=(5, 2.5 * len(channels)), dpi=100)
    FigureCanvasAgg(fig)
    for i, channel in enumerate(channels):
        before = fluorescence_plane(raw, well, site, channel)
        after = fluorescence_plane(denoised, well, site, channel)
        y0, x0 = max(0, (before.shape[0] - size) // 2), max(0, (before.shape[1] - size) // 2)
        crop = np.s_[y0:y0 + size, x0:x0 + size]
        low, high = np.percentile(before[crop], [1, 99.5])
        for j, (image, name) in enumerate(((before, "before"), (after, "after"))):
            ax = fig.add_subplot(len(channels), 2, 2 * i + j + 1)
            ax.imshow(image[crop], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            ax.set_title(f"{channel} {name}", fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"{denoised.plate} {well} site {site}: Noise2Void", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def png_data_uri(path: str | Path, max_px: int = FIGURE_MAX_PX) -> str:
    """A PNG as a data: URI, downsampled (Lanczos) so its long side is at most `max_px`."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if max(image.size) > max_px:
            scale = max_px / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def benchmark_table(bench_dir: str | Path) -> pd.DataFrame:
    """Per-rule run time (s) and peak memory (max_rss, MB) from snakemake's `benchmark:` files."""
    rows = []
    for path in sorted(Path(bench_dir).glob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        if len(table):
            last = table.iloc[-1]
            rows.append({"job": path.stem, "seconds": float(last["s"]),
                         "max_rss_mb": pd.to_numeric(last.get("max_rss"), errors="coerce"),
                         "cpu_seconds": pd.to_numeric(last.get("cpu_time"), errors="coerce")})
    return pd.DataFrame(rows, columns=["job", "seconds", "max_rss_mb", "cpu_seconds"])


def provenance(config: Mapping, repo: str | Path, files: Mapping[str, str | Path],
               bench_dir: str | Path, cellprofiler_site_packages: str | Path | None) -> dict:
    """What produced a plate's results: commit, versions of both environments, config (YAML) and
    its sha256, the sha256 of every named file that exists (models, pipelines, inputs), per-rule
    benchmarks, host."""
    text = yaml.safe_dump(dict(config), sort_keys=True)
    return {
        "git_commit": git_commit(repo, unknown="unknown"),
        "host": platform.node(), "python": platform.python_version(), "platform": platform.platform(),
        "main_environment": environment_versions(None),
        "cellprofiler_environment": (environment_versions(cellprofiler_site_packages, CELLPROFILER_PACKAGES)
                                     if cellprofiler_site_packages else {}),
        "config_yaml": text, "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "files": {name: {"path": str(path), "sha256": sha256_file(path)}
                  for name, path in files.items() if path and Path(path).is_file()},
        "benchmarks": benchmark_table(bench_dir),
    }


def _figure(path: str | None, caption: str) -> dict | None:
    return {"src": png_data_uri(path), "caption": caption, "file": Path(path).name} if path else None


def plate_report(files: PlateResults, plate_info: Mapping, prov: Mapping,
                 rules: Mapping | None = None, stain_cards: Iterable[str | Path] = (),
                 brightfield: str = "BF", nuclei: str = "DNA") -> dict:
    """Everything the plate's report shows, read from its result files (`files`: those the plate
    has): summary with verdict, inputs, flags, figures and tables of each stage that ran, the
    virtual stains against the real ones (`virtual_stain_evidence`, floors from `rules`'
    virtual_fit), provenance. `plate_info` is the plate's row of the screen sheet (its `plate` names
    it); `nuclei` is the nuclear stain's channel."""
    limits = {**DEFAULT_RULES, **(rules or {})}
    sites = _read_csv(files.qc_sites)
    n_sites = 0 if sites is None else len(sites)
    n_wells = 0 if sites is None else sites["well"].nunique()
    flags = collect_flags(files)
    verdict, checks = plate_verdict(flags, n_sites, rules)
    counts = (flags.groupby(["stage", "flag"]).size().rename("sites").reset_index()
              if len(flags) else pd.DataFrame(columns=["stage", "flag", "sites"]))
    report = {"plate": str(plate_info["plate"]),
              "info": {k: str(v) for k, v in plate_info.items()},
              "n_sites": n_sites, "n_wells": int(n_wells), "verdict": verdict, "checks": checks,
              "flag_counts": counts, "flags": flags, "sections": [], "provenance": prov}
    inputs = {}
    if files.qc_images:
        qc = pd.read_parquet(files.qc_images, columns=["channel", "flag"])
        qc["flagged"] = qc["flag"].fillna("").astype(str) != ""
        inputs["images per channel"] = (qc.groupby("channel").agg(images=("flag", "size"),
                                                                   flagged=("flagged", "sum"))
                                        .reset_index())
    report["inputs"] = inputs
    sections = report["sections"]
    illum = sorted(files.illum_figures.items(), key=lambda item: item[1])
    if illum:
        tables = {}
        if files.illum_meta:
            tables["illumination"] = illumination_table(files.illum_meta)
            tables["camera_offset"] = camera_offset_table(tables["illumination"], brightfield)
        sections.append({"title": "Illumination functions", "figures": [
            _figure(path, f"{channel}: estimated flat field ({RELATIVE.illum(channel)})")
            for channel, path in illum], "tables": tables})
    if files.focus:
        focus = pd.read_parquet(files.focus)
        # basis: which rule chose the plane (contrast inversion or the sharpest plane); tables
        # written before it existed have none
        by = ["plane", "basis"] if "basis" in focus else ["plane"]
        sections.append({"title": "Focus", "figures": [_figure(files.focus_figure,
                                                                "chosen plane per site (plate heatmap)")],
                         "tables": {"focus_planes": focus.groupby(by).size().rename("sites")
                                    .reset_index()}})
    denoise = sorted(files.denoise_models)
    if denoise or files.denoised_sources is not None:
        figures = ([{"src": denoise_crops(files.denoised_sources, brightfield), "file": "denoise_crops",
                     "caption": "before / after denoising, centre crop of the first site (a stain the "
                                "assessment kept is its corrected input on both sides)"}]
                   if files.denoised_sources is not None else [])
        tables = {"denoise_models": pd.DataFrame({"model": [Path(p).name for p in denoise],
                                                  "sha256": [sha256_file(p) for p in denoise]})}
        if files.denoised_sources is not None:
            tables["denoise_assessment"] = denoise_assessment(files.denoised_sources.denoised)
        sections.append({"title": "Denoising (Noise2Void)", "figures": figures, "tables": tables})
    stain_tables = {}
    cards = [json.loads(Path(c).read_text()) for c in stain_cards if Path(c).is_file()]
    if cards:
        stain_tables["stain_models"] = pd.DataFrame(
            [{"targets": ", ".join(card.get("targets", [])),
              "architecture": json.dumps(card.get("architecture", {}), sort_keys=True),
              "training plates": ", ".join(sorted(card.get("target_normalisation", {}).get("plates", {}))),
              "training sites": card.get("n_sites", {}).get("train", ""),
              "validation sites": card.get("n_sites", {}).get("validation", ""),
              "sha256": card.get("sha256", "")} for card in cards])
        stain_tables["stain_validation"] = pd.DataFrame(
            [{"model": i + 1, "metric": k, "value": v} for i, card in enumerate(cards)
             for k, v in sorted(card.get("metrics", {}).items())])
    if files.stain_metrics:
        metrics = pd.read_parquet(files.stain_metrics)
        stain_tables["stain_metrics"] = (metrics.groupby(["split", "channel"])
                                         [["pcc", "ssim", "psnr", "nmae"]].mean().reset_index())
    stain_sites = _read_csv(files.stain_sites)
    if stain_sites is not None and "domain_outside" in stain_sites.columns:
        domain = domain_table(stain_sites, cards)
        stain_tables["brightfield_domain"] = domain
        outside = float(domain["sites outside"].max()) if len(domain) else 0.0
        report["checks"].append({"rule": "sites whose brightfield lies outside the stain model's domain",
                                 "value": outside, "threshold": limits["domain_fraction"],
                                 "outcome": "review", "triggered": bool(outside > limits["domain_fraction"])})
        if outside > limits["domain_fraction"] and report["verdict"] == "pass":
            report["verdict"] = "review"
    if stain_sites is not None:
        columns = [c for c in stain_sites.columns if c.startswith("uncertainty_")]
        if columns:
            scores = stain_sites[columns].apply(pd.to_numeric, errors="coerce")
            stain_tables["stain_uncertainty"] = pd.DataFrame(
                {"channel": [c.removeprefix("uncertainty_") for c in columns],
                 "median": scores.median().to_numpy(), "q90": scores.quantile(0.9).to_numpy(),
                 "max": scores.max().to_numpy()})
    if files.stain_uncertainty:
        stain_tables["uncertainty_vs_error"] = pd.read_csv(files.stain_uncertainty)
    if stain_tables or files.stain_examples:
        sections.append({"title": "Virtual staining", "tables": stain_tables, "figures": [
            _figure(files.stain_examples, "brightfield | real | virtual")]})
    if files.segment_sites:
        segment = pd.read_csv(files.segment_sites, keep_default_na=False)
        tables = {"segment_objects": segment.groupby(["source", "status"])["objects"].agg(["size", "sum"])
                  .rename(columns={"size": "sites", "sum": "objects"}).reset_index()}
        if files.segment_metrics:
            seg = pd.read_parquet(files.segment_metrics)
            tables["segment_metrics"] = (seg.groupby(["objects", "comparison"])[["ap50", "f1_70"]]
                                         .mean().reset_index())
        figures = [_figure(files.segment_overlay, "segmentation overlays")]
        for source, group in segment.groupby("source"):
            per_well = group.groupby("well")["objects"].sum()
            title = f"{report['plate']}: cells per well ({source} stains)"
            figures.append({"src": well_heatmap(per_well, title, "cells"),
                            "caption": f"cells per well, {source} stains ({RELATIVE.segment_sites})",
                            "file": f"objects_per_well_{source}"})
        sections.append({"title": "Segmentation", "tables": tables, "figures": figures})
    if files.features_sites:
        feats = pd.read_csv(files.features_sites, keep_default_na=False)
        tables = {"features_sites": feats.groupby(["source", "status"])["cells"].agg(["size", "sum"])
                  .rename(columns={"size": "sites", "sum": "cells"}).reset_index()}
        if files.profiles_selected:
            columns = pd.read_parquet(files.profiles_selected).columns
            tables["profiles_features"] = pd.DataFrame(
                [{"features kept by selection": int(sum(not c.startswith("Metadata_") for c in columns))}])
        sections.append({"title": "Features and profiles", "tables": tables, "figures": []})
    if files.match_summary:
        tables = {"match_summary": pd.read_parquet(files.match_summary)}
        if files.match_agreement:
            agreement = pd.read_parquet(files.match_agreement)
            if len(agreement):
                tables["level3_cpcor"] = agreement_summary(agreement)
        if files.match_neighbours:
            tables["match_neighbours"] = pd.read_parquet(files.match_neighbours)
        sections.append({"title": "Matching", "tables": tables, "figures": []})
    if files.stain_metrics or files.match_summary:
        evidence, report["virtual_stains"] = virtual_stain_evidence(
            pd.read_parquet(files.stain_metrics) if files.stain_metrics else None,
            pd.read_parquet(files.segment_metrics) if files.segment_metrics else None,
            pd.read_parquet(files.match_summary) if files.match_summary else None,
            nuclei, limits.get("virtual_fit"))
        sections.append({"title": "Virtual against real stains", "verdict": report["virtual_stains"],
                         "tables": {"virtual_vs_real": evidence}, "figures": []})
    for section in sections:
        section["figures"] = [f for f in section["figures"] if f]
    return report


def report_summary(report: Mapping) -> dict:
    """What the screen index shows of a plate (report.json)."""
    info = report["info"]
    return {"plate": report["plate"], "batch": info.get("batch", ""), "cell_type": info.get("cell_type", ""),
            "role": info.get("role", ""), "n_sites": report["n_sites"], "n_wells": report["n_wells"],
            "n_flags": len(report["flags"]), "verdict": report["verdict"], "checks": report["checks"],
            "virtual_stains": report.get("virtual_stains", "")}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined)
    env.filters["table"] = html_table
    return env


def html_table(table: pd.DataFrame, name: str) -> str:
    """A table as HTML with `data-table=name`; floats with 4 significant digits."""
    html = table.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.4g}",
                         classes="data", escape=True)
    return jinja2.utils.markupsafe.Markup(html.replace("<table ", f'<table data-table="{name}" ', 1))


def render_plate_report(report: Mapping) -> str:
    return _environment().get_template("plate_report.html.j2").render(r=report)


def render_index(plates: Iterable[Mapping], screen: Mapping | None = None,
                 figures: Iterable[Mapping] = ()) -> str:
    """The screen's index page: one row per plate (its report link and verdict), screen-level
    tables (e.g. matching) and figures (src, caption, file)."""
    return _environment().get_template("index.html.j2").render(plates=list(plates), screen=screen or {},
                                                               figures=list(figures))
