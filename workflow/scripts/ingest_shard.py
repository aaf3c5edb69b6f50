"""Stream one shard of a plate's wells into zarr (rule ingest_shard)."""

from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.ingest import StoreLayout, shard_wells, write_shard_store
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
images = pd.read_parquet(inp.images)
layout = StoreLayout.from_json(Path(inp.layout).read_text())
wells = shard_wells(list(images["well"]), params.n_shards, int(snakemake.wildcards.shard))  # noqa: F821
# the screen folder validate_plate checked the image paths against, resolved the same way: every
# image is checked again as it is read (a file replaced after validation must not leave it)
root = str(Path(params.screen_folder).resolve())
qc = write_shard_store(images, wells, layout, out.store, threads=snakemake.threads,  # noqa: F821
                       saturation_limit=params.saturation_flag, root=root)
with atomic_path(out.qc) as tmp:
    qc.to_parquet(tmp, index=False)
log.info("shard %s: %d wells, %d images", snakemake.wildcards.shard, len(wells), len(qc))  # noqa: F821
