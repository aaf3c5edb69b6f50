"""Illumination functions (brightpaint.illumination) against the demo's known flat fields, on real
vignetted images, against CellProfiler 5 itself, and on bad input.

Residual shading (the accuracy measure on the demo): estimated flat / true flat, both normalised to
mean 1, lightly smoothed (Gaussian sigma 2 px, to measure shading rather than pixel noise), then the
1st..99th percentile range of that ratio over the image. A perfectly corrected image has 0; the
uncorrected demo fields have 0.26-0.47.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from conftest import CHANNELS, REPO, TINY_SPEC, shared_data
from scipy import ndimage

from brightpaint import report
from brightpaint.demo.camera import DARK_OFFSET, add_noise, flat_field, plate_optics
from brightpaint.demo.site import simulate_site
from brightpaint.demo.spec import BRIGHTFIELD, FLUORESCENCE, ScreenSpec
from brightpaint.demo.treatments import plate_wells
from brightpaint.illumination import (
    DARK_ABOVE_DATA,
    IlluminationFunction,
    camera_offset_estimate,
    correct_illumination,
    illumination_function,
    load_illumination,
    plate_illumination,
    residual_shading,
    save_illumination,
)
from brightpaint.ingest import assemble_plate_store, field_path, plan_layout, stored_sites, write_shard_store
from brightpaint.io import well_row_column
from brightpaint.validate import validate_plate

CP_PYTHON = REPO / ".venv-cellprofiler" / "bin" / "python"
CP_SCRIPT = REPO / "tests" / "cellprofiler" / "illum_reference.py"
# the demo's camera offset as a user would configure it (the camera's nominal value; the true
# per-plate, per-channel offsets of the demo vary by +-20 ADU around it)
CAMERA_OFFSET = DARK_OFFSET
DEMO = ScreenSpec()  # the demo screen: 24 wells x 2 sites, 256 px, 5 brightfield planes


def corner_centre(image: np.ndarray, box: int = 32) -> float:
    """Mean of the four box x box corners / mean of the central box x box square."""
    y, x = image.shape
    corners = [image[:box, :box], image[:box, -box:], image[-box:, :box], image[-box:, -box:]]
    cy, cx = y // 2, x // 2
    centre = image[cy - box // 2:cy + box // 2, cx - box // 2:cx + box // 2]
    return float(np.mean([c.mean() for c in corners]) / centre.mean())


@pytest.fixture(scope="module")
def demo_brightfield() -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """Every brightfield plane of the demo's plates P1 (flat cells) and P2 (dense cells), with the
    true flat field."""
    out = {}
    for plate in ("P1", "P2"):
        planes = []
        for well in plate_wells(DEMO.wells):
            for site in range(1, DEMO.sites + 1):
                s = simulate_site(DEMO, plate, well, site, fluorescence=False)
                planes += [s.images[(BRIGHTFIELD, z)] for z in range(DEMO.z_planes)]
        out[plate] = (planes, plate_optics(DEMO, plate)[BRIGHTFIELD].flat)
    return out


# --- accuracy on the demo -----------------------------------------------------------------------


@pytest.mark.parametrize("plate", ["P1", "P2"])
def test_demo_brightfield_residual_shading(demo_brightfield, plate):
    planes, true = demo_brightfield[plate]
    before = residual_shading(np.ones_like(true), true)
    results = {}
    for method in ("cellprofiler", "basic"):
        # BaSiC on a 100-image sample (its fit dominates the time); its dark field is off, as
        # plate_illumination does for brightfield (undetermined at constant brightness)
        extra = {"darkfield": False, "max_images": 100} if method == "basic" else {}
        start = time.process_time()
        function = illumination_function(iter(planes), method=method, dark=CAMERA_OFFSET, **extra)
        results[method] = (residual_shading(function.flat, true), time.process_time() - start)
        assert function.n_images == min(len(planes), function.params["max_images"])
        assert np.all(function.dark == CAMERA_OFFSET)
        assert function.n_excluded == 0
    plain = residual_shading(illumination_function(iter(planes)).flat, true)
    print(f"\n{plate} brightfield, {len(planes)} planes: uncorrected {before:.4f}; "
          + "; ".join(f"{m} {r:.4f} ({t:.1f} CPU-s)" for m, (r, t) in results.items())
          + f"; cellprofiler without the camera offset {plain:.4f}")
    assert before > 0.25
    assert results["cellprofiler"][0] <= 0.02
    assert results["basic"][0] <= 0.02


@pytest.fixture(scope="module")
def demo_fluorescence() -> dict[tuple[str, str], tuple[list[np.ndarray], np.ndarray]]:
    """(plate, channel) -> every demo site's image of that fluorescence channel and its true flat
    field, for P1 (flat cells) and P2 (dense cells)."""
    out = {}
    for plate in ("P1", "P2"):
        sites = [simulate_site(DEMO, plate, well, site)
                 for well in plate_wells(DEMO.wells) for site in range(1, DEMO.sites + 1)]
        for channel in FLUORESCENCE:
            out[(plate, channel)] = ([s.images[(channel, 0)] for s in sites],
                                     plate_optics(DEMO, plate)[channel].flat)
    return out


@pytest.mark.parametrize("plate", ["P1", "P2"])
@pytest.mark.parametrize("channel", FLUORESCENCE)
def test_demo_fluorescence_residual_shading(demo_fluorescence, plate, channel):
    """The background average recovers each stain's field from its background (autofluorescence)
    on the 48 sites of a demo plate; the trimmed average of the cells' own signal cannot on the
    cell-body stain, whose mean over 48 sites still varies +-30 % at the field's scale."""
    images, true = demo_fluorescence[(plate, channel)]
    background = illumination_function(iter(images), dark=CAMERA_OFFSET, average="background")
    trimmed = illumination_function(iter(images), dark=CAMERA_OFFSET, average="trimmed")
    before = residual_shading(np.ones_like(true), true)
    after = residual_shading(background.flat, true)
    print(f"\n{plate} {channel}: uncorrected {before:.3f}, background {after:.4f}, "
          f"trimmed {residual_shading(trimmed.flat, true):.4f}")
    assert before > 0.2
    assert after <= 0.02
    if channel == "CYTO":
        assert residual_shading(trimmed.flat, true) > 0.2


