"""Assemble the plate's labels.zarr and site table from its shards (rule segment_plate)."""

import json
from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.ingest import assemble_plate_store, read_store_layout
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
layout = read_store_layout(inp.virtual)
record = json.loads(Path(inp.diameters).read_text())
assemble_plate_store(inp.stores, out.store, layout,
                     {"stage": "segmentation", "diameters": record["inputs"],
                      "models": {k: v["sha256"] for k, v in record["models"].items()}})
sites = pd.concat([pd.read_csv(path, keep_default_na=False) for path in inp.sites], ignore_index=True)
with atomic_path(out.sites) as tmp:
    sites.sort_values(["source", "well", "site"]).to_csv(tmp, index=False)
log.info("plate %s: %d site segmentations, %d objects, %d not ok", layout.plate, len(sites),
         int(sites["objects"].sum()), int((sites["status"] != "ok").sum()))
