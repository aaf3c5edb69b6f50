# Path helpers and the screen's plates, resolved once when the workflow is parsed.
import re
from pathlib import Path

from brightpaint.workflow import Screen, segment_weights_path, workflow_file

SCREEN = Screen.from_config(config)
PLATES = SCREEN.selected_plates()
RESULTS = config["results"]
SHARDS = list(range(config["shards"]))
# Documents each rule's software for `--sdm conda`; the venv from envs/main.txt is the tested route.
MAIN_ENV = "../../envs/main.yaml"


wildcard_constraints:
    plate="|".join(map(re.escape, SCREEN.plate_ids())) or "NO_PLATE",
    shard=r"\d+",
    channel="|".join(map(re.escape, [config["channels"]["brightfield"], *config["channels"]["fluorescence"]])),


def plate_dir(plate):
    return f"{RESULTS}/plates/{plate}"


def plate_inputs(wildcards):
    """The plate's manifest and plate map (its images are checked by validation)."""
    return SCREEN.plate_inputs(wildcards.plate)


def plate_param(field):
    return lambda wildcards: SCREEN.plate_row(wildcards.plate)[field]


def ingest_outputs(plates):
    return [
        path
        for plate in plates
        for path in (
            f"{plate_dir(plate)}/images.zarr",
            f"{plate_dir(plate)}/ingest/qc_images.parquet",
            f"{plate_dir(plate)}/ingest/qc_sites.csv",
        )
    ]


def preprocess_outputs(plates):
    """Illumination functions for every channel, the focus table and heatmap of every plate, and the
    denoised store where denoising is on and the plate has channels to denoise."""
    outputs = []
    for plate in plates:
        outputs += [f"{plate_dir(plate)}/illum/{c}.npy" for c in SCREEN.plate_channels(plate)]
        outputs += [f"{plate_dir(plate)}/focus.parquet", f"{plate_dir(plate)}/focus.png"]
        if SCREEN.denoise_channels(plate):
            outputs.append(f"{plate_dir(plate)}/denoised.zarr")
    return outputs


def n2v_model(plate, channel):
    if config["denoise"]["scope"] == "screen":
        return f"{RESULTS}/models/n2v/{channel}.pt"
    return f"{RESULTS}/plates/{plate}/denoise/{channel}.n2v.pt"


def kept_model_input(path):
    """A screen-level model's input from one plate. Marked ancient: rerunning one plate keeps the
    screen's model (retraining would change every plate's results); retrain with
    `--forcerun <rule>` or by deleting the model."""
    return ancient(path)


def n2v_training_inputs(wildcards):
    """A plate's own Noise2Void model reads that plate (and is retrained with it); the screen's model
    reads every plate with the channel, selected or not, so a plate selection does not change it."""
    if "plate" in wildcards.keys():
        plates, keep = [wildcards.plate], str
    else:
        plates, keep = SCREEN.plates_with_channel(wildcards.channel), kept_model_input
    return {
        "stores": [keep(f"{RESULTS}/plates/{p}/images.zarr") for p in plates],
        "layouts": [keep(f"{RESULTS}/plates/{p}/ingest/layout.json") for p in plates],
        "illum": [keep(f"{RESULTS}/plates/{p}/illum/{wildcards.channel}.npy") for p in plates],
    }


N2V_TRAIN = dict(
    params=dict(
        steps=config["denoise"]["steps"],
        patch=config["denoise"]["patch"],
        batch=config["denoise"]["batch"],
        max_sites=config["denoise"]["max_sites"],
        device=config["denoise"]["device"],
        seed=config["denoise"]["seed"],
    ),
)


def denoise_shard_inputs(wildcards):
    channels = SCREEN.denoise_channels(wildcards.plate)
    return {
        "store": f"{RESULTS}/plates/{wildcards.plate}/images.zarr",
        "layout": f"{RESULTS}/plates/{wildcards.plate}/ingest/layout.json",
        "illum": [f"{RESULTS}/plates/{wildcards.plate}/illum/{c}.npy" for c in channels],
        "models": [n2v_model(wildcards.plate, c) for c in channels],
    }


# Virtual staining: models (one multi-channel model `all`, or one per target channel), their files,
# and what training and prediction read.
STAIN = config["stain"]
STAIN_MODELS = SCREEN.stain_models()
STAIN_TRAINING_PLATES = SCREEN.stain_training_plates()


def stain_model_files():
    """The model files prediction uses: the user's stain.weights, or the screen's trained models."""
    if STAIN["weights"]:
        return [STAIN["weights"]]
    return [f"{RESULTS}/models/stain/{model}/model.safetensors" for model in STAIN_MODELS]


