"""Level-1 evaluation of a plate's virtual channels against its real stains (rule stain_evaluate)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.plate import open_plate_source
from brightpaint.stain.evaluate import evaluate_plate, examples_figure
from brightpaint.stain.files import load_card
from brightpaint.trust import attach_uncertainty, uncertainty_error_correlation

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
source = open_plate_source(PlateSources.from_input(inp), params.brightfield)
cards = [load_card(path) for path in inp.models]
table = attach_uncertainty(evaluate_plate(source, inp.virtual, cards, max_sites=params.eval_sites),
                           pd.read_csv(inp.sites, keep_default_na=False))
correlation = uncertainty_error_correlation(table)
with atomic_path(out.metrics) as tmp:
    table.to_parquet(tmp, index=False)
with atomic_path(out.figure) as tmp:
    examples_figure(source, inp.virtual, table, tmp)
with atomic_path(out.uncertainty) as tmp:
    correlation.to_csv(tmp, index=False)
log.info("uncertainty vs error (1 - PCC), Spearman:\n%s", correlation.to_string(index=False))
summary = table.groupby(["split", "channel"])[["pcc", "ssim", "psnr"]].mean()
log.info("plate %s:\n%s", source.plate, summary.to_string())
