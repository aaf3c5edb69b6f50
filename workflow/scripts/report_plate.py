"""A plate's audit report (rule report_plate): report.html and its summary report.json."""

import json

from brightpaint.atomic import atomic_path
from brightpaint.layout import PlateResults
from brightpaint.logs import log_to_rule
from brightpaint.provenance import cellprofiler_site_packages
from brightpaint.report import (
    plate_report,
    provenance,
    render_plate_report,
    report_summary,
)

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
manifest, platemap = inp.sources
files = {"input: screen sheet": params.sheet, "input: manifest": manifest, "input: plate map": platemap,
         **{f"stain model {i + 1}": path for i, path in enumerate(inp.models)},
         **{f"CellProfiler pipeline {i + 1}": path
            for i, path in enumerate(p for p in (params.pipeline, params.get("tiled_pipeline")) if p)}}
prov = provenance(params.config, params.repo, files, params.benchmarks,
                  cellprofiler_site_packages(params.cellprofiler))
report = plate_report(PlateResults.from_input(inp), params.info, prov, params.rules, stain_cards=inp.cards,
                      brightfield=params.brightfield, nuclei=params.nuclei)
with atomic_path(out.html) as tmp:
    tmp.write_text(render_plate_report(report))
with atomic_path(out.summary) as tmp:
    tmp.write_text(json.dumps(report_summary(report), indent=2))
log.info("plate %s: %s (%d sites, %d QC flags)", report["plate"], report["verdict"], report["n_sites"],
         len(report["flags"]))
