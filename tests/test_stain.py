"""Virtual staining (brightpaint.stain): accuracy on the demo's held-out wells and on real brightfield /
DAPI, seamless tiled prediction, model files and cards, training options, and bad inputs.

The demo accuracy tests read the default workflow run of the demo screen (fixture `demo_run` in
conftest.py: `snakemake` with the default config, as `make demo` runs it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr
from conftest import CHANNELS, TEST_THREADS, shared_data
from scipy import ndimage

from brightpaint.inference import (
    balanced_tile,
    cpu_has_fast_bf16,
    predict_tiled,
    resolve_precision,
    tile_starts,
    tiles_per_pass,
)
from brightpaint.ingest import read_plane, read_store_layout
from brightpaint.layout import PlateFolder
from brightpaint.metrics import image_metrics, pearson
from brightpaint.plate import VIRTUAL_PREFIX, fluorescence_plane, open_plate_source
from brightpaint.stain import models
from brightpaint.stain.data import (
    StainSite,
    TrainingSet,
    brightfield_input,
    build_training_set,
    held_sites,
    plate_split,
    random_crop,
    split_wells,
)
from brightpaint.stain.evaluate import evaluate_plate
from brightpaint.stain.files import load_card, load_stain_model, save_stain_model
from brightpaint.stain.predict import predict_normalised, predict_sites, predict_virtual
from brightpaint.stain.reference import sephace_field
from brightpaint.stain.settings import StainError, StainSettings
from brightpaint.stain.train import train_stain_model
from brightpaint.workflow import ConfigError, Screen

HELD_OUT = ("validation",)


# ---------------------------------------------------------------------------------------------
# The default model on the demo screen
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(demo_run) -> Path:
    return demo_run / "results"


# issue 23's pixel floor, on the wells no model trained on and on the plate no model saw
DNA_PCC_FLOOR = 0.9


def test_default_model_meets_the_accuracy_bar_on_held_out_wells(demo):
    metrics = pd.concat([pd.read_parquet(p) for p in sorted(demo.glob("plates/*/stain/metrics.parquet"))])
    held = metrics[metrics["split"].isin(HELD_OUT)]
    assert len(held["plate"].unique()) == 3  # every plate with real stains has validation wells
    dna = held[held["channel"] == "DNA"]
    assert len(dna) >= 12
    assert dna["pcc"].mean() >= DNA_PCC_FLOOR, dna.groupby("plate")["pcc"].mean()
    assert dna["ssim"].mean() >= 0.7, dna.groupby("plate")["ssim"].mean()
    card = load_card(demo / "models" / "stain" / "all" / "model.safetensors")
    assert card["metrics"]["val_pcc_DNA"] >= 0.85
    assert card["architecture"]["arch"] == "unet" and card["targets"] == ["DNA", "CYTO", "DAMAGE"]


def test_virtual_dna_on_the_apply_plate_matches_the_generators_truth(demo):
    """P4 has brightfield only (no real stain to compare with in the workflow); the demo's truth has
    its clean DNA, so the virtual stain can be checked on a plate no model ever saw."""
    truth = demo / "demo" / "screen" / "truth" / "P4"
    sites = pd.read_csv(truth / "sites.csv")
    store = demo / "plates" / "P4" / "virtual.zarr"
    layout = read_store_layout(store)
    # virtual channels, then their test-time-augmentation uncertainty maps
    assert layout.channels == ["VS_DNA", "VS_CYTO", "VS_DAMAGE", "SD_DNA", "SD_CYTO", "SD_DAMAGE"]
    assert layout.roles["SD_DNA"] == "uncertainty"
    pccs = []
    for row in sites.itertuples():
        virtual = read_plane(store, row.well, row.site, layout.channels.index("VS_DNA"), 0)
        clean = tifffile.imread(truth / "clean" / f"{row.well}_s{row.site}_DNA.tif")
        pccs.append(pearson(clean, virtual))
    assert np.mean(pccs) >= DNA_PCC_FLOOR, np.mean(pccs)


def test_metrics_table_equals_metrics_recomputed_from_the_stores(demo):
    plate = demo / "plates" / "P3"
    table = pd.read_parquet(plate / "stain" / "metrics.parquet")
    card = load_card(demo / "models" / "stain" / "all" / "model.safetensors")
    source = open_plate_source(PlateFolder(plate).sources_on_disk(), "BF")
    row = table[(table["channel"] == "DNA") & (table["split"] == "validation")].iloc[0]
    real = fluorescence_plane(source, row.well, int(row.site), "DNA")
    layout = read_store_layout(plate / "virtual.zarr")
    virtual = read_plane(plate / "virtual.zarr", row.well, int(row.site), layout.channels.index("VS_DNA"), 0)
    # both sides in normalised units: pixel correlation does not depend on the scale
    assert row.pcc == pytest.approx(pearson(real, virtual), abs=1e-6)
    plate_scale = card["target_normalisation"]["plates"]["P3"]["DNA"]
    assert plate_scale["spread"] > 0
    assert set(table["split"]) <= {"train", "validation", "unseen"}
    assert (plate / "stain" / "examples.png").stat().st_size > 10_000
    assert pd.read_csv(plate / "stain" / "sites.csv")["status"].eq("ok").all()


def test_tiled_prediction_of_a_site_equals_whole_image_inference(demo):
    generator, card = load_stain_model(demo / "models" / "stain" / "all" / "model.safetensors")
    source = open_plate_source(PlateFolder(demo / "plates" / "P1").sources_on_disk(), "BF")
    well, site = source.usable_sites()[0]
    inputs = brightfield_input(source, well, site, card["inputs"]["half_width"])
    whole = predict_normalised(generator, card, inputs, tile=256, overlap=0)
    tiled = predict_normalised(generator, card, inputs, tile=128, overlap=96, batch=3)
    scale = float(np.abs(whole).max())
    assert np.abs(tiled - whole).max() <= 2e-3 * scale
    # no seam: the error along the tile borders is no larger than anywhere else
    error = np.abs(tiled - whole).mean(axis=0)
    assert error[:, 120:136].mean() <= 3 * error.mean() + 1e-6


# ---------------------------------------------------------------------------------------------
# Real brightfield -> DAPI (sephace: two fields, brightfield at focus -10 / 0 / +10 um)
# ---------------------------------------------------------------------------------------------


def sephace_site(folder: Path, field: str) -> StainSite:
    inputs, dapi = sephace_field(folder, field)
    return StainSite(field, "A01", 1, inputs, dapi[None], np.ones(1, np.float32))


def test_real_brightfield_to_dapi_beats_trivial_baselines():
    folder = shared_data("sephace-bf-zstack-dapi")
    train, test = sephace_site(folder, "Set1"), sephace_site(folder, "Set2")
    settings = StainSettings(width=16, depth=3, patch=128, batch=8, steps_per_epoch=40, max_epochs=6,
                             patience=6, lr=2e-3)
    # validation: the training field's own right third (early stopping never sees the test field)
    cut = train.inputs.shape[-1] * 2 // 3 // 8 * 8
    left = StainSite("Set1", "A01", 1, train.inputs[..., :cut], train.targets[..., :cut], train.mask)
    right = StainSite("Set1", "A02", 1, train.inputs[..., cut:], train.targets[..., cut:], train.mask)
    data = TrainingSet([left], [right], {}, {})
    generator, history = train_stain_model(data, ["DAPI"], settings, threads=TEST_THREADS)
    card = {"architecture": generator.config, "inputs": {"half_width": 1}}
    predicted = predict_normalised(generator, card, test.inputs, tile=256, overlap=96)[0]
    real = test.targets[0]
    vs = pearson(real, predicted)
    centre = test.inputs[1]
    baselines = {"brightfield": abs(pearson(real, centre)),
                 "smoothed brightfield": abs(pearson(real, ndimage.gaussian_filter(centre, 3))),
                 "defocus difference": abs(pearson(real, test.inputs[2] - test.inputs[0])),
                 "local contrast": abs(pearson(real, ndimage.gaussian_filter(np.abs(centre), 3)))}
    print(f"sephace Set2 DAPI PCC: virtual {vs:.3f}; baselines {baselines}")
    assert vs >= max(baselines.values()) + 0.1, (vs, baselines)
    assert vs >= 0.5


# ---------------------------------------------------------------------------------------------
# Training pieces on small arrays
# ---------------------------------------------------------------------------------------------


def blob_site(rng: np.random.Generator, plate: str, well: str, size: int = 64, channels: int = 2,
              mask: tuple = (1.0, 1.0)) -> StainSite:
    """Brightfield-like input (dark rims around blobs, 3 planes) and fluorescence-like targets."""
    blobs = np.zeros((size, size), np.float32)
    for _ in range(6):
        y, x = rng.integers(8, size - 8, 2)
        blobs[y, x] = 1
    blobs = ndimage.gaussian_filter(blobs, 3) * 50
    edges = ndimage.laplace(blobs)
    inputs = np.stack([edges * k for k in (-1.0, 0.3, 1.0)]) + rng.normal(0, 0.05, (3, size, size))
    targets = np.stack([blobs, blobs ** 2][:channels]) * np.asarray(mask, np.float32)[:channels, None, None]
    return StainSite(plate, well, 1, inputs.astype(np.float32), targets.astype(np.float32),
                     np.asarray(mask[:channels], np.float32))


@pytest.fixture(scope="module")
def blob_data() -> TrainingSet:
    rng = np.random.default_rng(1)
    return TrainingSet([blob_site(rng, "P", f"A{i:02d}") for i in range(1, 7)],
                       [blob_site(rng, "P", f"B{i:02d}") for i in range(1, 3)], {}, {})


SMALL = StainSettings(width=8, depth=2, patch=32, batch=4, steps_per_epoch=4, max_epochs=2, patience=2)


@pytest.mark.parametrize("options", [{}, {"arch": "unext2"}, {"loss": "ms_ssim_l1", "patch": 64},
                                     {"gan": True}, {"stem": "3d"}])
def test_every_architecture_and_loss_trains_and_records_its_history(blob_data, options):
    settings = StainSettings(**{**SMALL.__dict__, **options}).checked()
    generator, history = train_stain_model(blob_data, ["A", "B"], settings, threads=1)
    assert list(history["epoch"]) == [1, 2]
    assert np.isfinite(history["train_loss"]).all() and np.isfinite(history["val_l1"]).all()
    assert history["best"].sum() == 1
    assert generator.config["arch"] == settings.arch and not generator.training
    assert generator.config["stem"] == settings.stem


def test_training_is_seeded(blob_data):
    first, _ = train_stain_model(blob_data, ["A", "B"], SMALL, threads=1)
    second, _ = train_stain_model(blob_data, ["A", "B"], SMALL, threads=1)
    other, _ = train_stain_model(blob_data, ["A", "B"], StainSettings(**{**SMALL.__dict__, "seed": 1}),
                                 threads=1)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(),
                                                       other.state_dict().values(), strict=True))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_learn_the_mapping_and_record_which_ran(blob_data, precision):
    """bf16 mixed precision (the default where the hardware has bf16 units) learns what fp32 learns;
    the history says which precision ran."""
    settings = StainSettings(width=8, depth=2, patch=32, batch=8, steps_per_epoch=40, max_epochs=2,
                             patience=2, lr=3e-3, precision=precision)
    _, history = train_stain_model(blob_data, ["A", "B"], settings, threads=1)
    assert set(history["precision"]) == {precision}
    assert history["val_pcc_A"].max() >= 0.8


def test_auto_precision_is_bf16_only_where_the_hardware_has_bf16_units():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="precision: 'fp16' is not one of"):
        resolve_precision("fp16", cpu)
    with pytest.raises(StainError, match="stain.precision: 'half'"):
        StainSettings(precision="half").checked()


def test_a_3d_stem_needs_the_planes_it_spans():
    assert StainSettings(stem="3d", half_width=1).checked().stem == "3d"
    with pytest.raises(StainError, match="stain.stem: 3d spans 3 planes; half_width 0 gives 1"):
        StainSettings(stem="3d", half_width=0).checked()
    with pytest.raises(StainError, match="stain.stem: '2.5d' is not one of"):
        StainSettings(stem="2.5d").checked()


def test_training_learns_and_keeps_the_best_epoch(blob_data):
    settings = StainSettings(width=8, depth=2, patch=32, batch=8, steps_per_epoch=40, max_epochs=4,
                             patience=4, lr=3e-3)
    generator, history = train_stain_model(blob_data, ["A", "B"], settings, threads=1)
    assert history["val_pcc_A"].max() >= 0.8
    best = history[history["best"]].iloc[0]
    assert best["val_l1"] == history["val_l1"].min()


def test_a_missing_target_channel_is_masked_not_learned_as_zero():
    rng = np.random.default_rng(3)
    # every training site lacks channel B; its target is zeros with mask 0
    train = [blob_site(rng, "P", f"A{i:02d}", mask=(1.0, 0.0)) for i in range(1, 7)]
    validation = [blob_site(rng, "P", "B01")]
    settings = StainSettings(width=8, depth=2, patch=32, batch=4, steps_per_epoch=10, max_epochs=1,
                             patience=3)
    generator, history = train_stain_model(TrainingSet(train, validation, {}, {}), ["A", "B"], settings,
                                           threads=1)
    untrained = models.build_generator("unet", 3, 2, width=8, depth=2, seed=0)
    # channel B's output head is untouched by training: only channel A's weights moved
    head, initial = generator.last_layer.detach(), untrained.last_layer.detach()
    assert torch.equal(head[1], initial[1]) and not torch.equal(head[0], initial[0])


def test_augmented_crops_move_input_and_target_together():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(40):
        spot = np.zeros((96, 96), np.float32)
        spot[tuple(rng.integers(20, 76, 2))] = 1.0
        spot = ndimage.gaussian_filter(spot, 2.5) * 1e4  # one smooth peak: its argmax is well defined
        site = StainSite("P", "A01", 1, np.stack([spot] * 3), spot[None] * 2, np.ones(1, np.float32))
        crop_in, crop_target = random_crop(rng, site, 64, augment=True)
        assert crop_in.shape == (3, 64, 64) and crop_target.shape == (1, 64, 64)
        peak = np.unravel_index(crop_target[0].argmax(), (64, 64))
        if 3 <= min(peak) and max(peak) <= 60:  # the spot lies inside this crop
            hits += 1
            assert abs(np.subtract(np.unravel_index(crop_in[1].argmax(), (64, 64)), peak)).max() <= 0
    assert hits >= 10


def test_wells_split_without_overlap_and_reproducibly():
    wells = [f"{r}{c:02d}" for r in "ABCD" for c in range(1, 7)]
    train, val = split_wells(wells, 0.2, 0, "P1")
    assert not set(train) & set(val) and sorted(train + val) == sorted(wells)
    assert len(val) == round(0.2 * len(wells))
    assert split_wells(wells, 0.2, 0, "P1") == (train, val)
    assert split_wells(wells, 0.2, 0, "P2")[1] != val  # plates draw their own validation wells


def fake_plate(tmp_path: Path, plate: str, platemap: pd.DataFrame | None) -> SimpleNamespace:
    """What the well split reads of a plate: its store's OME well list and its plate map."""
    root = zarr.open_group(str(tmp_path / f"{plate}.zarr"), mode="w")
    wells = [] if platemap is None else list(platemap["well"])
    root.attrs["ome"] = {"plate": {"wells": [{"path": f"{w[0]}/{w[1:]}"} for w in wells]}}
    for well in wells:
        root.create_group(f"{well[0]}/{well[1:]}").attrs["ome"] = {"well": {"images": [{"path": "0"}]}}
    return SimpleNamespace(plate=plate, store=tmp_path / f"{plate}.zarr", platemap=platemap)


