"""Nuclei, cells and cytoplasm of one shard of a plate's sites, real and virtual (rule segment_shard)."""

import json
from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.inference import torch_threads
from brightpaint.ingest import shard_wells, stored_sites
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.segment.plates import open_plate_segmentation, segment_shard, unusable_sites
from brightpaint.segment.run import Segmenter

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
job = open_plate_segmentation(PlateSources.from_input(inp), inp.virtual, params)
source, device = job.source, job.device
diameters = json.loads(Path(inp.diameters).read_text())["inputs"]
segmenters = {name: Segmenter(*job.models, job.settings, d["nuclei_diameter"], d["cell_diameter"])
              for name, d in diameters.items()}
wells = shard_wells(sorted({w for w, _ in stored_sites(inp.virtual)}), params.n_shards,
                    int(snakemake.wildcards.shard))  # noqa: F821
skip = unusable_sites(pd.read_csv(inp.stain_sites, keep_default_na=False))
with torch_threads(snakemake.threads):  # noqa: F821
    table = segment_shard(segmenters, job.readers, stored_sites(inp.virtual, wells), inp.virtual, out.store,
                          skip=skip, sites_per_batch=params.sites_per_batch)
with atomic_path(out.sites) as tmp:
    table.to_csv(tmp, index=False)
for name, group in table.groupby("source"):
    log.info("plate %s shard %s, %s stains: %d sites, %d objects, %.2f s per site on %s; %d not ok",
             source.plate, snakemake.wildcards.shard, name, len(group), group["objects"].sum(),  # noqa: F821
             group["seconds"].mean(), device, int((group["status"] != "ok").sum()))