@pytest.mark.parametrize("channel", ["DNA", "DAMAGE"])
def test_a_stain_with_no_background_gets_the_identity_and_a_reason(channel):
    """The demo's nuclear and foci stains with no autofluorescence, raw (offset 100, given) and as an
    offset-subtracted export (dark 0): nothing outside the cells samples the field, and the cells'
    own signal over 48 sites is far from it (an estimate's residual shading 1.2-11, against 0.3-0.5
    uncorrected). The screen goes on with the identity flat and says why; with the background, the
    estimate is kept and the split-half check records its margin."""
    sites = [simulate_site(DEMO, "P1", well, site, fluorescence=False)
             for well in plate_wells(DEMO.wells) for site in range(1, DEMO.sites + 1)]
    optics = plate_optics(DEMO, "P1")[channel]
    rng = np.random.default_rng(5)
    bare = dataclasses.replace(optics, background=0.0)
    raw = [add_noise(rng, s.clean[channel], bare) for s in sites]
    exported = [np.clip(image.astype(np.int32) - int(optics.dark), 0, None).astype(np.uint16)
                for image in raw]
    for images, dark in ((raw, optics.dark), (exported, 0.0)):
        function = illumination_function(iter(images), dark=dark, average="background", name=channel)
        assert "no flat field" in function.params["fallback"], function.params["split_half"]
        assert (function.flat == 1).all() and (function.dark == dark).all()
    lit = [add_noise(rng, s.clean[channel], optics) for s in sites]
    function = illumination_function(iter(lit), dark=optics.dark, average="background", name=channel)
    halves = function.params["split_half"]
    assert function.params["fallback"] == "" and residual_shading(function.flat, optics.flat) <= 0.02
    assert halves["disagreement"] < 0.25 * halves["shading"]


