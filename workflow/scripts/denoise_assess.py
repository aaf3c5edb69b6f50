"""Does Noise2Void help this plate? Per stain, estimated from sites the model was not trained on
(rule denoise_assess)."""

import json
from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.denoise import assess_plate_denoising, load_n2v
from brightpaint.illumination import correct_illumination, load_illumination
from brightpaint.ingest import StoreLayout
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
layout = StoreLayout.from_json(Path(inp.layout).read_text())
wells = sorted(set(pd.read_parquet(inp.images, columns=["well"])["well"]))
assessment = {}
for channel, model_path, illum_path in zip(params.channels, inp.models, inp.illum, strict=True):
    model, metadata = load_n2v(model_path)
    function = load_illumination(illum_path)
    result = assess_plate_denoising(
        inp.store, layout, channel, wells, model, metadata.get("sites", {}).get(layout.plate, []),
        always=params.apply == "always", min_gain_db=params.min_gain_db, seed=params.seed,
        correct=lambda image, f=function: correct_illumination(image, f), tile=params.tile,
        device=params.device, threads=snakemake.threads)  # noqa: F821
    assessment[channel] = {**result, "model": Path(model_path).name, "model_sha256": metadata["sha256"]}
    log.info("plate %s %s: estimated gain %+.1f dB -> %s (%s)", layout.plate, channel,
             result["estimated_gain_db"], "denoise" if result["apply"] else "keep the input",
             result["decided_by"])
with atomic_path(out.assessment) as tmp:
    Path(tmp).write_text(json.dumps({"plate": layout.plate, "channels": assessment}, indent=2) + "\n")
