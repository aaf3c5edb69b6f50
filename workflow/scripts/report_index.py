"""The screen's index page (rule report_index): every plate's report with its verdict, and the
screen-level matching."""

import json
from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.generalisation import generalisation_table
from brightpaint.logs import log_to_rule
from brightpaint.report import png_data_uri, render_index

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
index_dir = Path(out[0]).resolve().parent
plates = []
for path, html in zip(inp.summaries, snakemake.params.reports, strict=True):  # noqa: F821
    summary = json.loads(Path(path).read_text())
    summary["href"] = str(Path(html).resolve().relative_to(index_dir))
    plates.append(summary)
tables = {"screen matching": pd.read_parquet(inp.screen)}
figures = []
if inp.generalisation:  # the matrix table and its figure
    matrix_table, matrix_png = inp.generalisation
    tables["generalisation matrix"] = generalisation_table(pd.read_parquet(matrix_table))
    figures.append({"src": png_data_uri(matrix_png), "file": "generalisation_matrix",
                    "caption": "virtual staining trained on one group (rows), tested on another (columns): "
                               "difference to the in-distribution model"})
skipped = dict(snakemake.params.generalisation_skipped)  # noqa: F821
if skipped:  # groups of the matrix that got no model, and why
    tables["generalisation groups without a model"] = pd.DataFrame(
        {"group": list(skipped), "reason": list(skipped.values())})
html = render_index(plates, tables, figures)
with atomic_path(out[0]) as tmp:
    tmp.write_text(html)
log.info("index of %d plates: %s", len(plates), {p["plate"]: p["verdict"] for p in plates})
