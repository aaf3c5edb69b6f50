# Path helpers and the screen's plates, resolved once when the workflow is parsed. A plate folder's
# files are named by brightpaint.layout.PlateFolder alone: PLATE gives the rules' wildcard patterns,
# plate_folder(plate) a plate's paths.
import re
from pathlib import Path

from brightpaint.layout import PlateFolder, ProfileFolder
from brightpaint.validate import images_stamp
from brightpaint.workflow import (
    Screen,
    cellprofiler_params,
    check_plate_folders,
    located_files,
    segment_weights_path,
    workflow_file,
)
from brightpaint.workflow import code_params as script_code_params

SCREEN = Screen.from_config(config)
PLATES = SCREEN.selected_plates()
RESULTS = config["results"]
SHARDS = list(range(config["shards"]))
# every output path of every plate, resolved, stays inside the plate's folder
check_plate_folders(RESULTS, SCREEN.plate_ids(), config["channels"], SHARDS)
# Documents each rule's software for `--sdm conda`; the venv from envs/main.txt is the tested route.
MAIN_ENV = "../../envs/main.yaml"


wildcard_constraints:
    plate="|".join(map(re.escape, SCREEN.plate_ids())) or "NO_PLATE",
    shard=r"\d+",
    channel="|".join(map(re.escape, [config["channels"]["brightfield"], *config["channels"]["fluorescence"]])),


PLATE = PlateFolder.of(RESULTS, "{plate}")


def code_params(script):
    """A rule's code and software as params (rerun by content: brightpaint.workflow.code_params)."""
    return script_code_params(Path(workflow.basedir) / "workflow" / "scripts" / script)


def plate_folder(plate):
    return PlateFolder.of(RESULTS, plate)


def plate_inputs(wildcards):
    """The plate's manifest and plate map (its images are checked by validation)."""
    return SCREEN.plate_inputs(wildcards.plate)


def plate_param(field):
    return lambda wildcards: SCREEN.plate_row(wildcards.plate)[field]


def image_change_params():
    """With config ingest.rerun_on_image_change: the digest of the plate's image files (path, size,
    modification time) as a param of validate_plate, so a changed image reruns the plate."""
    if not config["ingest"]["rerun_on_image_change"]:
        return {}
    return {
        "images_stamp": lambda wildcards: images_stamp(
            SCREEN.plate_row(wildcards.plate)["manifest"], wildcards.plate, SCREEN.sheet_folder
        )
    }


def ingest_outputs(plates):
    folders = [plate_folder(plate) for plate in plates]
    return [path for folder in folders for path in (folder.store, folder.qc_images, folder.qc_sites)]


def preprocess_outputs(plates):
    """Illumination functions for every channel, the focus table and heatmap of every plate, and the
    denoised store where denoising is on and the plate has channels to denoise."""
    outputs = []
    for plate in plates:
        folder = plate_folder(plate)
        outputs += [folder.illum(c) for c in SCREEN.plate_channels(plate)]
        outputs += [folder.focus, folder.focus_figure]
        if SCREEN.denoise_channels(plate):
            outputs.append(folder.denoised)
    return outputs


def n2v_model(plate, channel):
    if config["denoise"]["scope"] == "screen":
        return f"{RESULTS}/models/n2v/{channel}.pt"
    return plate_folder(plate).n2v_model(channel)


def plate_n2v_models(plate):
    """The plate's own Noise2Void models (none with denoise.scope screen)."""
    if config["denoise"]["scope"] == "screen":
        return []
    return [n2v_model(plate, c) for c in SCREEN.denoise_channels(plate)]


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
    folders = [plate_folder(p) for p in plates]
    return {
        "stores": [keep(folder.store) for folder in folders],
        "layouts": [keep(folder.layout) for folder in folders],
        "images": [keep(folder.images) for folder in folders],
        "illum": [keep(folder.illum(wildcards.channel)) for folder in folders],
    }


