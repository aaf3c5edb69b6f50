"""One group's model on every group's held-out wells, at the three levels (rule
generalisation_evaluate)."""

import json
from pathlib import Path

from brightpaint.atomic import atomic_path
from brightpaint.generalisation import evaluate_model, held_out_sites
from brightpaint.inference import resolve_device, torch_threads
from brightpaint.io import read_platemap
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.plate import open_plate_source
from brightpaint.segment.run import Segmenter
from brightpaint.segment.settings import SegmentSettings
from brightpaint.segment.weights import load_cellpose_model
from brightpaint.stain.files import load_stain_model

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
control_labels = dict(params.control_labels)  # plate-map control_type labels
device = resolve_device(params.device, what="generalisation matrix")
generator, card = load_stain_model(inp.model)
# each plate's sources as the registry names them, checked to be among the job's inputs
sources = [open_plate_source(PlateSources.from_params(files).among(inp, snakemake.rule),  # noqa: F821
                             params.brightfield, platemap=read_platemap(platemap, control_labels))
           for files, platemap in zip(params.sources, inp.platemaps, strict=True)]
tests = {group: held_out_sites(json.loads(Path(path).read_text()), sources, params.test_sites)
         for group, path in zip(params.groups, inp.cards, strict=True)}
settings = SegmentSettings.from_config(params.segment)
nuclei_network = load_cellpose_model(params.nuclei_weights, device)  # level 2 segments nuclei only
segmenters, labels = {}, {}
for source, diameters, store in zip(sources, inp.diameters, inp.labels, strict=True):
    virtual = json.loads(Path(diameters).read_text())["inputs"]["virtual"]
    segmenters[source.plate] = Segmenter(nuclei_network, None, settings, virtual["nuclei_diameter"])
    labels[source.plate] = store
with torch_threads(snakemake.threads):  # noqa: F821
    table = evaluate_model(generator, card, snakemake.wildcards.group, tests, segmenters, labels,  # noqa: F821
                           params.nuclei, tile=params.tile, overlap=params.overlap, device=device)
with atomic_path(out[0]) as tmp:
    table.to_parquet(tmp, index=False)
log.info("model of %s on %s:\n%s", snakemake.wildcards.group, {g: len(s) for g, s in tests.items()},  # noqa: F821
         table.groupby(["test_group", "metric"])["value"].mean().unstack().round(3).to_string())