def test_camera_offset_from_the_darkest_areas():
    """Each channel's darkest level (its 4 x 4 means' 1st percentile) and the share of pixels below
    the offset, on the demo's stains at the camera offset (100) outside cells: the plate's darkest
    channel gives the offset (within 3 ADU); with it, about half the background lies below it and no
    check fires; 5 ADU too high, most pixels do and the check says so (the foci stain has no signal
    above it at all: the error names its darkest level); not given (dark 0), the
    report's camera-offset table says what the data show, and says nothing of an offset-subtracted
    export, which reaches 0. A stain with background bounds the offset only from above."""
    sites = [simulate_site(DEMO, "P1", well, site, fluorescence=False)
             for well in plate_wells(DEMO.wells)[:12] for site in range(1, DEMO.sites + 1)]
    rng = np.random.default_rng(7)
    functions = {}
    for channel in FLUORESCENCE:
        optics = plate_optics(DEMO, "P1")[channel]
        bare = dataclasses.replace(optics, background=0.0) if channel != "CYTO" else optics
        images = [add_noise(rng, s.clean[channel], bare) for s in sites]
        exported = [np.clip(i.astype(np.int32) - int(optics.dark), 0, None).astype(np.uint16) for i in images]
        functions[(channel, "exported")] = illumination_function(iter(exported), name=channel)
        for dark in (0.0, optics.dark, optics.dark + 5):
            if channel == "DAMAGE" and dark > optics.dark:  # sparse foci: no signal above it at all
                with pytest.raises(ValueError, match=r"darkest areas are at 9\d\.\d+: is illumination"):
                    illumination_function(iter(images), dark=dark, name=channel)
                continue
            functions[(channel, dark)] = illumination_function(iter(images), dark=dark, name=channel)
    offset = plate_optics(DEMO, "P1")["DNA"].dark
    levels = {c: functions[(c, offset)].params["darkest_level"] for c in FLUORESCENCE}
    print("\ndarkest levels", {c: round(v, 1) for c, v in levels.items()},
          {k: (round(f.params["darkest_level"], 2), round(f.params["below_dark_fraction"], 2))
           for k, f in functions.items()})
    channel, level = camera_offset_estimate(levels)
    assert channel in ("DNA", "DAMAGE") and abs(level - offset) <= 3  # measured 1.7 below
    assert levels["CYTO"] > offset + 5  # its background: an upper bound only
    for c in ("DNA", "DAMAGE"):
        right = functions[(c, offset)].params
        assert 0.2 <= right["below_dark_fraction"] <= DARK_ABOVE_DATA and right["offset_check"] == ""
    high = functions[("DNA", offset + 5)].params
    assert high["below_dark_fraction"] > DARK_ABOVE_DATA and "above most pixels" in high["offset_check"]
    assert functions[("CYTO", offset)].params["below_dark_fraction"] < 0.05
    def table(key):
        return pd.DataFrame([{"channel": c, "dark": 0.0, "offset_check": "", **{
            k: functions[(c, key)].params[k] for k in ("darkest_level", "below_dark_fraction")}}
            for c in FLUORESCENCE])
    shown = report.camera_offset_table(table(0.0)).iloc[0]
    assert abs(shown["offset_at_most"] - offset) <= 3 and "set illumination.dark" in shown["note"]
    assert report.camera_offset_table(table(offset).assign(dark=offset)).iloc[0]["note"] == ""
    # an offset-subtracted export (dark 0 is right): its darkest areas a fraction of an ADU above 0,
    # a good share of its pixels at 0: no note
    shown = report.camera_offset_table(table("exported")).iloc[0]
    assert shown["offset_at_most"] < 1 and shown["note"] == ""


def test_background_average_ignores_the_blocks_own_noise():
    """A uniform background under a known field, in pure Poisson noise: choosing each block's own
    darkest values biases dim blocks low (here by several %), choosing by the neighbours does not."""
    rng = np.random.default_rng(0)
    true = flat_field(128, (0.45, 0.55), 0.6)
    images = [rng.poisson(30.0 * true).astype(np.uint16) for _ in range(200)]
    function = illumination_function(iter(images), average="background", background_fraction=0.15)
    ours = residual_shading(function.flat, true)
    blocks = np.stack([im.reshape(64, 2, 64, 2).mean(axis=(1, 3)) for im in images])
    darkest = np.sort(blocks, axis=0)[:30].mean(axis=0)  # each block's own darkest 15 %
    true_blocks = true.reshape(64, 2, 64, 2).mean(axis=(1, 3))
    smoothed = ndimage.gaussian_filter(darkest / darkest.mean() / (true_blocks / true_blocks.mean()), 4)
    naive = float(np.ptp(smoothed))
    print(f"\nbackground average {ours:.4f}; each block's own darkest values {naive:.4f}")
    assert ours <= 0.02
    assert naive > 2 * ours