def plate_stain_sources(plate, fluorescence=True):
    """What virtual staining reads of a plate: its store, layout, focus table, illumination functions
    (brightfield, plus the targets it has with `fluorescence`) and the denoised store when denoising
    made one."""
    channels = [config["channels"]["brightfield"]]
    if fluorescence:
        channels += [c for c in SCREEN.stain_targets() if c in SCREEN.plate_channels(plate)]
    inputs = [
        f"{plate_dir(plate)}/images.zarr",
        f"{plate_dir(plate)}/ingest/layout.json",
        f"{plate_dir(plate)}/focus.parquet",
        *[f"{plate_dir(plate)}/illum/{c}.npy" for c in channels],
    ]
    if fluorescence and SCREEN.denoise_channels(plate):
        inputs.append(f"{plate_dir(plate)}/denoised.zarr")
    return inputs


# Generalisation matrix: groups of the training plates' wells (cell type x phenotype), each with a model.
GENERALISATION = config["generalisation"]
GENERALISATION_GROUPS = SCREEN.generalisation_groups(GENERALISATION, STAIN_TRAINING_PLATES)
# the per-group models train like the screen's model, with the matrix's (smaller) budget on top
GENERALISATION_SETTINGS = {**STAIN["model"], **GENERALISATION["model"]}


def generalisation_outputs():
    """The matrix and its figure: screen-level, so not made for a plate selection."""
    if not GENERALISATION_GROUPS or SCREEN.selection:
        return []
    return [f"{RESULTS}/generalisation/matrix.parquet", f"{RESULTS}/generalisation/matrix.png"]


def generalisation_evaluation_inputs(wildcards):
    """The group's model, every group's card (their held-out wells are the test sites), and of each
    training plate its sources, plate map, real-stain labels and Cellpose diameters (ancient, like
    a screen model's inputs), and the Cellpose nuclei weights."""
    plates = STAIN_TRAINING_PLATES
    return {
        "model": f"{RESULTS}/generalisation/{wildcards.group}/model.safetensors",
        "cards": [f"{RESULTS}/generalisation/{group}/card.json" for group in GENERALISATION_GROUPS],
        "sources": [kept_model_input(path) for plate in plates for path in plate_stain_sources(plate)],
        "platemaps": [kept_model_input(SCREEN.plate_row(plate)["platemap"]) for plate in plates],
        "labels": [kept_model_input(f"{plate_dir(plate)}/labels.zarr") for plate in plates],
        "diameters": [kept_model_input(f"{plate_dir(plate)}/segment/diameters.json") for plate in plates],
        "nuclei_weights": SEGMENT_WEIGHTS["nuclei"],
    }


def stain_training_inputs(wildcards):
    return {
        "sources": [
            kept_model_input(path) for plate in STAIN_TRAINING_PLATES for path in plate_stain_sources(plate)
        ],
        "platemaps": [kept_model_input(SCREEN.plate_row(plate)["platemap"]) for plate in STAIN_TRAINING_PLATES],
    }


def stain_outputs(plates):
    """Every plate's virtual channels; for plates with real stains, the level-1 evaluation."""
    outputs = []
    for plate in plates:
        outputs.append(f"{plate_dir(plate)}/virtual.zarr")
        if SCREEN.has_real_stains(plate):
            outputs += [
                f"{plate_dir(plate)}/stain/{name}"
                for name in ("metrics.parquet", "uncertainty.csv", "examples.png")
            ]
    return outputs


# Segmentation: weight files (shipped in resources/, a user's, or trained by rule segment_train when
# the config points into results/models/cellpose/) and what every segmentation rule reads of a plate.
SEGMENT = config["segment"]
SEGMENT_WEIGHTS = {
    kind: segment_weights_path(SEGMENT[key], RESULTS, workflow.basedir)
    for kind, key in (("nuclei", "nuclei_weights"), ("cells", "cell_weights"))
}
SEGMENT_PARAMS = dict(
    plate_dir=lambda wildcards: plate_dir(wildcards.plate),
    brightfield=config["channels"]["brightfield"],
    nuclei=config["channels"]["nuclei"],
    cell=config["channels"]["cell"],
    settings=SEGMENT,
    device=SEGMENT["device"],
)


def segment_inputs(wildcards):
    """The plate's stain sources (real nuclei / cell channels where it has them), its virtual stains
    and their site table, and the two weight files."""
    plate = wildcards.plate
    real = [c for c in (config["channels"]["nuclei"], config["channels"]["cell"]) if c in SCREEN.plate_channels(plate)]
    sources = [
        f"{plate_dir(plate)}/images.zarr",
        f"{plate_dir(plate)}/ingest/layout.json",
        f"{plate_dir(plate)}/focus.parquet",
        *[f"{plate_dir(plate)}/illum/{c}.npy" for c in [config["channels"]["brightfield"], *real]],
    ]
    if SCREEN.denoise_channels(plate):
        sources.append(f"{plate_dir(plate)}/denoised.zarr")
    return {
        "sources": sources,
        "virtual": f"{plate_dir(plate)}/virtual.zarr",
        "stain_sites": f"{plate_dir(plate)}/stain/sites.csv",
        "nuclei_weights": SEGMENT_WEIGHTS["nuclei"],
        "cell_weights": SEGMENT_WEIGHTS["cells"],
    }


