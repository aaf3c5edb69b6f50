"""Train a Noise2Void model for one channel (rules denoise_train_plate / denoise_train_screen)."""

import json
from pathlib import Path

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.denoise import (
    choose_training_sites,
    read_training_images,
    resolve_device,
    save_n2v,
    train_n2v,
)
from brightpaint.illumination import correct_illumination, load_illumination
from brightpaint.ingest import StoreLayout
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
channel = snakemake.wildcards.channel  # noqa: F821
device = resolve_device(params.device, what="Noise2Void")
images, plates, sites = [], [], {}
per_plate = max(1, params.max_sites // max(1, len(inp.stores)))
for store, layout_path, images_path, illum_path in zip(inp.stores, inp.layouts, inp.images, inp.illum,
                                                      strict=True):
    layout = StoreLayout.from_json(Path(layout_path).read_text())
    function = load_illumination(illum_path)
    accepted = pd.read_parquet(images_path, columns=["well"])
    wells = sorted(set(accepted["well"]))
    chosen = choose_training_sites(store, wells, per_plate, params.seed)
    images += read_training_images(store, layout, channel, chosen,
                                   correct=lambda image, f=function: correct_illumination(image, f))
    plates.append(layout.plate)
    sites[layout.plate] = [[well, int(site)] for well, site in chosen]  # not used to judge the model
model, history = train_n2v(images, steps=params.steps, patch=params.patch, batch=params.batch,
                           seed=params.seed, device=params.device, precision=params.precision,
                           threads=snakemake.threads,  # noqa: F821
                           channel=channel)
with atomic_path(out.model) as tmp:
    metadata = save_n2v(model, tmp, {"channel": channel, "plates": plates, "n_images": len(images),
                                     "sites": sites})
log.info("N2V %s on %s: %d images, %s", channel, device, len(images), json.dumps(metadata, default=str))