def test_validation_wells_by_a_plate_map_query_or_a_seeded_draw(tmp_path):
    platemap = pd.DataFrame({"well": [f"{r}{c:02d}" for r in "AB" for c in range(1, 6)],
                             "replicate": [1, 1, 2, 2, 3] * 2})
    plate = fake_plate(tmp_path, "P1", platemap)
    wells = list(platemap["well"])
    train, val = plate_split(plate, wells, SMALL, "replicate == 3")
    assert val == ["A05", "B05"] and train == [w for w in wells if w not in val]
    assert plate_split(plate, wells, SMALL, "") == split_wells(wells, SMALL.val_fraction, SMALL.seed, "P1")
    setting = "stain.validation_wells, plate"
    with pytest.raises(StainError, match=rf"{setting} P1: 'replicate > 0' holds out every"):
        plate_split(plate, wells, SMALL, "replicate > 0")
    with pytest.raises(StainError, match=rf"{setting} P1: cannot apply 'batch == 1'.*replicate"):
        plate_split(plate, wells, SMALL, "batch == 1")
    without_map = SimpleNamespace(plate="P2", store=plate.store, platemap=None)
    with pytest.raises(StainError, match=rf"{setting} P2: a well query .* needs the plate map"):
        plate_split(without_map, wells, SMALL, "replicate == 3")