def test_blank_saturated_and_nan_images_do_not_dominate(demo_brightfield):
    planes, true = demo_brightfield["P1"]
    planes = planes[::5]  # one plane per site: 48 images
    shape = true.shape
    zero = np.zeros(shape, np.uint16)
    constant = np.full(shape, 100, np.uint16)
    dark_only = (CAMERA_OFFSET + np.random.default_rng(1).normal(0, 4, shape)).astype(np.uint16)
    saturated = planes[0].copy()
    saturated[: shape[0] * 3 // 4] = 65535  # 75 % saturated: excluded
    patch = planes[1].copy()
    patch[:40, :40] = 65535  # a saturated patch: masked, the image kept
    debris = planes[2].copy()
    debris[100:140, 100:140] = 60000  # bright debris: clipped / trimmed away
    nan = planes[3].astype(np.float32)
    nan[5, 5] = np.nan
    bad = [zero, constant, dark_only, dark_only, saturated, nan]
    stream = [*planes[4:], patch, debris, *bad]
    function = illumination_function(iter(stream), dark=CAMERA_OFFSET, name="BF")
    assert function.params["excluded"] == {"blank (constant image)": 2, "saturated": 1,
                                           "non-finite pixels": 1, "nearly empty": 2}
    assert function.n_excluded == 6 and function.n_images == len(planes) - 4 + 2
    reference = illumination_function(iter(planes[4:]), dark=CAMERA_OFFSET)
    shading = residual_shading(function.flat, true)
    print(f"\nwith 6 bad images + a saturated patch + debris: {shading:.4f}, "
          f"clean images only: {residual_shading(reference.flat, true):.4f}")
    assert shading <= 0.02
    # plain mean average without clipping: the debris shows (the robust defaults are needed), and the
    # split-half check, which sees it in one half only, falls back to the identity
    naive = dict(dark=CAMERA_OFFSET, average="mean", clip_percentile=None, smoothing="none")
    clean = illumination_function(iter(planes[4:]), **naive)
    assert clean.params["fallback"] == ""
    spoiled = illumination_function(iter([*planes[4:], debris]), **naive)
    assert "no flat field" in spoiled.params["fallback"] and (spoiled.flat == 1).all()
    assert spoiled.params["split_half"]["disagreement"] > 5 * clean.params["split_half"]["disagreement"]


def test_no_usable_image_names_the_channel():
    with pytest.raises(ValueError, match=r"DNA: no usable image .*3 blank"):
        illumination_function(iter([np.zeros((32, 32), np.uint16)] * 3), name="DNA")
    with pytest.raises(ValueError, match="no usable image"):
        illumination_function(iter([]), name="DNA")
    nan = np.full((32, 32), np.nan, np.float32)
    with pytest.raises(ValueError, match=r"CYTO: no usable image .*2 non-finite"):
        illumination_function(iter([nan, nan]), name="CYTO")
    with pytest.raises(ValueError, match="CYTO: image 1 has non-finite pixels"):
        illumination_function(iter([np.ones((32, 32)) + np.eye(32), nan]), name="CYTO",
                              on_nonfinite="error")
    with pytest.raises(ValueError, match="dark offset"):  # a dark offset above every signal
        illumination_function(iter([np.full((32, 32), 50, np.uint16) + np.eye(32, dtype=np.uint16)] * 3),
                              dark=100.0, name="DNA", min_signal=0.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "cellpose"}, "method"), ({"smoothing": "boxcar"}, "smoothing"),
    ({"average": "mode"}, "average"), ({"colour": 1}, "unknown parameter"),
    ({"working_size": 1}, "working_size"), ({"method": "basic", "degree": 2}, "unknown parameter"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        illumination_function(iter([np.eye(16)]), **kwargs)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match=r"image 1 has shape \(8, 8\)"):
        illumination_function(iter([np.eye(16), np.eye(8)]))
    with pytest.raises(ValueError, match="2-D"):
        illumination_function(iter([np.ones((2, 16, 16))]))
    function = illumination_function(iter([np.eye(16) + 1] * 3))
    with pytest.raises(ValueError, match="does not match"):
        correct_illumination(np.ones((8, 8)), function)


