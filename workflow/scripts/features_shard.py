"""CellProfiler features of one shard of a plate's wells, real and virtual stains (rule features_shard)."""

import tempfile

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.features.extract import batch_sites, measurable_sites, plate_site_readers, write_features
from brightpaint.ingest import shard_wells
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.plate import open_plate_source

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
shard = int(snakemake.wildcards.shard)  # noqa: F821
source = open_plate_source(PlateSources.from_input(inp), params.brightfield)
segment_sites = pd.read_csv(inp.segment_sites, keep_default_na=False)
wells = shard_wells(list(segment_sites["well"]), params.n_shards, shard)
sites, skipped = measurable_sites(source.plate, segment_sites, wells, params.sources)
read_images, read_labels = plate_site_readers(source, inp.virtual, inp.labels)
# batches of sites: the job holds one batch's table, never the shard's
sites_per_batch = batch_sites(source.layout.shape, params.batch_megapixels)
log.info("plate %s shard %d: %d sites to measure, %d per CellProfiler run", source.plate, shard, len(sites),
         sites_per_batch)
with (tempfile.TemporaryDirectory(prefix=f"features-{source.plate}-{shard}-") as work,
      atomic_path(out.cells) as cells, atomic_path(out.images) as images):
    qc = write_features(sites, read_images, read_labels, cells, images, params.pipeline, work,
                        sites_per_batch=sites_per_batch, tiled_pipeline=params.get("tiled_pipeline"),
                        tile_pixels=params.tile_pixels, cellprofiler=params.cellprofiler,
                        threads=snakemake.threads, log=snakemake.log.cellprofiler)  # noqa: F821
qc = pd.concat([skipped, qc], ignore_index=True).sort_values(["source", "well", "site"])
with atomic_path(out.sites) as tmp:
    qc.to_csv(tmp, index=False)
for name, group in qc.groupby("source"):
    log.info("plate %s shard %d, %s stains: %d sites, %d cells, status %s", source.plate, shard, name,
             len(group), group["cells"].sum(), group["status"].value_counts().to_dict())
