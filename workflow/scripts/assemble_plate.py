"""Assemble the plate's OME-Zarr HCS store and its QC tables (rule assemble_plate)."""

from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.ingest import StoreLayout, assemble_plate_store, site_qc_table
from brightpaint.logs import log_to_rule
from brightpaint.provenance import sha256_file

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
layout = StoreLayout.from_json(Path(inp.layout).read_text())
provenance = {"manifest_sha256": sha256_file(inp.manifest), "platemap_sha256": sha256_file(inp.platemap)}
qc = pd.concat([pd.read_parquet(path) for path in inp.qc], ignore_index=True)
flags = pd.read_csv(inp.flags)
sites = site_qc_table(qc, flags, pd.read_parquet(inp.images))
with atomic_path(out.qc_images) as tmp:
    qc.to_parquet(tmp, index=False)
with atomic_path(out.qc_sites) as tmp:
    sites.to_csv(tmp, index=False)
assemble_plate_store(inp.stores, out.store, layout, provenance)
log.info("plate %s: %d sites (%s)", layout.plate, len(sites),
         sites["status"].value_counts().to_dict())