def test_memory_is_bounded_by_a_reservoir_sample():
    rng = np.random.default_rng(0)
    images = (rng.poisson(100 + 50 * np.linspace(0, 1, 64)[None], (64, 64)).astype(np.uint16)
              for _ in range(50))
    function = illumination_function(images, max_images=10, working_size=16)
    assert function.n_images == 10 and function.params["n_usable"] == 50
    assert function.params["grid"] == [16, 16]
    assert function.flat[:, -1].mean() > function.flat[:, 0].mean()  # the gradient is found


def test_correct_save_load_round_trip(tmp_path):
    flat = np.linspace(0.5, 1.5, 64 * 48, dtype=np.float32).reshape(64, 48)
    function = IlluminationFunction(flat, np.full(flat.shape, 10, np.float32), "cellprofiler", 5, 1,
                                    {"dark": 10.0, "excluded": {"blank (constant image)": 1}})
    image = np.rint(10 + 200 * flat).astype(np.uint16)
    corrected = correct_illumination(image, function)
    assert corrected.dtype == np.float32 and np.allclose(corrected, 200, atol=1.01)
    save_illumination(function, tmp_path / "f.npy", tmp_path / "f.png", tmp_path / "f.json")
    assert np.load(tmp_path / "f.npy").shape == (2, 64, 48)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_illumination(tmp_path / "f.npy")
    np.testing.assert_array_equal(loaded.flat, function.flat)
    np.testing.assert_array_equal(loaded.dark, function.dark)
    assert (loaded.method, loaded.n_images, loaded.n_excluded) == ("cellprofiler", 5, 1)
    assert loaded.params["excluded"] == {"blank (constant image)": 1}
    save_illumination(function, tmp_path / "g.npy")  # the .npy alone is enough to load
    assert load_illumination(tmp_path / "g.npy").method == "unknown"
    np.save(tmp_path / "bad.npy", flat)
    with pytest.raises(ValueError, match=r"\(2, Y, X\)"):
        load_illumination(tmp_path / "bad.npy")


# --- plate stores -------------------------------------------------------------------------------


def _ingest(screen: Path, store: Path):
    images, _ = validate_plate(str(screen / "T1" / "manifest.csv"), str(screen / "T1" / "platemap.csv"),
                               "T1", "train", CHANNELS, str(screen), "error")
    layout = plan_layout(images, "T1", CHANNELS)
    shard = store.with_name("shard.zarr")
    write_shard_store(images, sorted(set(images["well"])), layout, shard, root=screen)
    assemble_plate_store([shard], store, layout)
    return images, layout


def test_plate_illumination_streams_the_store(tiny_screen, tmp_path):
    store = tmp_path / "T1.zarr"
    images, layout = _ingest(tiny_screen, store)
    sites = stored_sites(store)
    assert len(sites) == TINY_SPEC.wells * TINY_SPEC.sites
    bf = plate_illumination(store, layout, "BF")
    assert bf.flat.shape == (TINY_SPEC.size, TINY_SPEC.size) and bf.flat.dtype == np.float32
    assert bf.n_images == len(sites) * TINY_SPEC.z_planes and bf.params["planes"] == [0, 1, 2, 3, 4]
    assert abs(float(bf.flat.mean()) - 1) < 1e-4
    save_illumination(bf, tmp_path / "BF.npy", tmp_path / "BF.png", tmp_path / "BF.json")
    loaded = load_illumination(tmp_path / "BF.npy")
    assert loaded.params["plate"] == "T1" and loaded.params["channel"] == "plate T1, channel BF"
    np.testing.assert_array_equal(loaded.flat, bf.flat)
    middle = plate_illumination(store, layout, "BF", planes="middle", max_sites=5)
    assert middle.n_images == 5 and middle.params["planes"] == [2]
    wells = sorted(set(images["well"]))[:2]
    dna = plate_illumination(store, layout, "DNA", wells=wells)
    assert dna.n_images == 2 * TINY_SPEC.sites and dna.params["planes"] == [0]
    basic = plate_illumination(store, layout, "BF", method="basic", planes="middle", max_sites=4)
    assert basic.params["darkfield"] is False  # brightfield: BaSiC's dark field is off
    with pytest.raises(ValueError, match="not in the store"):
        plate_illumination(store, layout, "GFP")
    with pytest.raises(ValueError, match="channel BF: no usable image .*no images given"):
        plate_illumination(store, layout, "BF", wells=["P24"])  # a well the store lacks

    # a channel whose sites are all zero
    c = layout.channels.index("CYTO")
    for well, site in sites:
        row, column = well_row_column(well)
        array = zarr.open_array(str(store / row / column / field_path(site) / "0"), mode="r+")
        array[0, c, 0] = 0
    with pytest.raises(ValueError, match="plate T1, channel CYTO: no usable image"):
        plate_illumination(store, layout, "CYTO")


