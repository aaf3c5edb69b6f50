"""Noise2Void (brightpaint.denoise): accuracy against the demo generator's clean truth, determinism,
tiled inference, save / load, device choice, bad inputs, and training images from a plate store.

Accuracy is measured on the demo's own fluorescence (`simulate_site`: a short HTS exposure, tens of
photons per clean unit plus a uniform autofluorescence background, the widefield PSF, the plate's
flat field, dark offset and batch factor). The reference is the noise-free image in clean units:
the clean truth plus the background (which the camera records too and the denoiser must keep).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time

import numpy as np
import pytest
import tifffile
import torch
from conftest import CHANNELS, TEST_THREADS
from scipy import ndimage

from brightpaint.demo.camera import add_noise, plate_optics
from brightpaint.demo.site import simulate_site
from brightpaint.demo.spec import PlateSpec, ScreenSpec
from brightpaint.demo.treatments import plate_wells
from brightpaint.denoise import (
    assess_denoising,
    build_model,
    choose_assessment_sites,
    choose_training_sites,
    denoise_if_assessed,
    denoise_image,
    load_n2v,
    noise_variance,
    read_training_images,
    sample_training_images,
    save_n2v,
    train_n2v,
)
from brightpaint.illumination import correct_illumination, load_illumination
from brightpaint.inference import resolve_device, tile_starts
from brightpaint.ingest import (
    StoreLayout,
    assemble_plate_store,
    plan_layout,
    read_field,
    read_plane,
    read_store_layout,
    stored_sites,
    write_shard_store,
)
from brightpaint.validate import validate_plate

SPEC = ScreenSpec(plates=(PlateSpec("P1", "B1", "flat", "train"), PlateSpec("P2", "B2", "dense", "train")),
                  wells=8, sites=1, size=128, seed=0)
STEPS = 300  # CI-sized training: batch 16 of 64 x 64 patches
SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 4.0)  # grid of the oracle Gaussian


@dataclasses.dataclass
class Example:
    noisy: np.ndarray  # uint16 ADU
    clean: np.ndarray  # float32 noise-free image in clean units: truth + background
    dark: float
    scale: np.ndarray  # gain * flat * batch: ADU per clean unit

    def to_clean(self, adu: np.ndarray) -> np.ndarray:
        """ADU -> the clean image's scale."""
        return (adu.astype(np.float32) - self.dark) / self.scale


def demo_examples(channel: str) -> list[Example]:
    """16 noisy demo sites (8 wells of a flat and a dense plate) of one channel, as the demo
    generator acquires them."""
    examples = []
    for plate in ("P1", "P2"):
        optics = plate_optics(SPEC, plate)[channel]
        for well in plate_wells(SPEC.wells):
            site = simulate_site(SPEC, plate, well, 1)
            examples.append(Example(site.images[(channel, 0)],
                                    site.clean[channel] + np.float32(optics.background),
                                    optics.dark, optics.gain * optics.flat * optics.batch_factor))
    return examples


def psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    """PSNR in dB with data range = the noise-free image's maximum."""
    return float(10 * np.log10(clean.max() ** 2 / np.mean((estimate - clean) ** 2)))


def pcc(estimate: np.ndarray, clean: np.ndarray) -> float:
    return float(np.corrcoef(estimate.ravel(), clean.ravel())[0, 1])


def mean_scores(estimates: list[np.ndarray], examples: list[Example]) -> tuple[float, float]:
    """Mean PSNR and mean PCC of clean-scale estimates over the examples."""
    return (float(np.mean([psnr(e, x.clean) for e, x in zip(estimates, examples, strict=True)])),
            float(np.mean([pcc(e, x.clean) for e, x in zip(estimates, examples, strict=True)])))


def best_gaussian(examples: list[Example]) -> tuple[float, float, float]:
    """The oracle Gaussian: the sigma of SIGMAS with the best mean PSNR against the truth."""
    scores = []
    for sigma in SIGMAS:
        smoothed = [x.to_clean(ndimage.gaussian_filter(x.noisy.astype(np.float32), sigma))
                    for x in examples]
        scores.append((*mean_scores(smoothed, examples), sigma))
    return max(scores)


