"""Illumination function of one plate and channel (rule illumination)."""

from pathlib import Path

from brightpaint.atomic import atomic_path
from brightpaint.illumination import plate_illumination, save_illumination
from brightpaint.ingest import StoreLayout
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
channel = snakemake.wildcards.channel  # noqa: F821
layout = StoreLayout.from_json(Path(inp.layout).read_text())
function = plate_illumination(inp.store, layout, channel, method=params.method, max_sites=params.max_sites,
                              dark=params.dark, fluorescence_average=params.fluorescence_average)
with atomic_path(out.function) as npy, atomic_path(out.figure) as png, atomic_path(out.meta) as meta:
    save_illumination(function, npy, png, meta)
log.info("plate %s channel %s: %s illumination from %d images (%d excluded)%s", layout.plate, channel,
         function.method, function.n_images, function.n_excluded,
         f"; IDENTITY FLAT: {function.params['fallback']}" if function.params["fallback"] else "")
