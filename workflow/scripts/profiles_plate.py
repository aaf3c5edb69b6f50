"""A plate's well profiles: aggregated, annotated, normalised, feature-selected, consensus (rule
profiles_plate)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.io import read_platemap
from brightpaint.logs import log_to_rule
from brightpaint.profiles import feature_columns, plate_profiles

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
tables = plate_profiles(pd.read_parquet(inp.cells), read_platemap(inp.platemap), params.plate_info,
                        params.settings)
for level, table in tables.items():
    with atomic_path(out[level]) as tmp:
        table.to_parquet(tmp, index=False)
    log.info("plate %s %s: %d profiles x %d features", params.plate_info["plate"], level, len(table),
             len(feature_columns(table)))