@pytest.fixture(scope="module")
def trained() -> dict:
    """Channel -> (examples, model, history), trained once on the noisy images only."""
    out = {}
    for channel in ("DNA", "CYTO"):
        examples = demo_examples(channel)
        model, history = train_n2v([x.noisy for x in examples], steps=STEPS, seed=0, threads=TEST_THREADS,
                                   channel=channel)
        out[channel] = (examples, model, history)
    return out


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["DNA", "CYTO"])
def test_n2v_beats_noisy_input_and_the_oracle_gaussian(trained, channel):
    examples, model, history = trained[channel]
    start = time.perf_counter()
    denoised = [x.to_clean(denoise_image(model, x.noisy, threads=TEST_THREADS)) for x in examples]
    infer_s = (time.perf_counter() - start) / len(examples)
    noisy_psnr, noisy_pcc = mean_scores([x.to_clean(x.noisy) for x in examples], examples)
    n2v_psnr, n2v_pcc = mean_scores(denoised, examples)
    gauss_psnr, gauss_pcc, sigma = best_gaussian(examples)
    print(f"\n{channel}: noisy {noisy_psnr:.2f} dB (PCC {noisy_pcc:.3f}), best Gaussian sigma {sigma} "
          f"{gauss_psnr:.2f} dB (PCC {gauss_pcc:.3f}), N2V {n2v_psnr:.2f} dB (PCC {n2v_pcc:.3f}); "
          f"training {STEPS} steps {history['seconds']:.1f} s, inference {infer_s:.3f} s per 128 px image")
    assert n2v_psnr >= noisy_psnr + 6
    assert n2v_psnr > gauss_psnr
    assert n2v_pcc > noisy_pcc
    assert n2v_pcc > gauss_pcc - 0.005  # no structure removed beyond what the best blur removes
    assert history["loss"][-1] < history["loss"][0]
    assert len(history["loss"]) == STEPS


def test_denoised_output_keeps_the_input_scale(trained):
    examples, model, _ = trained["DNA"]
    noisy = examples[0].noisy
    out = denoise_image(model, noisy, threads=TEST_THREADS)
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert abs(float(out.mean()) - float(noisy.mean())) < 0.05 * float(noisy.std())


# ---------------------------------------------------------------------------------------------
# Tiled inference
# ---------------------------------------------------------------------------------------------


def test_tiled_inference_equals_whole_image_inference(trained):
    examples, model, _ = trained["DNA"]
    # a 256 x 320 image from five 128 px sites (plus a strip), larger than the 96 px tiles
    rows = [np.hstack([examples[i].noisy, examples[i + 1].noisy, examples[i + 2].noisy[:, :64]])
            for i in (0, 3)]
    image = np.vstack(rows).astype(np.float32)
    whole = denoise_image(model, image, tile=512, overlap=0, threads=TEST_THREADS)
    tiled = denoise_image(model, image, tile=96, overlap=32, threads=TEST_THREADS)
    difference = np.abs(tiled - whole)
    spread = float(image.std())
    # measured: mean 3e-4, 99.9th percentile 7e-3, max 1.8e-2 of the image's std (the U-Net sees
    # zero padding within 17 px of a tile edge, where the raised-cosine blend gives it little weight)
    assert float(difference.mean()) < 1e-3 * spread
    assert float(np.percentile(difference, 99.9)) < 1.5e-2 * spread
    assert float(difference.max()) < 4e-2 * spread
    assert float(np.abs(whole - image).mean()) > 50 * float(difference.mean())  # it did denoise


def test_tile_starts_cover_the_image_with_the_overlap():
    assert tile_starts(100, 256, 32) == [0]
    starts = tile_starts(1000, 256, 32)
    assert starts[0] == 0 and starts[-1] == 1000 - 256
    assert all(b - a <= 256 - 32 for a, b in zip(starts, starts[1:], strict=False))


