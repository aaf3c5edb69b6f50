"""Assemble the plate's denoised.zarr from its shards (rule denoise_plate)."""

from pathlib import Path

from brightpaint.derived import derived_layout
from brightpaint.ingest import StoreLayout, assemble_plate_store
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
layout = derived_layout(StoreLayout.from_json(Path(inp.layout).read_text()), list(params.channels))
assemble_plate_store(inp.stores, out.store, layout, {"stage": "denoise (Noise2Void)"})
log.info("plate %s: denoised %s", layout.plate, layout.channels)