N2V_TRAIN = dict(
    params=dict(
        steps=config["denoise"]["steps"],
        patch=config["denoise"]["patch"],
        batch=config["denoise"]["batch"],
        max_sites=config["denoise"]["max_sites"],
        device=config["denoise"]["device"],
        precision=config["denoise"]["precision"],
        seed=config["denoise"]["seed"],
    ),
)


def denoise_assess_inputs(wildcards):
    channels = SCREEN.denoise_channels(wildcards.plate)
    folder = plate_folder(wildcards.plate)
    return {
        "store": folder.store,
        "layout": folder.layout,
        "images": folder.images,
        "illum": [folder.illum(c) for c in channels],
        "models": [n2v_model(wildcards.plate, c) for c in channels],
    }


def denoise_shard_inputs(wildcards):
    return {**denoise_assess_inputs(wildcards), "assessment": plate_folder(wildcards.plate).denoise_assessment}


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


def plate_sources(plate, channels, denoised=True):
    """What plate access reads of a plate (brightpaint.layout.PlateSources): its store, layout, focus
    table, the illumination functions of `channels` and, with `denoised`, the denoised store when
    denoising made one."""
    return plate_folder(plate).sources(channels, denoised=denoised and bool(SCREEN.denoise_channels(plate)))


def plate_stain_sources(plate, fluorescence=True):
    """What virtual staining reads of a plate: its sources with the illumination functions of
    brightfield, plus the targets it has and the denoised store with `fluorescence`."""
    channels = [config["channels"]["brightfield"]]
    if fluorescence:
        channels += [c for c in SCREEN.stain_targets() if c in SCREEN.plate_channels(plate)]
    return plate_sources(plate, channels, denoised=fluorescence)


def stain_source_inputs(fluorescence):
    """An input function: a plate's stain sources as named inputs (store, layout, focus, illum,
    denoised)."""
    return lambda wildcards: plate_stain_sources(wildcards.plate, fluorescence).named_inputs()


def training_sources():
    """Every training plate's stain sources, as plain params: the multi-plate scripts open these and
    check them against their job's inputs (stain_training_inputs lists the same paths)."""
    return [plate_stain_sources(plate).as_params() for plate in STAIN_TRAINING_PLATES]


# Generalisation matrix: groups of the training plates' wells (cell type x phenotype), each with a model;
# a group the training plates cannot split into training and validation wells is skipped, with the
# reason shown on the index page.
GENERALISATION = config["generalisation"]
GENERALISATION_GROUPS, GENERALISATION_SKIPPED = SCREEN.generalisation_groups(
    GENERALISATION, STAIN_TRAINING_PLATES, config["platemap"]["control_types"]
)
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
        "sources": [kept_model_input(path) for plate in plates for path in plate_stain_sources(plate).paths()],
        "platemaps": [kept_model_input(SCREEN.plate_row(plate)["platemap"]) for plate in plates],
        "labels": [kept_model_input(plate_folder(plate).labels) for plate in plates],
        "diameters": [kept_model_input(plate_folder(plate).segment_diameters) for plate in plates],
        **NUCLEI_WEIGHTS[0],
    }


def stain_training_inputs(wildcards):
    return {
        "sources": [
            kept_model_input(path)
            for plate in STAIN_TRAINING_PLATES
            for path in plate_stain_sources(plate).paths()
        ],
        "platemaps": [kept_model_input(SCREEN.plate_row(plate)["platemap"]) for plate in STAIN_TRAINING_PLATES],
    }


def stain_outputs(plates):
    """Every plate's virtual channels; for plates with real stains, the level-1 evaluation."""
    outputs = []
    for plate in plates:
        folder = plate_folder(plate)
        outputs.append(folder.virtual)
        if SCREEN.has_real_stains(plate):
            outputs += [folder.stain_metrics, folder.stain_uncertainty, folder.stain_examples]
    return outputs


