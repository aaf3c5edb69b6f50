"""The generalisation matrix from every group model's stored metrics (rule generalisation_matrix)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.generalisation import generalisation_matrix, matrix_figure
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
matrix = generalisation_matrix(pd.concat([pd.read_parquet(path) for path in inp], ignore_index=True))
with atomic_path(out.matrix) as tmp:
    matrix.to_parquet(tmp, index=False)
with atomic_path(out.figure) as tmp:
    matrix_figure(matrix, tmp)
log.info("difference to the in-distribution model:\n%s",
         matrix.pivot_table(index=["metric", "train_group"], columns="test_group", values="difference")
         .round(3).to_string())
