"""Level-2 evaluation of a plate's segmentation and its overlay figure (rule segment_evaluate)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.plate import open_plate_source
from brightpaint.segment.evaluate import evaluate_plate, overlay_figure, summarise_metrics
from brightpaint.segment.plates import plate_readers

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
source = open_plate_source(PlateSources.from_input(inp), params.brightfield)
sites = pd.read_csv(inp.sites, keep_default_na=False)
table = evaluate_plate(inp.labels, source.plate, sites, truth_pattern=params.truth_masks,
                       exclude_border=params.settings["exclude_border"])
with atomic_path(out.metrics) as tmp:
    table.to_parquet(tmp, index=False)
readers = plate_readers(source, inp.virtual, params.nuclei, params.cell)
busiest = sites[sites["status"] == "ok"].sort_values("objects", ascending=False)
overlay_figure(inp.labels, readers, list(dict.fromkeys(zip(busiest["well"], busiest["site"], strict=True))),
               out.figure, source.plate)
log.info("plate %s:\n%s", source.plate,
         summarise_metrics(table).to_string() if len(table) else "no comparisons")