def test_denoise_rejects_bad_images(trained):
    _, model, _ = trained["DNA"]
    with pytest.raises(ValueError, match="2-D"):
        denoise_image(model, np.zeros((2, 64, 64), np.float32))
    image = np.ones((64, 64), np.float32)
    image[3, 4] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        denoise_image(model, image)
    with pytest.raises(ValueError, match="overlap 64"):
        denoise_image(model, np.ones((64, 64), np.float32), tile=64, overlap=64)


# ---------------------------------------------------------------------------------------------
# Determinism, save / load
# ---------------------------------------------------------------------------------------------


def small_training_set() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    signal = ndimage.gaussian_filter(rng.uniform(0, 400, (96, 96)), 2)
    return [rng.poisson(signal + 100).astype(np.uint16) for _ in range(3)]


def test_same_seed_gives_identical_weights_on_cpu():
    images = small_training_set()
    kwargs = dict(steps=6, patch=32, batch=4, threads=1, channel="T")
    first, history_first = train_n2v(images, seed=3, **kwargs)
    second, history_second = train_n2v(images, seed=3, **kwargs)
    other, _ = train_n2v(images, seed=4, **kwargs)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert history_first["loss"] == history_second["loss"]
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


def test_training_leaves_torch_threads_and_random_state_alone():
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    train_n2v(small_training_set(), steps=2, patch=32, batch=2, threads=1, channel="T")
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)


def test_save_load_round_trip(trained, tmp_path):
    examples, model, history = trained["DNA"]
    path = tmp_path / "models" / "n2v_DNA.pt"
    sites = [["C03", 1], ["C07", 1]]
    saved = save_n2v(model, path, {"plates": ["P1", "P2"], "sites": sites})
    assert saved["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for key in ("channel", "steps", "final_loss", "normalisation", "code_version", "torch_version",
                "plates", "sites", "seed", "mask_fraction"):
        assert key in saved, key
    assert saved["channel"] == "DNA" and saved["steps"] == STEPS
    assert saved["final_loss"] == pytest.approx(history["final_loss"])
    assert saved["torch_version"] == torch.__version__

    raw = torch.load(path, weights_only=True)  # plain tensors and strings only
    assert set(raw) == {"format", "state_dict", "metadata"}

    loaded, metadata = load_n2v(path)
    assert metadata == saved
    assert metadata["sites"] == sites
    image = examples[1].noisy
    assert np.array_equal(denoise_image(model, image), denoise_image(loaded, image))
    assert not list(path.parent.glob(".*partial*"))


def test_load_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a brightpaint Noise2Void model"):
        load_n2v(path)


