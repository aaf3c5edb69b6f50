"""A plate's well profiles: aggregated, annotated, normalised, feature-selected, consensus (rule
profiles_plate)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.io import read_platemap
from brightpaint.logs import log_to_rule
from brightpaint.profiles import feature_columns, missing_wells, plate_profiles

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
platemap = read_platemap(inp.platemap)
tables = plate_profiles(pd.read_parquet(inp.cells), platemap, params.plate_info, params.settings)
for source, wells in missing_wells(tables["wells"], platemap).items():
    log.warning("plate %s %s stains: no cell measured in well(s) %s: no profile (see features/sites.csv)",
                params.plate_info["plate"], source, ", ".join(wells))
for level, table in tables.items():
    with atomic_path(out[level]) as tmp:
        table.to_parquet(tmp, index=False)
    log.info("plate %s %s: %d profiles x %d features", params.plate_info["plate"], level, len(table),
             len(feature_columns(table)))
