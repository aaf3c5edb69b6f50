"""Denoise one shard of a plate's fluorescence channels (rule denoise_shard): Noise2Void where the
plate's assessment says it helps, the illumination-corrected input where it does not."""

import json
from pathlib import Path

import pandas as pd

from brightpaint.denoise import denoise_if_assessed, load_n2v, resolve_device
from brightpaint.derived import write_derived_store
from brightpaint.illumination import correct_illumination, load_illumination
from brightpaint.ingest import StoreLayout, shard_wells
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
layout = StoreLayout.from_json(Path(inp.layout).read_text())
device = resolve_device(params.device, what="Noise2Void")
channels = list(params.channels)
illumination = {c: load_illumination(path) for c, path in zip(channels, inp.illum, strict=True)}
assessment = json.loads(Path(inp.assessment).read_text())["channels"]
models = {c: load_n2v(path)[0] if assessment[c]["apply"] else None
          for c, path in zip(channels, inp.models, strict=True)}
sites = pd.read_parquet(inp.images, columns=["well", "site"])
wells = shard_wells(list(sites["well"]), params.n_shards, int(snakemake.wildcards.shard))  # noqa: F821
selected = sites[sites["well"].isin(wells)].drop_duplicates()
table = write_derived_store(
    inp.store, layout, list(zip(selected["well"], selected["site"], strict=True)), channels,
    lambda channel, plane: denoise_if_assessed(
        models[channel], correct_illumination(plane, illumination[channel]), tile=params.tile,
        device=params.device, threads=snakemake.threads),  # noqa: F821
    out.store, threads=1)
kept = sorted(c for c, model in models.items() if model is None)
log.info("shard %s: %d sites x %s on %s, %s kept as corrected input (assessment)",  # noqa: F821
         snakemake.wildcards.shard, len(selected), channels, device, kept)  # noqa: F821