# ---------------------------------------------------------------------------------------------
# Model files and prediction
# ---------------------------------------------------------------------------------------------


def saved_model(tmp_path: Path, in_channels: int = 3, targets=("DNA",)) -> tuple[Path, dict]:
    generator = models.build_generator("unet", in_channels, len(targets), width=8, depth=2, seed=0)
    card = {"targets": list(targets), "virtual_channels": [VIRTUAL_PREFIX + t for t in targets],
            "inputs": {"channel": "BF", "half_width": (in_channels - 1) // 2},
            "target_normalisation": {"method": "plate",
                                     "reference": {t: {"median": 10.0, "spread": 100.0} for t in targets}}}
    path = tmp_path / "model" / "model.safetensors"
    return path, save_stain_model(generator, card, path)


def test_model_file_round_trip_with_card(tmp_path):
    path, card = saved_model(tmp_path)
    generator, loaded = load_stain_model(path)
    assert loaded["sha256"] == card["sha256"] == load_card(path)["sha256"]
    assert len(card["git_commit"].removesuffix("+dirty")) in (0, 40) and card["code_version"] == "stain-1"
    assert json.loads((path.parent / "card.json").read_text())["targets"] == ["DNA"]
    original = models.build_generator("unet", 3, 1, width=8, depth=2, seed=0).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(generator(x), original(x))
    # safetensors holds tensors only; no pickle is executed on load
    assert path.read_bytes()[8:9] == b"{"


def test_corrupted_or_foreign_model_files_are_clear_errors(tmp_path):
    path, _ = saved_model(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StainError, match="unreadable or corrupted"):
        load_stain_model(path)
    with pytest.raises(StainError, match="sha256 differs"):
        load_card(path)
    with pytest.raises(StainError, match="file not found"):
        load_stain_model(tmp_path / "absent.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(StainError, match="not a brightpaint virtual-staining model"):
        load_stain_model(foreign)


def test_wrong_channel_count_is_a_clear_error(tmp_path):
    path, _ = saved_model(tmp_path, in_channels=1)
    generator, card = load_stain_model(path)
    with pytest.raises(StainError, match="expects 1 brightfield plane"):
        predict_normalised(generator, card, np.zeros((3, 64, 64), np.float32))


def test_cuda_without_a_gpu_is_an_error(blob_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        train_stain_model(blob_data, ["A", "B"], SMALL, device="cuda")


def test_predict_tiled_handles_sizes_that_are_not_tile_multiples():
    generator = models.build_generator("unet", 3, 2, width=8, depth=2, seed=0).eval()
    image = np.random.default_rng(0).normal(size=(3, 150, 203)).astype(np.float32)
    whole = predict_tiled(generator, image, tile=256, overlap=0)
    tiled = predict_tiled(generator, image, tile=64, overlap=48, batch=5)
    assert tiled.shape == whole.shape == (2, 150, 203)
    assert np.abs(tiled - whole).max() < 1e-3 * np.abs(whole).max()
    fixed = predict_tiled(generator, image, tile=64, overlap=48, batch=5, balance=False)
    assert np.abs(fixed - whole).max() < 1e-3 * np.abs(whole).max()
    one_at_a_time = predict_tiled(generator, image, tile=64, overlap=48, batch="auto")
    assert np.abs(one_at_a_time - tiled).max() < 1e-5 * np.abs(whole).max()


def test_tiles_per_pass_is_one_on_a_cpu_unless_asked():
    assert tiles_per_pass("auto", "cpu") == 1
    assert tiles_per_pass("auto", torch.device("cuda")) == 8  # only the device's kind is read
    assert tiles_per_pass(3, "cpu") == 3
    for bad in (0, -1, 2.5, True, "eight"):
        with pytest.raises(ValueError, match="tiles per forward pass"):
            tiles_per_pass(bad, "cpu")


@pytest.mark.parametrize("length, tile, overlap, multiple", [(1080, 512, 96, 8), (2048, 512, 96, 8),
                                                             (2160, 512, 96, 8), (1080, 256, 32, 8),
                                                             (520, 512, 96, 8), (513, 512, 96, 1),
                                                             (150, 64, 48, 4), (300, 512, 96, 8)])
def test_balanced_tiles_are_as_many_never_larger_and_keep_the_overlap(length, tile, overlap, multiple):
    side = balanced_tile(length, tile, overlap, multiple)
    fixed = tile_starts(length, tile, overlap, multiple)
    balanced = tile_starts(length, side, overlap, multiple)
    assert side <= tile and side % multiple == 0 and len(balanced) == len(fixed)
    assert balanced[0] == 0 and (balanced[-1] + side == length or length <= side)
    assert all(a + side - b >= overlap for a, b in zip(balanced, balanced[1:], strict=False))
    if len(fixed) > 1 and side > multiple:  # the smallest such side: one step less needs more tiles
        smaller = side - multiple
        assert smaller <= overlap or len(tile_starts(length, smaller, overlap, multiple)) > len(fixed)
    assert balanced_tile(1080, 512, 96, 8) == 424  # 3 x 424 px per axis instead of 3 x 512


def test_metrics_on_known_pairs():
    rng = np.random.default_rng(0)
    real = ndimage.gaussian_filter(rng.normal(size=(128, 128)), 2)
    same = image_metrics(real, real)
    assert same["pcc"] == pytest.approx(1) and same["ssim"] == pytest.approx(1)
    assert same["psnr"] == np.inf and same["nrmse"] == 0 and same["nmae"] == 0
    span = np.subtract(*np.percentile(real, [99.9, 0.1]))
    noisy = real + rng.normal(0, span / 100, real.shape)
    assert image_metrics(real, noisy)["psnr"] == pytest.approx(40, abs=0.2)
    assert image_metrics(real, -real)["pcc"] == pytest.approx(-1)


# ---------------------------------------------------------------------------------------------
# Bad inputs from the workflow's side
# ---------------------------------------------------------------------------------------------


def test_training_sites_held_are_bounded_by_pixels_too():
    settings = StainSettings(max_sites=256, max_megapixels=48)
    assert held_sites(settings, 256 * 256) == 256  # the demo's sites: max_sites decides
    assert held_sites(settings, 1080 * 1080) == 41 and held_sites(settings, 2160 * 2160) == 10
    assert held_sites(StainSettings(max_sites=256, max_megapixels=1), 2160 * 2160) == 1
    with pytest.raises(StainError, match="max_megapixels"):
        StainSettings(max_megapixels=0).checked()


def test_no_training_plates_and_a_target_on_no_plate_are_clear_errors(demo):
    with pytest.raises(StainError, match="no training plates"):
        build_training_set([], ["DNA"], SMALL)
    apply_plate = open_plate_source(PlateFolder(demo / "plates" / "P4").sources_on_disk(), "BF")
    with pytest.raises(StainError, match="target channel 'DNA' is on no training plate"):
        build_training_set([apply_plate], ["DNA"], SMALL)


def test_evaluation_needs_real_and_virtual_channels(demo, tmp_path):
    apply_plate = open_plate_source(PlateFolder(demo / "plates" / "P4").sources_on_disk(), "BF")
    card = load_card(demo / "models" / "stain" / "all" / "model.safetensors")
    with pytest.raises(StainError, match="no target channel has both a real and a virtual image"):
        evaluate_plate(apply_plate, demo / "plates" / "P4" / "virtual.zarr", [card])


def test_a_screen_without_training_plates_is_a_config_error(tiny_screen):
    sheet = tiny_screen / "plates.tsv"
    table = pd.read_csv(sheet, sep="\t")  # T1: train, flat; T2: apply, dense
    config = {"screen": str(sheet), "channels": CHANNELS, "stain": {}}
    table.assign(role="apply").to_csv(sheet, sep="\t", index=False)
    with pytest.raises(ConfigError, match="no plate of the screen has role train or both"):
        Screen.from_config(config).stain_training_plates()
    table.to_csv(sheet, sep="\t", index=False)
    config["stain"]["train_cell_types"] = ["dense"]
    with pytest.raises(ConfigError, match="cell type in stain.train_cell_types"):
        Screen.from_config(config).stain_training_plates()
    config["stain"]["train_cell_types"] = ["flat"]
    assert Screen.from_config(config).stain_training_plates() == ["T1"]
    config["stain"]["targets"] = ["GFP"]
    with pytest.raises(ConfigError, match="stain.targets"):
        Screen.from_config(config)


def test_sites_smaller_than_the_patch_train_on_crops_that_fit(blob_data, caplog):
    settings = StainSettings(width=8, depth=2, patch=128, batch=2, steps_per_epoch=1, max_epochs=1,
                             patience=3)
    with caplog.at_level(logging.WARNING, logger="brightpaint"):
        _, history = train_stain_model(blob_data, ["A", "B"], settings, threads=1)
    assert history["patch"].tolist() == [64]
    assert "training on 64 px crops" in caplog.text
    with pytest.raises(StainError, match="must be a multiple of 4"):
        train_stain_model(blob_data, ["A", "B"], StainSettings(width=8, depth=2, patch=30, steps_per_epoch=50,
                                                               max_epochs=10, patience=3), threads=1)


def test_predict_sites_writes_each_site_and_skips_one_without_focus_with_its_reason(demo, tmp_path):
    generator, card = load_stain_model(demo / "models" / "stain" / "all" / "model.safetensors")
    source = open_plate_source(PlateFolder(demo / "plates" / "P4").sources_on_disk(), "BF")
    sites = source.usable_sites()
    good_well, good_site = sites[0]
    bad_well, bad_site = next(s for s in sites if s[0] != good_well)
    source.focus = source.focus.copy()
    bad = (source.focus["well"] == bad_well) & (source.focus["site"] == bad_site)
    source.focus.loc[bad, ["plane", "reason"]] = [-1, "blank stack"]
    out = tmp_path / "shard.zarr"
    table = predict_sites(source, [(good_well, good_site), (bad_well, bad_site)], [(generator, card)], out,
                          tile=128, overlap=96)
    assert table.set_index("well").loc[bad_well, "status"] == "skipped"
    assert "no in-focus brightfield plane (blank stack)" in table.set_index("well").loc[bad_well, "reason"]
    assert table.set_index("well").loc[good_well, "status"] == "ok"
    from brightpaint.ingest import read_field

    written = read_field(out, good_well, good_site)[0, :, 0]
    expected = predict_virtual(generator, card, source, good_well, good_site, tile=512)
    for index, name in enumerate(card["virtual_channels"]):
        assert np.abs(written[index] - expected[name]).max() <= 1e-3 * np.abs(expected[name]).max()
    assert not read_field(out, bad_well, bad_site).any()


def test_a_train_plate_lacking_a_target_channel_is_stopped_naming_it(tiny_screen):
    """Validation requires every fluorescence channel on train/both plates, so training never sees
    a plate that silently lacks a target."""
    from brightpaint.io import InputError
    from brightpaint.validate import validate_plate

    manifest = tiny_screen / "T1" / "manifest.csv"
    table = pd.read_csv(manifest)
    table[table["channel"] != "DNA"].to_csv(manifest, index=False)
    channels = {"brightfield": "BF", "fluorescence": ["DNA", "CYTO", "DAMAGE"]}
    with pytest.raises(InputError, match="DNA"):
        validate_plate(str(manifest), str(tiny_screen / "T1" / "platemap.csv"), "T1", "train", channels,
                       str(tiny_screen))
    # the same plate as an apply plate needs brightfield only
    validate_plate(str(manifest), str(tiny_screen / "T1" / "platemap.csv"), "T1", "apply", channels,
                   str(tiny_screen))