# Segmentation: weight files (shipped in resources/, a user's, or trained by rule segment_train when
# the config points into results/models/cellpose/) and what every segmentation rule reads of a plate.
SEGMENT = config["segment"]
SEGMENT_WEIGHTS = {
    kind: segment_weights_path(SEGMENT[key], RESULTS, workflow.basedir)
    for kind, key in (("nuclei", "nuclei_weights"), ("cells", "cell_weights"))
}
# (inputs, params) of each: see brightpaint.workflow.located_files
NUCLEI_WEIGHTS = located_files({"nuclei_weights": SEGMENT_WEIGHTS["nuclei"]})
CELL_WEIGHTS = located_files({"cell_weights": SEGMENT_WEIGHTS["cells"]})
SEGMENT_PARAMS = dict(
    **NUCLEI_WEIGHTS[1],
    **CELL_WEIGHTS[1],
    brightfield=config["channels"]["brightfield"],
    nuclei=config["channels"]["nuclei"],
    cell=config["channels"]["cell"],
    settings=SEGMENT,
    device=SEGMENT["device"],
)


def segment_inputs(wildcards):
    """The plate's sources as named inputs (real nuclei / cell channels where it has them), its
    virtual stains and their site table, and the two weight files."""
    plate = wildcards.plate
    real = [c for c in (config["channels"]["nuclei"], config["channels"]["cell"]) if c in SCREEN.plate_channels(plate)]
    sources = plate_sources(plate, [config["channels"]["brightfield"], *real])
    return {
        **sources.named_inputs(),
        "virtual": plate_folder(plate).virtual,
        "stain_sites": plate_folder(plate).stain_sites,
        **NUCLEI_WEIGHTS[0],
        **CELL_WEIGHTS[0],
    }


def segment_outputs(plates):
    """Every plate's labels, site table and level-2 evaluation."""
    folders = [plate_folder(plate) for plate in plates]
    return [
        path
        for folder in folders
        for path in (folder.labels, folder.segment_sites, folder.segment_metrics, folder.segment_overlay)
    ]


# Features, profiles and matching: CellProfiler on real (where a plate has them) and virtual stains,
# pycytominer per plate and for the screen, kNN / mAP matching.
FEATURES = config["features"]
# `auto`: the pipeline built for this screen's channels (the features_pipeline job): whole, or its site
# and tiled halves with `tiled_pipeline: auto`
FEATURES_CHANNELS = SCREEN.feature_channels(FEATURES["sources"])
BUILT_PIPELINES = {
    part: f"{RESULTS}/screen/features/pipeline_{part}.cppipe" for part in ("whole", "site", "tiled")
}
FEATURES_AUTO = {key: str(FEATURES[key]).strip() == "auto" for key in ("pipeline", "tiled_pipeline")}


def feature_pipeline(key):
    """The pipeline file config features.<key> names: the built one for `auto` (the tiled half only
    with the built site half), None for "" (no tiled half), else the user's file."""
    value = str(FEATURES[key]).strip()
    if key == "pipeline" and FEATURES_AUTO["pipeline"]:
        return BUILT_PIPELINES["site" if FEATURES_AUTO["tiled_pipeline"] else "whole"]
    if key == "tiled_pipeline" and FEATURES_AUTO["tiled_pipeline"]:
        return BUILT_PIPELINES["tiled"] if FEATURES_AUTO["pipeline"] else None
    if value == "":
        return None
    return workflow_file(value, workflow.basedir, f"features.{key}")