def test_save_rejects_metadata_that_is_not_json(trained, tmp_path):
    _, model, _ = trained["DNA"]
    with pytest.raises(ValueError, match="JSON"):
        save_n2v(model, tmp_path / "m.pt", {"bad": object()})
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_an_error_not_a_cpu_fallback():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        train_n2v(small_training_set(), steps=1, patch=32, batch=2, device="cuda", channel="T")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        denoise_image(build_model(2, 16, 0), np.ones((64, 64), np.float32), device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_auto_device_is_cpu_without_a_gpu_and_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="brightpaint"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "torch device: cpu (CPU; requested 'auto')" in caplog.text


def test_unknown_device_is_an_error():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not one of"):
        resolve_device("tpu")


# ---------------------------------------------------------------------------------------------
# Bad training input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 417])
def test_constant_images_have_no_signal_to_learn_from(value):
    images = [np.full((64, 64), value, np.uint16) for _ in range(3)]
    with pytest.raises(ValueError, match="no signal to learn from: channel DNA"):
        train_n2v(images, steps=1, channel="DNA")


def test_nan_pixels_are_named():
    images = small_training_set()
    images[1] = images[1].astype(np.float32)
    images[1][5, 5:8] = np.nan
    with pytest.raises(ValueError, match="image 1 has 3 NaN"):
        train_n2v(images, steps=1, patch=32, channel="DNA")


def test_images_smaller_than_the_patch_are_an_error():
    with pytest.raises(ValueError, match="smaller than the training patch 64"):
        train_n2v([np.ones((48, 200), np.float32)], steps=1, patch=64, channel="DNA")


def test_a_constant_image_among_good_ones_is_left_out(caplog):
    images = [*small_training_set(), np.zeros((96, 96), np.uint16)]
    with caplog.at_level(logging.WARNING, logger="brightpaint"):
        _, history = train_n2v(images, steps=2, patch=32, batch=2, threads=1, channel="DNA")
    assert history["n_images"] == 3 and history["n_images_skipped"] == 1
    assert "image 3 is constant" in caplog.text


@pytest.mark.parametrize("bad", [dict(steps=0), dict(patch=30), dict(batch=0), dict(mask_fraction=0.0),
                                 dict(threads=0)])
def test_bad_training_parameters_are_errors(bad):
    with pytest.raises(ValueError):
        train_n2v(small_training_set(), channel="T", **{"patch": 32, "steps": 1, **bad})


# ---------------------------------------------------------------------------------------------
# Training images from a plate store
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def plate_store(tiny_screen, tmp_path):
    """The tiny screen's plate T1 ingested into an OME-Zarr store; returns (store, layout, wells)."""
    images, _ = validate_plate(str(tiny_screen / "T1" / "manifest.csv"),
                               str(tiny_screen / "T1" / "platemap.csv"), "T1", "train", CHANNELS,
                               str(tiny_screen))
    layout = plan_layout(images, "T1", CHANNELS)
    shard = tmp_path / "shard.zarr"
    write_shard_store(images, sorted(set(images["well"])), layout, shard, root=tiny_screen)
    store = tmp_path / "images.zarr"
    assemble_plate_store([shard], store, layout)
    return store, layout, sorted(set(images["well"]))


def test_sample_training_images_streams_a_bounded_seeded_sample(plate_store):
    store, layout, wells = plate_store
    sites = choose_training_sites(store, wells, max_sites=5, seed=1)
    assert len(sites) == 5 == len(set(sites)) and sites == sorted(sites)
    images = sample_training_images(store, layout, "DNA", wells, max_sites=5, seed=1)
    assert len(images) == 5
    c, z = layout.channels.index("DNA"), layout.planes["DNA"][0]
    for (well, site), image in zip(sites, images, strict=True):
        assert image.dtype == np.float32 and image.shape == tuple(layout.shape)
        assert np.array_equal(image, read_field(store, well, site)[0, c, z])
    again = sample_training_images(store, layout, "DNA", wells, max_sites=5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(images, again, strict=True))
    everything = choose_training_sites(store, wells, max_sites=1000)
    assert len(everything) == 2 * len(wells)  # TINY_SPEC: 2 sites per well


def test_sample_training_images_applies_the_correction(plate_store):
    store, layout, wells = plate_store
    plain = sample_training_images(store, layout, "CYTO", wells[:2], max_sites=3)
    corrected = sample_training_images(store, layout, "CYTO", wells[:2], max_sites=3,
                                       correct=lambda plane: plane / 2 + 1)
    assert all(np.allclose(b, a / 2 + 1) for a, b in zip(plain, corrected, strict=True))
    with pytest.raises(ValueError, match="correct: returned shape"):
        read_training_images(store, layout, "CYTO", [(wells[0], 1)], correct=lambda p: p[:10])


def test_sample_training_images_names_what_is_missing(plate_store):
    store, layout, wells = plate_store
    with pytest.raises(ValueError, match="channel 'GFP' is not in plate T1"):
        sample_training_images(store, layout, "GFP", wells)
    with pytest.raises(ValueError, match="well\\(s\\) P24 are not in the store"):
        sample_training_images(store, layout, "DNA", ["P24"])
    with pytest.raises(ValueError, match="planes; say which z"):
        sample_training_images(store, layout, "BF", wells)
    bf = sample_training_images(store, layout, "BF", wells, max_sites=2, z=2)
    assert len(bf) == 2


def test_demo_run_denoised_stains_beat_their_noisy_input(demo_run):
    """The default workflow's Noise2Void stores (a model per plate and stain, trained on the plate's
    own noisy images) against the generator's truth, on the first 12 sites of every plate with
    stains: >= 6 dB over the illumination-corrected input, and a higher PCC."""
    results = demo_run / "results"
    truth = results / "demo" / "screen" / "truth"
    plates = sorted(p.parent for p in (results / "plates").glob("*/denoised.zarr"))
    assert [p.name for p in plates] == ["P1", "P2", "P3"]  # the plates with stains
    report = []
    for plate_dir in plates:
        plate = plate_dir.name
        layout = StoreLayout.from_json((plate_dir / "ingest" / "layout.json").read_text())
        denoised_layout = read_store_layout(plate_dir / "denoised.zarr")
        optics = json.loads((truth / plate / "illumination.json").read_text())["channels"]
        assert set(denoised_layout.channels) == {"DNA", "CYTO", "DAMAGE"}
        for channel in denoised_layout.channels:
            function = load_illumination(plate_dir / "illum" / f"{channel}.npy")
            scale = optics[channel]["gain"] * optics[channel]["batch_factor"]  # ADU per clean unit
            scores = {"noisy": [], "n2v": []}
            for well, site in stored_sites(plate_dir / "images.zarr")[:12]:
                clean = tifffile.imread(truth / plate / "clean" / f"{well}_s{site}_{channel}.tif")
                reference = clean + np.float32(optics[channel]["background"])
                raw = read_plane(plate_dir / "images.zarr", well, site, layout.channels.index(channel), 0)
                denoised = read_plane(plate_dir / "denoised.zarr", well, site,
                                      denoised_layout.channels.index(channel), 0)
                corrected = correct_illumination(raw, function)
                scores["noisy"].append((psnr(corrected / scale, reference), pcc(corrected, reference)))
                scores["n2v"].append((psnr(denoised.astype(np.float32) / scale, reference),
                                      pcc(denoised, reference)))
            (noisy_db, noisy_r), (n2v_db, n2v_r) = (np.mean(scores[k], axis=0) for k in ("noisy", "n2v"))
            report.append(f"{plate} {channel} {noisy_db:.1f} -> {n2v_db:.1f} dB")
            assert n2v_db >= noisy_db + 6, report[-1]
            assert n2v_r > noisy_r, report[-1]
    print("\ndemo run, Noise2Void against the truth:", "; ".join(report))


# ---------------------------------------------------------------------------------------------
# Does it help? Decided from the data (Noise2Self's argument), checked against the truth
# ---------------------------------------------------------------------------------------------


def test_noise_variance_of_known_noise():
    """Gaussian and Poisson noise on a smooth ramp with sharp-edged blobs: the edges do not count."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:256, :256].astype(np.float32)
    signal = 200 + 0.5 * x + 0.3 * y
    signal[(y % 64 < 20) & (x % 64 < 20)] += 300  # sharp squares: an edge filter's worst case
    gaussian = signal + rng.normal(0, 4.0, signal.shape)
    assert noise_variance(gaussian) == pytest.approx(16.0, rel=0.1)
    poisson = rng.poisson(signal).astype(np.float32)
    assert noise_variance(poisson) == pytest.approx(float(signal.mean()), rel=0.15)
    assert noise_variance(signal) < 0.01


def held_out_examples(channel: str, gain_factor: float) -> list[Example]:
    """4 demo sites the `trained` models never saw (another seed), optionally brighter."""
    spec = dataclasses.replace(SPEC, seed=1)
    rng = np.random.default_rng(3)
    examples = []
    for well in plate_wells(spec.wells)[:4]:
        site = simulate_site(spec, "P1", well, 1, fluorescence=False)
        optics = plate_optics(spec, "P1")[channel]
        optics = dataclasses.replace(optics, gain=optics.gain * gain_factor)
        examples.append(Example(add_noise(rng, site.clean[channel], optics),
                                site.clean[channel] + np.float32(optics.background), optics.dark,
                                optics.gain * optics.flat * optics.batch_factor))
    return examples


def true_gain_db(model, examples: list[Example]) -> float:
    noisy = np.mean([np.mean((x.to_clean(x.noisy) - x.clean) ** 2) for x in examples])
    denoised = np.mean([np.mean((x.to_clean(denoise_image(model, x.noisy, threads=TEST_THREADS))
                                 - x.clean) ** 2) for x in examples])
    return float(10 * np.log10(noisy / denoised))


def test_assessment_applies_noise2void_where_it_helps_and_keeps_bright_stains(trained):
    """The demo's dim DNA stain gains (apply); the same stain at 64x the light loses pixel-scale
    detail under Noise2Void (keep the input): the estimate, from the noisy images alone, tells the
    two apart as the truth does."""
    _, model, _ = trained["DNA"]  # trained on the raw noisy images, as it is assessed
    dim = held_out_examples("DNA", 1)
    assessed = assess_denoising(model, [x.noisy.astype(np.float32) for x in dim], threads=TEST_THREADS)
    dim_true = true_gain_db(model, dim)
    print(f"\nDNA as acquired: estimated {assessed['estimated_gain_db']:+.1f} dB, true {dim_true:+.1f} dB")
    assert assessed["apply"] and assessed["estimated_gain_db"] >= 3, assessed
    assert dim_true >= 6

    bright = held_out_examples("DNA", 64)
    training = [x.noisy for x in demo_examples_bright("DNA", 64)]
    bright_model, _ = train_n2v(training, steps=STEPS, seed=0, threads=TEST_THREADS, channel="DNA")
    assessed = assess_denoising(bright_model, [x.noisy.astype(np.float32) for x in bright],
                                threads=TEST_THREADS)
    bright_true = true_gain_db(bright_model, bright)
    print(f"DNA at 64x the light: estimated {assessed['estimated_gain_db']:+.1f} dB, "
          f"true {bright_true:+.1f} dB")
    assert not assessed["apply"] and assessed["estimated_gain_db"] < 0, assessed
    assert bright_true < 0
    assert assessed["n_images"] == 4 and assessed["noise_variance"] > 0

    # large sites: only each image's centre is assessed, so the cost does not grow with the site
    images = [x.noisy.astype(np.float32) for x in dim]
    height, width = images[0].shape
    rows = slice((height - 48) // 2, (height - 48) // 2 + 48)
    columns = slice((width - 40) // 2, (width - 40) // 2 + 40)
    assert (assess_denoising(model, [image[:, columns] for image in images], threads=TEST_THREADS, side=48)
            == assess_denoising(model, [image[rows, columns] for image in images], threads=TEST_THREADS))


def demo_examples_bright(channel: str, gain_factor: float) -> list[Example]:
    """The `trained` fixture's 16 training sites, acquired with `gain_factor` times the light."""
    rng = np.random.default_rng(4)
    examples = []
    for plate in ("P1", "P2"):
        optics = plate_optics(SPEC, plate)[channel]
        optics = dataclasses.replace(optics, gain=optics.gain * gain_factor)
        for well in plate_wells(SPEC.wells):
            site = simulate_site(SPEC, plate, well, 1, fluorescence=False)
            examples.append(Example(add_noise(rng, site.clean[channel], optics), site.clean[channel],
                                    optics.dark, optics.gain * optics.flat * optics.batch_factor))
    return examples


def test_assessment_sites_are_held_out_from_training(plate_store):
    store, layout, wells = plate_store
    trained_on = choose_training_sites(store, wells, max_sites=4, seed=0)
    sites, held_out = choose_assessment_sites(store, wells, trained_on, n=3)
    assert held_out and len(sites) == 3 and not set(sites) & set(trained_on)
    every = stored_sites(store, wells)
    sites, held_out = choose_assessment_sites(store, wells, every, n=3)  # a plate too small to hold out
    assert not held_out and set(sites) <= set(every) and len(sites) == 3
    assert choose_assessment_sites(store, wells, trained_on, n=3) == choose_assessment_sites(
        store, wells, [list(s) for s in trained_on], n=3)  # as JSON lists, from a model's metadata


def test_a_stain_the_assessment_keeps_is_its_input(trained):
    examples, model, _ = trained["DNA"]
    image = examples[0].noisy
    kept = denoise_if_assessed(None, image)
    assert kept.dtype == np.float32 and np.array_equal(kept, image.astype(np.float32))
    np.testing.assert_array_equal(denoise_if_assessed(model, image, threads=TEST_THREADS),
                                  denoise_image(model, image, threads=TEST_THREADS))
