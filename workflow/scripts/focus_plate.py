"""The plate's focus table and heatmap (rule focus_plate)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.focus import focus_heatmap
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
table = pd.concat([pd.read_parquet(path) for path in inp.tables], ignore_index=True)
table = table.sort_values(["well", "site"]).reset_index(drop=True)
with atomic_path(out.table) as tmp:
    table.to_parquet(tmp, index=False)
with atomic_path(out.figure) as tmp:
    focus_heatmap(table, tmp, plate=snakemake.wildcards.plate)  # noqa: F821
log.info("plate %s: %d sites, chosen planes %s", snakemake.wildcards.plate,  # noqa: F821
         len(table), table["plane"].value_counts().sort_index().to_dict())
