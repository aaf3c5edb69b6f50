"""Virtual channels for one shard of a plate's wells (rule stain_shard)."""

from brightpaint.atomic import atomic_path
from brightpaint.inference import resolve_device, torch_threads
from brightpaint.ingest import shard_wells, stored_sites
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.plate import open_plate_source
from brightpaint.stain.files import load_stain_model
from brightpaint.stain.predict import predict_sites

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
device = resolve_device(params.device, what="virtual staining")
source = open_plate_source(PlateSources.from_input(inp), params.brightfield, use_denoised=False)
models = [load_stain_model(path) for path in inp.models]
wells = shard_wells(sorted({w for w, _ in stored_sites(source.store)}), params.n_shards,
                    int(snakemake.wildcards.shard))  # noqa: F821
with torch_threads(snakemake.threads):  # noqa: F821
    table = predict_sites(source, stored_sites(source.store, wells), models, out.store, device=device,
                          tile=params.tile, overlap=params.overlap, batch=params.batch,
                          augmentations=params.augmentations, domain=params.domain_check)
with atomic_path(out.sites) as tmp:
    table.to_csv(tmp, index=False)
log.info("plate %s shard %s: %d sites on %s (%d augmentations), %.2f s per site; %d skipped, %d outside "
         "the models' domain", source.plate, snakemake.wildcards.shard, len(table), device,  # noqa: F821
         params.augmentations, table["seconds"].mean() if len(table) else 0,
         int((table["status"] != "ok").sum()),
         int(table["domain_outside"].sum()) if "domain_outside" in table else 0)
