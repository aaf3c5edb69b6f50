"""Tests of the demo-screen generator against its own ground truth (brightpaint.demo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

import brightpaint.demo.screen as screen_module
from brightpaint.demo.camera import flat_field, plate_optics
from brightpaint.demo.fluorescence import FLUORESCENCE_PSF
from brightpaint.demo.screen import simulate_screen
from brightpaint.demo.site import FOCUS_JITTER, simulate_site
from brightpaint.demo.spec import (
    CHANNELS,
    FLUORESCENCE,
    PlateSpec,
    ScreenSpec,
    screen_layout,
    spec_from_config,
)
from brightpaint.demo.treatments import (
    COMPOUNDS,
    DOSE_LEVELS,
    MOA_EFFECTS,
    Phenotype,
    plate_map,
    plate_wells,
    well_phenotype,
)
from brightpaint.io import PLATEMAP_COLUMNS

SMALL = ScreenSpec(
    plates=(PlateSpec("T1", "B1", "flat", "train"), PlateSpec("T2", "B2", "dense", "apply"),
            PlateSpec("T3", "B2", "flat", "both")),
    wells=6, sites=1, size=128, z_planes=5, seed=3)
# 24 wells (the full treatment block), one plate per cell type, full-size sites
PHENO = ScreenSpec(plates=(PlateSpec("F", "B1", "flat", "train"),
                           PlateSpec("D", "B2", "dense", "train")),
                   wells=24, sites=1, size=256, seed=11)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _read(path: Path) -> np.ndarray:
    return tifffile.imread(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    sheet = simulate_screen(out, SMALL, workers=1)
    assert sheet == out / "plates.tsv"
    return out


@pytest.fixture(scope="module")
def pheno(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """Phenotype screen, with cells.csv joined to the plate-map truth for every plate."""
    out = tmp_path_factory.mktemp("pheno")
    simulate_screen(out, PHENO, workers=2)
    tables = []
    for p in PHENO.plates:
        truth = pd.read_csv(out / "truth" / p.plate / "platemap_truth.csv")
        cells = pd.read_csv(out / "truth" / p.plate / "cells.csv")
        sites = pd.read_csv(out / "truth" / p.plate / "sites.csv")
        cells = cells.merge(truth, on="well").merge(sites[["well", "site", "n_cells"]],
                                                    on=["well", "site"])
        tables.append(cells.assign(plate=p.plate))
    return out, pd.concat(tables, ignore_index=True)


# --- spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"wells": 0}, "wells"), ({"wells": 385}, "wells"), ({"z_planes": 4}, "z_planes"),
    ({"size": 32}, "size"), ({"sites": 0}, "sites"), ({"seed": -1}, "seed"),
    ({"wells": 2.5}, "wells"),
    ({"plates": (PlateSpec("A", "B", "flat", "train"), PlateSpec("A", "B", "dense", "apply"))},
     "plates"),
    ({"plates": ()}, "plates"),
])
def test_spec_validation_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        ScreenSpec(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"role": "predict"}, "role"), ({"cell_type": "round"}, "cell_type"),
    ({"plate": "a/b"}, "plate"), ({"batch": ""}, "batch"), ({"bf_contrast": 0}, "bf_contrast"),
    ({"bf_absorption": -0.1}, "bf_absorption"), ({"bf_absorption": "low"}, "bf_absorption"),
    ({"stain_background": 11}, "stain_background"),
])
def test_plate_validation_names_the_bad_field(kwargs, field):
    values = {"plate": "P1", "batch": "B1", "cell_type": "flat", "role": "train", **kwargs}
    with pytest.raises(ValueError, match=f"^{field}"):
        PlateSpec(**values)


def test_spec_from_config():
    assert spec_from_config({}) == ScreenSpec()
    spec = spec_from_config({"wells": 8, "seed": 5, "plates": [
        {"plate": "X", "batch": "B9", "cell_type": "dense", "role": "both"}]})
    assert spec.wells == 8 and spec.seed == 5 and spec.sites == 2
    assert spec.plates == (PlateSpec("X", "B9", "dense", "both"),)
    with pytest.raises(ValueError, match="unknown"):
        spec_from_config({"well": 8})
    with pytest.raises(ValueError, match="role"):
        spec_from_config({"plates": [{"plate": "X", "batch": "B", "cell_type": "flat",
                                      "role": "nope"}]})
    with pytest.raises(ValueError, match=r"plates\[0\]"):
        spec_from_config({"plates": [{"plate": "X"}]})


def test_default_spec_is_a_real_screen():
    spec = ScreenSpec()
    assert len(spec.plates) >= 3
    assert len({p.batch for p in spec.plates}) >= 2
    assert {p.cell_type for p in spec.plates} == {"flat", "dense"}
    assert {p.role for p in spec.plates} == {"train", "both", "apply"}
    assert screen_layout(spec)["P2"] == {"manifest": "P2/manifest.csv",
                                         "platemap": "P2/platemap.csv"}


# --- plate layout and treatments -------------------------------------------------------------


def test_plate_map_of_24_wells():
    pm = plate_map(24)
    assert list(pm["well"]) == plate_wells(24)
    assert pm["well"].is_unique and pm["well"].str.fullmatch(r"[A-P](0[1-9]|1\d|2[0-4])").all()
    counts = pm["control_type"].value_counts()
    assert counts["trt"] == 16 and counts["negcon"] == 6 and counts["poscon"] == 2
    trt = pm[pm["control_type"] == "trt"]
    assert trt["moa"].nunique() >= 4
    assert (trt.groupby("moa")["perturbation"].nunique() >= 2).all()
    assert (trt.groupby("perturbation")["dose"].nunique() >= 2).all()
    assert (trt["target"] != "").all()
    assert trt.set_index("perturbation").loc["etoposide", "target"].iloc[0] == "TOP2A"
    neg = pm[pm["control_type"] == "negcon"]
    assert (neg["perturbation"] == "DMSO").all() and (neg["dose"] == 0).all()
    assert (neg["moa"] == "").all() and (neg["target"] == "").all()
    assert pm.loc[pm["control_type"] == "poscon", "perturbation"].nunique() == 1
    # controls spread over the plate, not bunched in one corner
    rows, cols = neg["well"].str[0], neg["well"].str[1:].astype(int)
    assert rows.nunique() >= 3 and cols.nunique() >= 3


def test_plate_map_sizes():
    assert len(set(plate_wells(384))) == 384
    full = plate_map(384)
    counts = full.groupby(["perturbation", "dose"]).size()
    assert counts[("DMSO", 0.0)] == 96 and counts[("staurosporine", 1.0)] == 32
    assert (counts.drop([("DMSO", 0.0), ("staurosporine", 1.0)]) == 16).all()
    # replicate blocks are rotated, so DMSO does not sit in the same columns everywhere
    assert full.loc[full["control_type"] == "negcon", "well"].str[1:].nunique() == 24
    for n in (1, 2, 5, 23):
        assert (plate_map(n)["control_type"] == "negcon").any()


def test_dose_increases_effect_and_toxicity():
    for compound in COMPOUNDS:
        low, high = (well_phenotype(compound.name, d, lvl)
                     for d, lvl in zip(compound.doses, DOSE_LEVELS, strict=True))
        for name, full in MOA_EFFECTS[compound.moa].items():
            if name in ("density",):
                continue  # toxicity also changes density
            effect = [abs(np.log(getattr(p, name) / getattr(Phenotype(), name)))
                      for p in (low, high)]
            assert effect[1] > effect[0] > 0, (compound.name, name, full)
    assert well_phenotype("DMSO", 0, 0) == Phenotype()
    toxic = well_phenotype("camptothecin", 1.0, 1.0)
    assert toxic.toxic and toxic.pyknotic_fraction > 0 and toxic.density < 0.5
    assert not well_phenotype("etoposide", 10.0, 1.0).toxic


# --- files: the input contract ---------------------------------------------------------------


def test_contract_files(small):
    sheet = pd.read_csv(small / "plates.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(sheet.columns) == ["plate", "manifest", "platemap", "batch", "cell_type", "role"]
    assert list(sheet["plate"]) == ["T1", "T2", "T3"]
    expected_map = plate_map(SMALL.wells)[PLATEMAP_COLUMNS]
    for _, row in sheet.iterrows():
        manifest = pd.read_csv(small / row["manifest"], dtype={"z": int, "site": int})
        assert list(manifest.columns) == ["plate", "well", "site", "channel", "z", "path"]
        platemap = pd.read_csv(small / row["platemap"], keep_default_na=False)
        assert list(platemap.columns) == ["well", "perturbation", "dose", "control_type", "moa",
                                          "target"]
        assert platemap.astype(str).equals(expected_map.astype(str))  # same map on every plate
        assert set(platemap["control_type"]) <= {"negcon", "poscon", "trt"}
        assert (manifest["plate"] == row["plate"]).all()
        assert set(manifest["well"]) == set(platemap["well"])
        channels = set(manifest["channel"])
        assert channels == ({"BF"} if row["role"] == "apply" else {"BF", "DNA", "CYTO", "DAMAGE"})
        bf = manifest[manifest["channel"] == "BF"]
        assert sorted(set(bf["z"])) == list(range(SMALL.z_planes))
        assert (manifest.loc[manifest["channel"] != "BF", "z"] == 0).all()
        assert not manifest.duplicated(["well", "site", "channel", "z"]).any()
        assert len(manifest) == SMALL.wells * SMALL.sites * (
            SMALL.z_planes + (0 if row["role"] == "apply" else 3))
        base = (small / row["manifest"]).parent
        for rel in manifest["path"]:
            image = _read(base / rel)
            assert image.dtype == np.uint16 and image.shape == (SMALL.size, SMALL.size)


def test_contract_readable_by_io_module(small):
    io = pytest.importorskip("brightpaint.io")
    sheet = io.read_screen_sheet(small / "plates.tsv")
    for _, row in sheet.iterrows():
        manifest = io.read_manifest(row["manifest"], plate=row["plate"])
        assert all(Path(f).is_file() for f in manifest["file"])
        io.read_platemap(row["platemap"])


def test_truth_files_for_every_plate_and_channel(small):
    screen = json.loads((small / "truth" / "screen.json").read_text())
    assert screen["seed"] == SMALL.seed and screen["spec"]["wells"] == SMALL.wells
    assert screen["truth_files"]
    for p in SMALL.plates:  # apply plates included
        truth = small / "truth" / p.plate
        sites = pd.read_csv(truth / "sites.csv")
        assert len(sites) == SMALL.wells * SMALL.sites
        info = json.loads((truth / "illumination.json").read_text())["channels"]
        assert set(info) == set(CHANNELS)
        for ch in CHANNELS:
            flat = np.load(truth / f"flatfield_{ch}.npy")
            assert flat.dtype == np.float32 and flat.shape == (SMALL.size, SMALL.size)
            assert abs(flat.mean() - 1) < 1e-4
        for _, s in sites.iterrows():
            stem = f"{s['well']}_s{s['site']}"
            for ch in CHANNELS:
                clean = _read(truth / "clean" / f"{stem}_{ch}.tif")
                assert clean.dtype == np.float32 and clean.shape == (SMALL.size, SMALL.size)
            for kind in ("nuclei", "cells"):
                assert _read(truth / "masks" / f"{stem}_{kind}.tif").dtype == np.uint16
        pm = pd.read_csv(truth / "platemap_truth.csv")
        for column in ("toxic", "pheno_nucleus_area", "pheno_foci_rate", "batch", "batch_factor_DNA"):
            assert column in pm.columns


# --- determinism and robustness --------------------------------------------------------------


def test_deterministic_and_independent_of_workers(small, tmp_path):
    again = tmp_path / "again"
    simulate_screen(again, SMALL, workers=2)
    first, second = _all_files(small), _all_files(again)
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert not different


def test_other_seed_gives_other_images(tmp_path):
    one = ScreenSpec(plates=SMALL.plates[:1], wells=1, sites=1, size=64, seed=1)
    two = ScreenSpec(plates=SMALL.plates[:1], wells=1, sites=1, size=64, seed=2)
    simulate_screen(tmp_path / "a", one)
    simulate_screen(tmp_path / "b", two)
    name = f"T1/images/{plate_wells(1)[0]}_s1_BF_z00.tif"
    assert not np.array_equal(_read(tmp_path / "a" / name), _read(tmp_path / "b" / name))


def test_crash_leaves_no_sheet(tmp_path, monkeypatch):
    spec = ScreenSpec(plates=SMALL.plates[:1], wells=2, sites=1, size=64)
    simulate_screen(tmp_path, spec)
    assert (tmp_path / "plates.tsv").exists()

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(screen_module, "_write_well", broken)
    with pytest.raises(RuntimeError):
        simulate_screen(tmp_path, spec)
    assert not (tmp_path / "plates.tsv").exists()


# --- masks and clean fluorescence ------------------------------------------------------------


def test_masks_match_clean_images(small):
    split_cells = total_cells = 0
    for p in SMALL.plates:
        truth = small / "truth" / p.plate
        sites = pd.read_csv(truth / "sites.csv")
        cells = pd.read_csv(truth / "cells.csv")
        for _, s in sites.iterrows():
            stem = f"{s['well']}_s{s['site']}"
            nuclei = _read(truth / "masks" / f"{stem}_nuclei.tif")
            bodies = _read(truth / "masks" / f"{stem}_cells.tif")
            n = int(s["n_cells"])
            assert set(np.unique(nuclei)) == set(range(n + 1))
            assert set(np.unique(bodies)) == set(range(n + 1))
            assert (bodies[nuclei > 0] == nuclei[nuclei > 0]).all()  # nucleus k inside cell k
            site_cells = cells[(cells["well"] == s["well"]) & (cells["site"] == s["site"])]
            assert list(site_cells["nucleus_area"]) == list(np.bincount(nuclei.ravel())[1:])
            assert list(site_cells["cell_area"]) == list(np.bincount(bodies.ravel())[1:])
            clean = {ch: _read(truth / "clean" / f"{stem}_{ch}.tif") for ch in FLUORESCENCE}
            if n == 0:
                continue
            # the stains lie in their objects, up to the PSF's blur (3 sigma around the masks)
            reach = int(np.ceil(3 * FLUORESCENCE_PSF))
            in_nuclei = ndimage.binary_dilation(nuclei > 0, iterations=reach)
            in_cells = ndimage.binary_dilation(bodies > 0, iterations=reach)
            assert clean["DNA"][in_nuclei].sum() > 0.99 * clean["DNA"].sum()
            assert clean["DAMAGE"][in_nuclei].sum() > 0.99 * clean["DAMAGE"].sum()
            assert clean["CYTO"][in_cells].sum() > 0.99 * clean["CYTO"].sum()
            assert clean["DNA"][nuclei > 0].sum() > 0.8 * clean["DNA"].sum()
            assert np.median(clean["DNA"][nuclei > 0]) > 0.3
            assert np.median(clean["CYTO"][bodies > 0]) > 0.1
            for k in range(1, n + 1):
                total_cells += 1
                split_cells += ndimage.label(bodies == k)[1] != 1
    assert total_cells > 50
    assert split_cells <= 0.02 * total_cells


def test_noisy_fluorescence_shows_the_nuclei(small):
    truth = small / "truth" / "T1"
    sites = pd.read_csv(truth / "sites.csv")
    s = sites.loc[sites["n_cells"].idxmax()]
    nuclei = _read(truth / "masks" / f"{s['well']}_s{s['site']}_nuclei.tif")
    dna = _read(small / "T1" / "images" / f"{s['well']}_s{s['site']}_DNA_z00.tif").astype(float)
    # dim stains over an autofluorescence background: the nuclei still stand out by several
    # background SDs (the SD holds shot noise, the PSF's spill and the flat field)
    assert dna[nuclei > 0].mean() > dna[nuclei == 0].mean() + 5 * dna[nuclei == 0].std()


# --- brightfield focus -----------------------------------------------------------------------


FOCUS_SPEC = ScreenSpec(plates=(PlateSpec("F", "B1", "flat", "train"),
                                PlateSpec("D", "B1", "dense", "train")),
                        wells=24, size=128, seed=7)


def _focus_sites(z_planes=5):
    spec = ScreenSpec(plates=FOCUS_SPEC.plates, wells=24, size=128, z_planes=z_planes, seed=7)
    wells = plate_wells(24)
    return [simulate_site(spec, plate, well, site, fluorescence=False)
            for plate in ("F", "D") for well in wells[:12] for site in (1, 2)]


@pytest.fixture(scope="module")
def focus_sites():
    return _focus_sites()


def test_focal_plane_varies_and_brackets_focus(focus_sites):
    planes = [s.focal_plane for s in focus_sites]
    assert min(planes) >= 1 and max(planes) <= 3
    assert len(set(planes)) == 3
    for s in focus_sites:
        assert abs(s.focus_position - s.focal_plane) <= FOCUS_JITTER
    seven = {s.focal_plane for s in _focus_sites(z_planes=7)[:24]}
    assert min(seven) >= 1 and max(seven) <= 5 and len(seven) >= 3


def test_contrast_inverts_through_focus(focus_sites):
    flips = checked = 0
    for s in focus_sites:
        if len(s.labels.kept) < 2:
            continue
        f = s.focal_plane
        curvature = ndimage.laplace(s.phase.astype(np.float64)).ravel()
        below = s.brightfield_clean[f - 1] - s.brightfield_clean[f]
        above = s.brightfield_clean[f + 1] - s.brightfield_clean[f]
        r_below = np.corrcoef(below.ravel(), curvature)[0, 1]
        r_above = np.corrcoef(above.ravel(), curvature)[0, 1]
        assert r_below > 0.5 and r_above < -0.5  # TIE: I(dz) ~ -dz * laplace(phase)
        # and in the noisy images (flat-field corrected): nuclei are dark below focus, bright
        # above it
        optics = plate_optics(FOCUS_SPEC, s.plate)["BF"]
        bf = {z: (s.images[("BF", z)] - optics.dark) / optics.flat for z in (f - 1, f + 1)}
        background = s.labels.cells == 0
        inside = s.labels.nuclei > 0
        contrast = {z: bf[z][inside].mean() - bf[z][background].mean() for z in bf}
        checked += 1
        flips += contrast[f - 1] < 0 < contrast[f + 1]
    assert checked >= 30
    assert flips >= 0.9 * checked


def test_variance_of_laplacian_peaks_at_focus(focus_sites):
    hits = checked = var_off_focus = 0
    for s in focus_sites:
        if len(s.labels.kept) < 2:
            continue
        stack = np.stack([s.images[("BF", z)] for z in range(s.brightfield_clean.shape[0])])
        vol = [ndimage.laplace(plane.astype(np.float64)).var() for plane in stack]
        checked += 1
        hits += int(np.argmax(vol)) == s.focal_plane
        # plain contrast is larger just off focus (phase halos), as on real brightfield
        std = s.brightfield_clean.std(axis=(1, 2))
        f = s.focal_plane
        var_off_focus += max(std[f - 1], std[f + 1]) > std[f]
    assert hits >= 0.9 * checked
    assert var_off_focus >= 0.8 * checked


def test_nuclei_have_a_brightfield_signature(focus_sites):
    """In focus, nuclei absorb more than cytoplasm (chromatin, envelope, nucleoli)."""
    darker = checked = 0
    for s in focus_sites:
        if len(s.labels.kept) < 2:
            continue
        bf = s.clean["BF"]
        cytoplasm = (s.labels.cells > 0) & (s.labels.nuclei == 0)
        checked += 1
        darker += bf[s.labels.nuclei > 0].mean() < bf[cytoplasm].mean() < bf[s.labels.cells == 0
                                                                               ].mean()
    assert darker >= 0.9 * checked


# --- illumination, noise, batch --------------------------------------------------------------


def test_flat_field_geometry():
    field = flat_field(200, (0.4, 0.6), 0.7, (0.03, -0.02))
    assert field.dtype == np.float32 and abs(field.mean() - 1) < 1e-5
    corners = field[[0, 0, -1, -1], [0, -1, 0, -1]].mean()
    assert corners / field[100, 100] == pytest.approx(0.7, abs=0.01)
    peak = np.unravel_index(np.argmax(field), field.shape)
    assert abs(peak[0] - 0.4 * 199) < 10 and abs(peak[1] - 0.6 * 199) < 10


def test_saved_flat_fields_are_the_ones_applied(small):
    fields = {}
    for p in SMALL.plates:
        optics = plate_optics(SMALL, p.plate)
        info = json.loads((small / "truth" / p.plate / "illumination.json").read_text())["channels"]
        for ch in CHANNELS:
            saved = np.load(small / "truth" / p.plate / f"flatfield_{ch}.npy")
            np.testing.assert_array_equal(saved, optics[ch].flat)
            corners = saved[[0, 0, -1, -1], [0, -1, 0, -1]].mean()
            assert 0.58 <= corners / saved[SMALL.size // 2, SMALL.size // 2] <= 0.82
            assert info[ch]["dark_offset"] == optics[ch].dark
            fields[(p.plate, ch)] = saved
    # different per channel and per plate
    assert not np.allclose(fields[("T1", "DNA")], fields[("T1", "CYTO")], atol=0.02)
    assert not np.allclose(fields[("T1", "DNA")], fields[("T3", "DNA")], atol=0.02)


def test_noise_model_matches_truth(small):
    """noisy = Poisson(gain * (clean + background) * flat * batch) + N(0, read^2) + dark, from a
    re-rendered site, which must also equal the files written."""
    plate, well = "T3", plate_wells(SMALL.wells)[0]
    s = simulate_site(SMALL, plate, well, 1)
    optics = plate_optics(SMALL, plate)
    images = small / plate / "images"
    for (channel, z), image in s.images.items():
        np.testing.assert_array_equal(image, _read(images / f"{well}_s1_{channel}_z{z:02d}.tif"))
    clean_bf = _read(small / "truth" / plate / "clean" / f"{well}_s1_BF.tif")
    np.testing.assert_array_equal(clean_bf, s.clean["BF"])
    for channel, z, clean in [("BF", 0, s.brightfield_clean[0]), ("BF", 4, s.brightfield_clean[4]),
                              ("DNA", 0, s.clean["DNA"]), ("CYTO", 0, s.clean["CYTO"])]:
        o = optics[channel]
        expected = o.gain * o.batch_factor * (clean.astype(np.float64) + o.background) * o.flat
        residual = s.images[(channel, z)].astype(np.float64) - o.dark - expected
        assert abs(residual.mean()) < 0.01 * expected.mean() + 0.1
        # variance: shot noise (= expected photons) + read noise + rounding
        variance_ratio = residual.var() / (expected.mean() + o.read_noise**2 + 1 / 12)
        assert variance_ratio == pytest.approx(1.0, abs=0.06), channel
    # the flat field is visible in the raw data and is removed by dividing by the saved field
    raw = np.mean([_read(images / f"{w}_s1_BF_z{z:02d}.tif").astype(float)
                   for w in plate_wells(SMALL.wells) for z in range(SMALL.z_planes)], axis=0)
    raw = ndimage.gaussian_filter(raw - optics["BF"].dark, 6)
    flat = np.load(small / "truth" / plate / "flatfield_BF.npy")
    corrected = raw / flat
    assert corrected.std() / corrected.mean() < 0.5 * raw.std() / raw.mean()


def test_batch_effect_recorded(small):
    factors = {}
    for p in SMALL.plates:
        info = json.loads((small / "truth" / p.plate / "illumination.json").read_text())
        pm = pd.read_csv(small / "truth" / p.plate / "platemap_truth.csv")
        factors[p.plate] = {ch: info["channels"][ch]["batch_factor"] for ch in CHANNELS}
        for ch in CHANNELS:
            assert np.allclose(pm[f"batch_factor_{ch}"], factors[p.plate][ch])
        assert (pm["batch"] == p.batch).all()
    assert factors["T2"] == factors["T3"]  # same batch B2
    assert all(abs(factors["T1"][ch] - factors["T2"][ch]) > 1e-3 for ch in CHANNELS)
    assert all(0.8 <= f <= 1.25 for plate in factors.values() for f in plate.values())


# --- biology: MoA phenotypes, toxicity, cell types -------------------------------------------


def _ratio(cells: pd.DataFrame, plate: str, column: str, moa: str, level: float = 1.0) -> float:
    here = cells[(cells["plate"] == plate) & ~cells["pyknotic"]]
    treated = here[(here["moa"] == moa) & (here["dose_level"] == level)]
    dmso = here[here["control_type"] == "negcon"]
    return treated[column].mean() / dmso[column].mean()


@pytest.mark.parametrize("plate", ["F", "D"])
def test_moa_phenotypes_in_documented_direction(pheno, plate):
    _, cells = pheno
    assert _ratio(cells, plate, "n_foci", "topoisomerase inhibitor") > 4
    assert _ratio(cells, plate, "nucleus_area", "topoisomerase inhibitor") > 1.15
    assert _ratio(cells, plate, "cell_area", "tubulin polymerization inhibitor") < 0.75
    assert _ratio(cells, plate, "nucleus_area", "tubulin polymerization inhibitor") < 0.9
    assert _ratio(cells, plate, "nucleus_area", "HDAC inhibitor") > 1.1
    assert _ratio(cells, plate, "cell_area", "CDK inhibitor") > 1.3
    # low doses act in the same direction, less strongly
    low = _ratio(cells, plate, "n_foci", "topoisomerase inhibitor", 0.5)
    assert 1.5 < low < _ratio(cells, plate, "n_foci", "topoisomerase inhibitor")
    # fewer cells under CDK inhibition (no proliferation)
    per_site = cells.drop_duplicates(["plate", "well", "site"])
    per_site = per_site[per_site["plate"] == plate]
    dmso_count = per_site.loc[per_site["control_type"] == "negcon", "n_cells"].mean()
    cdk = per_site[(per_site["moa"] == "CDK inhibitor") & (per_site["dose_level"] == 1.0)]
    assert cdk["n_cells"].mean() < 0.8 * dmso_count


def test_chromatin_phenotypes_in_clean_dna(pheno):
    """HDAC inhibitors: dimmer, smoother chromatin; tubulin inhibitors: brighter, more textured."""
    out, cells = pheno
    pm = pd.read_csv(out / "truth" / "D" / "platemap_truth.csv")

    def dna_stats(moa):
        wells = pm.loc[(pm["moa"].fillna("") == moa) & (pm["dose_level"].isin([0.0, 1.0]))
                       & ~pm["toxic"], "well"]
        means, cvs = [], []
        for well in wells:
            dna = _read(out / "truth" / "D" / "clean" / f"{well}_s1_DNA.tif")
            nuclei = _read(out / "truth" / "D" / "masks" / f"{well}_s1_nuclei.tif")
            core = ndimage.binary_erosion(nuclei > 0, iterations=2)  # away from the rim
            means.append(dna[core].mean())
            cvs.append(dna[core].std() / dna[core].mean())
        return np.mean(means), np.mean(cvs)

    dmso, hdac, tubulin = dna_stats(""), dna_stats("HDAC inhibitor"), dna_stats(
        "tubulin polymerization inhibitor")
    assert hdac[0] < 0.9 * dmso[0] and hdac[1] < dmso[1]
    assert tubulin[0] > 1.2 * dmso[0] and tubulin[1] > dmso[1]


def test_toxic_wells_have_fewer_cells_and_pyknotic_nuclei(pheno):
    _, cells = pheno
    per_site = cells.drop_duplicates(["plate", "well", "site"])
    for plate in ("F", "D"):
        here = per_site[per_site["plate"] == plate]
        dmso = here.loc[here["control_type"] == "negcon", "n_cells"].mean()
        toxic = here[here["toxic"]]
        assert len(toxic) >= 3  # poscon + 2 toxic high doses
        assert (toxic["n_cells"] < 0.7 * dmso).all()
        plate_cells = cells[cells["plate"] == plate]
        pyknotic = plate_cells[plate_cells["pyknotic"]]
        assert len(pyknotic) > 0 and pyknotic["toxic"].all()
        normal = plate_cells[(plate_cells["control_type"] == "negcon")]
        assert pyknotic["nucleus_area"].mean() < 0.5 * normal["nucleus_area"].mean()


def test_pyknotic_nuclei_are_small_and_bright():
    spec = PHENO
    well = plate_map(24).query("perturbation == 'staurosporine'")["well"].iloc[0]
    s = simulate_site(spec, "D", well, 1)
    dna, nuclei = s.clean["DNA"], s.labels.nuclei
    labels = np.arange(1, len(s.labels.kept) + 1)
    mean_dna = ndimage.mean(dna, nuclei, labels)
    assert s.pyknotic.any() and (~s.pyknotic).any()
    assert mean_dna[s.pyknotic].mean() > 1.8 * mean_dna[~s.pyknotic].mean()


def test_cell_types_differ(pheno):
    out, cells = pheno
    dmso = cells[cells["control_type"] == "negcon"]
    per_site = dmso.drop_duplicates(["plate", "well", "site"]).groupby("plate")["n_cells"].mean()
    assert per_site["D"] > 2.5 * per_site["F"]
    area = dmso.groupby("plate")[["cell_area", "nucleus_area"]].mean()
    assert area.loc["F", "cell_area"] > 2.5 * area.loc["D", "cell_area"]
    assert area.loc["F", "nucleus_area"] > 1.5 * area.loc["D", "nucleus_area"]
    # dense cells have elongated nuclei, flat cells round ones
    measure = pytest.importorskip("skimage.measure")
    pm = pd.read_csv(out / "truth" / "F" / "platemap_truth.csv")
    wells = pm.loc[pm["control_type"] == "negcon", "well"]
    aspect = {}
    for plate in ("F", "D"):
        ratios = []
        for well in wells:
            nuclei = _read(out / "truth" / plate / "masks" / f"{well}_s1_nuclei.tif")
            for region in measure.regionprops(nuclei):
                if region.area > 30 and region.axis_minor_length > 0:
                    ratios.append(region.axis_major_length / region.axis_minor_length)
        aspect[plate] = np.median(ratios)
    assert aspect["F"] < 1.25 < 1.45 < aspect["D"]


def test_bf_absorption_makes_phase_objects():
    """bf_absorption scales the cells' absorption, not their phase: at 0.1 the focal plane is the
    stack's least contrasted (thin cells at 20x), at 1 the demo's absorbing detail makes it sharp."""
    def site(absorption: float):
        spec = ScreenSpec(plates=(PlateSpec("P", "B", "dense", "train", bf_absorption=absorption),),
                          wells=4, sites=1, size=128, z_planes=7, seed=2)
        return simulate_site(spec, "P", plate_wells(4)[0], 1, fluorescence=False)

    demo, thin = site(1.0), site(0.1)
    assert thin.focal_plane == demo.focal_plane and np.array_equal(thin.phase, demo.phase)
    np.testing.assert_allclose(thin.absorption, 0.1 * demo.absorption, rtol=1e-5, atol=1e-7)
    f = thin.focal_plane
    contrast = thin.brightfield_clean.std(axis=(1, 2))
    assert contrast[f] < 0.5 * min(contrast[f - 1], contrast[f + 1])
    assert demo.brightfield_clean[f].std() > 2 * contrast[f]
