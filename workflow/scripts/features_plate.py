"""Concatenate a plate's per-shard feature tables (rule features_plate)."""

import pandas as pd
import pyarrow.parquet as pq

from brightpaint.atomic import atomic_path
from brightpaint.features.tables import write_concatenated
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
# one shard in memory at a time: a plate's cell table can be larger than a node's memory
counts = {}
for name in ("cells", "images"):
    with atomic_path(out[name]) as tmp:
        counts[name] = write_concatenated(inp[name], tmp)
columns = len(pq.read_schema(out.cells).names)
sites = pd.concat([pd.read_csv(path, keep_default_na=False) for path in inp.sites], ignore_index=True)
with atomic_path(out.sites) as tmp:
    sites.sort_values(["source", "well", "site"]).to_csv(tmp, index=False)
log.info("plate %s: %d cells x %d columns from %d site measurements (%d not ok)",
         snakemake.wildcards.plate, counts["cells"], columns, len(sites),  # noqa: F821
         int((sites["status"] != "ok").sum()))