# --- real data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_images() -> tuple[list[Path], list[np.ndarray]]:
    """The 72 vignetted GFP images of CellProfiler's illumination-correction example."""
    folder = shared_data("cp-example-illumcorr") / "ExampleIlluminationCorrection" / "images"
    files = sorted(folder.glob("AS_09047_*.TIF"))
    if len(files) != 72:
        pytest.skip(f"expected 72 AS_09047_*.TIF images in {folder}, found {len(files)}")
    return files, [tifffile.imread(f) for f in files]


def test_real_vignetting_is_removed(example_images, tmp_path):
    """72 real GFP images with strong vignetting: corner / centre of the median projection (32 x 32
    px corners, central 32 x 32 px square) goes from ~0.54 to within 5 % of 1."""
    _, images = example_images
    before = corner_centre(np.median(np.stack(images), axis=0))
    ratios = {}
    for method, extra in (("cellprofiler", {}), ("basic", {"darkfield": False})):
        function = illumination_function(iter(images), method=method, **extra)
        corrected = np.median(np.stack([correct_illumination(i, function) for i in images]), axis=0)
        ratios[method] = corner_centre(corrected)
        save_illumination(function, tmp_path / f"{method}.npy", tmp_path / f"{method}.png")
    print(f"\ncp-example corner/centre of the median projection: raw {before:.3f}, corrected "
          + ", ".join(f"{m} {r:.3f}" for m, r in ratios.items()))
    assert before < 0.6
    assert abs(ratios["cellprofiler"] - 1) <= 0.05


@pytest.mark.cellprofiler
def test_agrees_with_cellprofiler(example_images, tmp_path):
    """CellProfiler 5's CorrectIlluminationCalculate (Regular, All, median filter of size 128,
    rescale Median), run as a pipeline built with CellProfiler's API on the same 72 images, against
    the same settings here (average "mean", smoothing "median", size 128) and against the
    defaults."""
    files, images = example_images
    if not CP_PYTHON.exists():
        pytest.skip(f"{CP_PYTHON} absent: build it with `make env-cellprofiler`")
    out = tmp_path / "cellprofiler_illum.npy"
    result = subprocess.run([str(CP_PYTHON), str(CP_SCRIPT), str(out), *map(str, files),
                             "--smoothing", "Median Filter", "--size", "128"],
                            capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                 "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    reference = np.load(out)
    mirrored = illumination_function(iter(images), average="mean", smoothing="median", size=128)
    default = illumination_function(iter(images))
    r_mirrored = np.corrcoef(mirrored.flat.ravel(), reference.ravel())[0, 1]
    r_default = np.corrcoef(default.flat.ravel(), reference.ravel())[0, 1]
    print(f"\nPearson r with CellProfiler 5: same settings {r_mirrored:.4f}, defaults {r_default:.4f}")
    assert reference.shape == mirrored.flat.shape
    assert r_mirrored > 0.99 and r_default > 0.95


def test_demo_run_recovers_every_true_field(demo_run):
    """The default workflow's functions (brightfield: trimmed average; fluorescence: background
    average; the demo camera's offset in the config) against the generator's fields, for every
    plate and channel of the demo screen."""
    truth = demo_run / "results" / "demo" / "screen" / "truth"
    results = {}
    for plate_dir in sorted((demo_run / "results" / "plates").iterdir()):
        for npy in sorted((plate_dir / "illum").glob("*.npy")):
            function = load_illumination(npy)
            true = np.load(truth / plate_dir.name / f"flatfield_{npy.stem}.npy")
            results[(plate_dir.name, npy.stem)] = residual_shading(function.flat, true)
    print("\nresidual shading of the demo run's functions:",
          ", ".join(f"{p} {c} {r:.4f}" for (p, c), r in results.items()))
    assert len(results) == 4 + 3 * 3  # brightfield on every plate, three stains on P1-P3
    assert max(results.values()) <= 0.02
