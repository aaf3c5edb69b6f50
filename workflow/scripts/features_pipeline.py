"""The feature pipeline for the screen's channels, whole or its site and tiled halves (rule
features_pipeline)."""

from pathlib import Path

from brightpaint.atomic import atomic_path
from brightpaint.features.pipelines import write_pipeline
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
out, params = snakemake.output, snakemake.params  # noqa: F821
python = Path(params.cellprofiler).with_name("python")  # the CellProfiler environment's
for name, path in out.items():
    with atomic_path(path) as tmp:
        write_pipeline(tmp, list(params.channels), python=python, part="all" if name == "whole" else name)
    log.info("feature pipeline (%s) built for channels %s: %s", name, list(params.channels), path)
