"""Assemble the plate's virtual.zarr from its shards (rule stain_plate)."""

from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.ingest import StoreLayout, assemble_plate_store
from brightpaint.logs import log_to_rule
from brightpaint.stain.files import load_card
from brightpaint.stain.predict import virtual_channel_names, virtual_layout

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
cards = [load_card(path) for path in inp.models]
channels = virtual_channel_names(cards, snakemake.params.augmentations)  # noqa: F821
layout = virtual_layout(StoreLayout.from_json(Path(inp.layout).read_text()), channels)
assemble_plate_store(inp.stores, out.store, layout,
                     {"stage": "virtual staining", "models": [card["sha256"] for card in cards]})
sites = pd.concat([pd.read_csv(path, keep_default_na=False) for path in inp.sites], ignore_index=True)
with atomic_path(out.sites) as tmp:
    sites.sort_values(["well", "site"]).to_csv(tmp, index=False)
log.info("plate %s: %s for %d sites (%d skipped)", layout.plate, channels, len(sites),
         int((sites["status"] != "ok").sum()))
