"""Cellpose diameters of a plate's inputs, estimated once per plate (rule segment_calibrate)."""

import json
from pathlib import Path

from brightpaint.atomic import atomic_path
from brightpaint.inference import torch_threads
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.segment.plates import calibrate_plate, open_plate_segmentation
from brightpaint.segment.weights import model_description

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
job = open_plate_segmentation(PlateSources.from_input(inp), inp.virtual, params)
source, device = job.source, job.device
with torch_threads(snakemake.threads):  # noqa: F821
    diameters = calibrate_plate(job.models, job.settings, job.readers, source.usable_sites())
record = {"plate": source.plate, "device": str(device), "inputs": diameters,
          "models": {"nuclei": model_description(params.nuclei_weights),
                     "cells": model_description(params.cell_weights)}}
with atomic_path(out[0]) as tmp:
    Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
for name, d in diameters.items():
    log.info("plate %s, %s stains: nuclei %.1f px, cells %.1f px (from %d sites) on %s", source.plate, name,
             d["nuclei_diameter"], d["cell_diameter"], d["sample_sites"], device)
