# Path helpers and the screen's plates, resolved once when the workflow is parsed.
import re

from brightpaint.workflow import Screen

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
    """The screen sheet and the plate's manifest and plate map (and its images, via validation)."""
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


def n2v_training_inputs(wildcards):
    plates = (
        SCREEN.plates_with_channel(wildcards.channel)
        if "plate" not in wildcards.keys()
        else [wildcards.plate]
    )
    return {
        "stores": [f"{RESULTS}/plates/{p}/images.zarr" for p in plates],
        "layouts": [f"{RESULTS}/plates/{p}/ingest/layout.json" for p in plates],
        "illum": [f"{RESULTS}/plates/{p}/illum/{wildcards.channel}.npy" for p in plates],
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
