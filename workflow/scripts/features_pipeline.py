"""The feature pipeline's site and tiled halves, and the two in one, for the screen's channels (rule
features_pipeline)."""

from pathlib import Path

from brightpaint.atomic import atomic_path
from brightpaint.features.pipelines import write_pipeline
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
out, params = snakemake.output, snakemake.params  # noqa: F821
python = Path(params.cellprofiler).with_name("python")  # the CellProfiler environment's
for name, part in (("site", "site"), ("tiled", "tiled"), ("whole", "all")):
    with atomic_path(out[name]) as tmp:
        write_pipeline(tmp, list(params.channels), python=python, part=part)
log.info("feature pipeline built for channels %s: %s, %s, %s", list(params.channels), out.site, out.tiled,
         out.whole)
