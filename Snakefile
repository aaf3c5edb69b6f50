# brightpaint: HTS microscopy from brightfield z-stacks to biology, one plate at a time.
# Stages live in workflow/rules/<stage>.smk; the science lives in the brightpaint package.
from pathlib import Path

from snakemake.utils import min_version

from brightpaint.allocator import use_allocator_tunables
from brightpaint.workflow import check_config

min_version("9.0")


# Defaults sit beside the Snakefile so that `snakemake -s /path/to/Snakefile` works from any folder;
# relative paths in the config are relative to the working directory.
configfile: Path(workflow.basedir) / "config" / "config.yaml"


# the schema and the channel rules, as `brightpaint validate` checks them: one ConfigError naming
# every key that is wrong
check_config(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")


# glibc's allocator for every job (brightpaint.allocator: a quarter less CPU time for CellProfiler
# and the networks on 2160 px sites), passed on to jobs on other machines too
use_allocator_tunables()


envvars:
    "GLIBC_TUNABLES",


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/illumination.smk"
include: "workflow/rules/focus.smk"
include: "workflow/rules/denoise.smk"
include: "workflow/rules/stain.smk"
include: "workflow/rules/generalisation.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/profiles.smk"
include: "workflow/rules/match.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        ingest_outputs(PLATES),
        preprocess_outputs(PLATES),
        stain_outputs(PLATES),
        segment_outputs(PLATES),
        features_outputs(PLATES),
        report_outputs(PLATES),
        generalisation_outputs(),
    default_target: True
