"""The screen's index page (rule report_index): every plate's report with its verdict, and the
screen-level matching."""

import json
from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.logs import log_to_rule
from brightpaint.report import render_index

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
index_dir = Path(out[0]).resolve().parent
plates = []
for path in inp.summaries:
    summary = json.loads(Path(path).read_text())
    summary["href"] = str(Path(path).resolve().with_name("report.html").relative_to(index_dir))
    plates.append(summary)
html = render_index(plates, {"screen matching": pd.read_parquet(inp.screen)})
with atomic_path(out[0]) as tmp:
    tmp.write_text(html)
log.info("index of %d plates: %s", len(plates), {p["plate"]: p["verdict"] for p in plates})