FEATURES_PIPELINE = feature_pipeline("pipeline")
FEATURES_TILED_PIPELINE = feature_pipeline("tiled_pipeline")
# what the features_pipeline job builds: the built files the configuration uses (none with the user's own
# pipeline: its only output is then the whole pipeline, and no job asks for it)
PIPELINES_TO_BUILD = {
    part: path for part, path in BUILT_PIPELINES.items() if path in (FEATURES_PIPELINE, FEATURES_TILED_PIPELINE)
} or {"whole": BUILT_PIPELINES["whole"]}
PIPELINE_FILES = located_files(
    {name: path for name, path in (("pipeline", FEATURES_PIPELINE), ("tiled_pipeline", FEATURES_TILED_PIPELINE)) if path}
)
CELLPROFILER = cellprofiler_params(workflow_file(FEATURES["cellprofiler"], workflow.basedir, "features.cellprofiler"))
SCREEN_FOLDER = ProfileFolder.screen(RESULTS)


def feature_sources(plate):
    """The stain sources measured on a plate: config features.sources, `real` only where it has real
    stains."""
    return [s for s in FEATURES["sources"] if s == "virtual" or SCREEN.has_real_stains(plate)]


def features_inputs(wildcards):
    """What feature extraction reads of a plate: its sources as named inputs (plate access needs the
    brightfield's; the real stains' illumination functions and denoised store where it measures
    them), its virtual stains, labels and the segmentation's site table, and the CellProfiler
    pipeline."""
    plate = wildcards.plate
    folder = plate_folder(plate)
    real = "real" in feature_sources(plate)
    channels = SCREEN.plate_channels(plate) if real else [config["channels"]["brightfield"]]
    inputs = {
        **plate_sources(plate, channels, denoised=real).named_inputs(),
        "virtual": folder.virtual,
        "labels": folder.labels,
        "segment_sites": folder.segment_sites,
        **PIPELINE_FILES[0],
    }
    return inputs


def features_outputs(plates):
    """Every plate's features, profiles and matching tables; with no plate selection, the screen's."""
    outputs = []
    for plate in plates:
        folder = plate_folder(plate)
        outputs += [folder.features_cells, folder.features_sites, *folder.profiles.values(), *folder.matches.values()]
    if not SCREEN.selection:
        outputs += [*SCREEN_FOLDER.matches.values()]
    return outputs


# Reports: a plate's report reads every output the default run makes of it, the stain model cards and
# its input files (checksums); the index reads every plate's summary and the screen's matching.
def plate_outputs(plate):
    folder = plate_folder(plate)
    return [
        *ingest_outputs([plate]),
        *preprocess_outputs([plate]),
        *stain_outputs([plate]),
        *segment_outputs([plate]),
        folder.features_cells,
        folder.features_sites,
        *folder.profiles.values(),
        *folder.matches.values(),
    ]


def stain_cards():
    """The model cards beside the stain models (a user's model may come without one)."""
    if STAIN["weights"]:
        card = Path(STAIN["weights"]).with_name("card.json")
        return [str(card)] if card.exists() else []
    return [f"{RESULTS}/models/stain/{model}/card.json" for model in STAIN_MODELS]


def plate_results(plate):
    """What a plate's report reads (brightpaint.layout.PlateResults): its tables and figures, the
    illumination figures of its channels, its own Noise2Void models and, where denoising ran, its
    sources with the denoised store (before / after crops)."""
    channels = SCREEN.plate_channels(plate)
    denoised = plate_sources(plate, channels) if SCREEN.denoise_channels(plate) else None
    return plate_folder(plate).results(
        channels,
        denoise_models=plate_n2v_models(plate),
        denoised_sources=denoised,
        real_stains=SCREEN.has_real_stains(plate),
    )


def report_inputs(wildcards):
    """What the report reads, as named inputs, and every output the default run makes of the plate."""
    return {
        **plate_results(wildcards.plate).named_inputs(),
        "outputs": plate_outputs(wildcards.plate),
        "models": stain_model_files(),
        "cards": stain_cards(),
        "sources": SCREEN.plate_inputs(wildcards.plate),
        **PIPELINE_FILES[0],
    }


def report_outputs(plates):
    outputs = [plate_folder(plate).report_html for plate in plates]
    if not SCREEN.selection:
        outputs.append(f"{RESULTS}/index.html")
    return outputs
