"""Matching tables of a plate or of the screen: kNN MoA / target matching, mAP, percent replicating
and the level-3 real-vs-virtual feature agreement (rules match_plate, match_screen)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.logs import log_to_rule
from brightpaint.match import match_profiles

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
normalised = pd.concat([pd.read_parquet(path) for path in inp.normalised], ignore_index=True)
tables = match_profiles(pd.read_parquet(inp.selected), pd.read_parquet(inp.consensus), normalised,
                        params.settings)
for name, table in tables.items():
    with atomic_path(out[name]) as tmp:
        table.to_parquet(tmp, index=False)
log.info("matching:\n%s", tables["summary"].to_string(index=False) if len(tables["summary"]) else "none")
