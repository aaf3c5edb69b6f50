"""Level-1 evaluation of a plate's virtual channels against its real stains (rule stain_evaluate)."""

from brightpaint.atomic import atomic_path
from brightpaint.logs import log_to_rule
from brightpaint.stain import evaluate_plate, examples_figure, load_card, open_plate_source

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
source = open_plate_source(params.plate_dir, params.brightfield)
cards = [load_card(path) for path in inp.models]
table = evaluate_plate(source, inp.virtual, cards, max_sites=params.eval_sites)
with atomic_path(out.metrics) as tmp:
    table.to_parquet(tmp, index=False)
with atomic_path(out.figure) as tmp:
    examples_figure(source, inp.virtual, table, tmp)
summary = table.groupby(["split", "channel"])[["pcc", "ssim", "psnr"]].mean()
log.info("plate %s:\n%s", source.plate, summary.to_string())
