"""Assemble the plate's denoised.zarr from its shards (rule denoise_plate); its metadata records
the plate's denoising assessment (which stains Noise2Void changed, and why)."""

import json
from pathlib import Path

from brightpaint.derived import derived_layout
from brightpaint.ingest import StoreLayout, assemble_plate_store
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
layout = derived_layout(StoreLayout.from_json(Path(inp.layout).read_text()), list(params.channels))
assessment = json.loads(Path(inp.assessment).read_text())["channels"]
assemble_plate_store(inp.stores, out.store, layout, {"stage": "denoise (Noise2Void)",
                                                      "denoise_assessment": assessment})
log.info("plate %s: denoised %s", layout.plate, layout.channels)
