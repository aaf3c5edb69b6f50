"""Concatenate a plate's per-shard feature tables (rule features_plate)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.features import concat_tables
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
cells = concat_tables([pd.read_parquet(path) for path in inp.cells])
images = concat_tables([pd.read_parquet(path) for path in inp.images])
sites = pd.concat([pd.read_csv(path, keep_default_na=False) for path in inp.sites], ignore_index=True)
for table, path in ((cells, out.cells), (images, out.images)):
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
with atomic_path(out.sites) as tmp:
    sites.sort_values(["source", "well", "site"]).to_csv(tmp, index=False)
log.info("plate %s: %d cells x %d columns from %d site measurements (%d not ok)",
         snakemake.wildcards.plate, len(cells), cells.shape[1], len(sites),  # noqa: F821
         int((sites["status"] != "ok").sum()))