def segment_outputs(plates):
    """Every plate's labels, site table and level-2 evaluation."""
    return [
        path
        for plate in plates
        for path in (
            f"{plate_dir(plate)}/labels.zarr",
            f"{plate_dir(plate)}/segment/sites.csv",
            f"{plate_dir(plate)}/segment/metrics.parquet",
            f"{plate_dir(plate)}/segment/overlay.png",
        )
    ]


# Features, profiles and matching: CellProfiler on real (where a plate has them) and virtual stains,
# pycytominer per plate and for the screen, kNN / mAP matching.
FEATURES = config["features"]
FEATURES_PIPELINE = workflow_file(FEATURES["pipeline"], workflow.basedir, "features.pipeline")
FEATURES_TILED_PIPELINE = (
    workflow_file(FEATURES["tiled_pipeline"], workflow.basedir, "features.tiled_pipeline")
    if str(FEATURES.get("tiled_pipeline", "")).strip()
    else None
)
CELLPROFILER = workflow_file(FEATURES["cellprofiler"], workflow.basedir, "features.cellprofiler")
SCREEN_DIR = f"{RESULTS}/screen"


def feature_sources(plate):
    """The stain sources measured on a plate: config features.sources, `real` only where it has real
    stains."""
    return [s for s in FEATURES["sources"] if s == "virtual" or SCREEN.has_real_stains(plate)]


def features_inputs(wildcards):
    """What feature extraction reads of a plate: its real stains (store, illumination functions,
    denoised store) where it has them, its virtual stains, labels and the segmentation's site table,
    and the CellProfiler pipeline."""
    plate = wildcards.plate
    inputs = {
        "virtual": f"{plate_dir(plate)}/virtual.zarr",
        "labels": f"{plate_dir(plate)}/labels.zarr",
        "segment_sites": f"{plate_dir(plate)}/segment/sites.csv",
        "pipeline": FEATURES_PIPELINE,
    }
    if FEATURES_TILED_PIPELINE:
        inputs["tiled_pipeline"] = FEATURES_TILED_PIPELINE
    if "real" in feature_sources(plate):
        inputs["sources"] = plate_stain_sources(plate)
    return inputs


def plate_profile_files(plate):
    return {
        level: f"{plate_dir(plate)}/profiles/{level}.parquet"
        for level in ("wells", "normalised", "selected", "consensus")
    }


def match_files(folder):
    return {name: f"{folder}/match/{name}.parquet" for name in ("summary", "neighbours", "agreement")}


def features_outputs(plates):
    """Every plate's features, profiles and matching tables; with no plate selection, the screen's."""
    outputs = []
    for plate in plates:
        outputs += [f"{plate_dir(plate)}/features/cells.parquet", f"{plate_dir(plate)}/features/sites.csv"]
        outputs += [*plate_profile_files(plate).values(), *match_files(plate_dir(plate)).values()]
    if not SCREEN.selection:
        outputs += [*match_files(SCREEN_DIR).values()]
    return outputs


# Reports: a plate's report reads every output the default run makes of it, the stain model cards and
# its input files (checksums); the index reads every plate's summary and the screen's matching.
def plate_outputs(plate):
    return [
        *ingest_outputs([plate]),
        *preprocess_outputs([plate]),
        *stain_outputs([plate]),
        *segment_outputs([plate]),
        f"{plate_dir(plate)}/features/cells.parquet",
        f"{plate_dir(plate)}/features/sites.csv",
        *plate_profile_files(plate).values(),
        *match_files(plate_dir(plate)).values(),
    ]


def stain_cards():
    """The model cards beside the stain models (a user's model may come without one)."""
    if STAIN["weights"]:
        card = Path(STAIN["weights"]).with_name("card.json")
        return [str(card)] if card.exists() else []
    return [f"{RESULTS}/models/stain/{model}/card.json" for model in STAIN_MODELS]


def report_inputs(wildcards):
    return {
        "outputs": plate_outputs(wildcards.plate),
        "models": stain_model_files(),
        "cards": stain_cards(),
        "sources": SCREEN.plate_inputs(wildcards.plate),
    }


def report_outputs(plates):
    outputs = [f"{plate_dir(plate)}/report.html" for plate in plates]
    if not SCREEN.selection:
        outputs.append(f"{RESULTS}/index.html")
    return outputs
