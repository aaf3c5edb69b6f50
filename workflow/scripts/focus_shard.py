"""Focus scores, chosen plane and blur QC for one shard of wells (rule focus_shard)."""

from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.focus import plate_focus
from brightpaint.ingest import StoreLayout, shard_wells
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
layout = StoreLayout.from_json(Path(inp.layout).read_text())
images = pd.read_parquet(inp.images, columns=["well"])
wells = shard_wells(list(images["well"]), params.n_shards, int(snakemake.wildcards.shard))  # noqa: F821
table = plate_focus(inp.store, wells, layout, method=params.method, half_width=params.half_width)
with atomic_path(out.table) as tmp:
    table.to_parquet(tmp, index=False)
log.info("shard %s: %d sites, %d flagged", snakemake.wildcards.shard, len(table),  # noqa: F821
         int((table["flag"] != "").sum()) if len(table) else 0)
