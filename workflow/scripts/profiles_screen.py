"""The screen's normalised and feature-selected well profiles and treatment consensus from every
plate's annotated well profiles (rule profiles_screen)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.logs import log_to_rule
from brightpaint.profiles import feature_columns, outlier_summary, screen_profiles

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
tables = screen_profiles([pd.read_parquet(path) for path in inp.wells], params.settings)
log.info("screen outliers: %s", outlier_summary(tables["normalised"]))
for level, table in tables.items():
    with atomic_path(out[level]) as tmp:
        table.to_parquet(tmp, index=False)
    log.info("screen %s: %d profiles x %d features", level, len(table), len(feature_columns(table)))
