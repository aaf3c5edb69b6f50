"""Cellpose diameters of a plate's inputs, estimated once per plate (rule segment_calibrate)."""

import json
from pathlib import Path

from brightpaint.atomic import atomic_path
from brightpaint.inference import resolve_device, torch_threads
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.plate import open_plate_source
from brightpaint.segment.plates import calibrate_plate, plate_readers
from brightpaint.segment.settings import SegmentSettings
from brightpaint.segment.weights import load_cellpose_model, model_description

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
device = resolve_device(params.device, what="segmentation")
settings = SegmentSettings.from_config(params.settings)
source = open_plate_source(PlateSources.from_input(inp), params.brightfield)
readers = plate_readers(source, inp.virtual, params.nuclei, params.cell)
models = tuple(load_cellpose_model(path, device) for path in (params.nuclei_weights, params.cell_weights))
with torch_threads(snakemake.threads):  # noqa: F821
    diameters = calibrate_plate(models, settings, readers, source.usable_sites())
record = {"plate": source.plate, "device": str(device), "inputs": diameters,
          "models": {"nuclei": model_description(params.nuclei_weights),
                     "cells": model_description(params.cell_weights)}}
with atomic_path(out[0]) as tmp:
    Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
for name, d in diameters.items():
    log.info("plate %s, %s stains: nuclei %.1f px, cells %.1f px (from %d sites) on %s", source.plate, name,
             d["nuclei_diameter"], d["cell_diameter"], d["sample_sites"], device)
