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
    """Illumination functions for every channel, and the focus table and heatmap of every plate."""
    outputs = []
    for plate in plates:
        outputs += [f"{plate_dir(plate)}/illum/{c}.npy" for c in SCREEN.plate_channels(plate)]
        outputs += [f"{plate_dir(plate)}/focus.parquet", f"{plate_dir(plate)}/focus.png"]
    return outputs
