"""A plate's well profiles: aggregated, annotated, normalised, feature-selected, consensus (rule
profiles_plate)."""

from brightpaint.atomic import atomic_path
from brightpaint.io import read_platemap
from brightpaint.logs import log_to_rule
from brightpaint.profiles import (
    aggregate_parquet_wells,
    feature_columns,
    missing_wells,
    outlier_summary,
    profiles_from_wells,
)

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
platemap = read_platemap(inp.platemap, dict(params.control_labels))
# wells aggregated a batch of cells at a time: memory does not grow with the plate
wells = aggregate_parquet_wells(inp.cells, params.settings["aggregate"])
tables = profiles_from_wells(wells, platemap, params.plate_info, params.settings)
for source, missing in missing_wells(tables["wells"], platemap).items():
    log.warning("plate %s %s stains: no cell measured in well(s) %s: no profile (see features/sites.csv)",
                params.plate_info["plate"], source, ", ".join(missing))
log.info("plate %s outliers: %s", params.plate_info["plate"], outlier_summary(tables["normalised"]))
for level, table in tables.items():
    with atomic_path(out[level]) as tmp:
        table.to_parquet(tmp, index=False)
    log.info("plate %s %s: %d profiles x %d features", params.plate_info["plate"], level, len(table),
             len(feature_columns(table)))
