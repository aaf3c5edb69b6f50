"""Train one virtual-staining model on the screen's plates with real stains (rule stain_train)."""

from brightpaint.atomic import atomic_path
from brightpaint.io import read_platemap
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.plate import open_plate_source
from brightpaint.stain.files import save_stain_model
from brightpaint.stain.settings import StainSettings
from brightpaint.stain.train import fit_stain_model

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
control_labels = dict(params.control_labels)  # plate-map control_type labels
# each plate's sources as the registry names them, checked to be among the job's inputs
sources = [open_plate_source(PlateSources.from_params(files).among(inp, snakemake.rule),  # noqa: F821
                             params.brightfield, platemap=read_platemap(platemap, control_labels))
           for files, platemap in zip(params.sources, inp.platemaps, strict=True)]
generator, card, history = fit_stain_model(
    sources, list(params.targets), StainSettings.from_config(dict(params.settings)),
    brightfield=params.brightfield, plates=[{k: str(v) for k, v in row.items()} for row in params.plates],
    well_query=params.train_wells, validation_query=params.validation_wells, device=params.device,
    threads=snakemake.threads,  # noqa: F821
    domain_quantile=params.domain["quantile"], domain_floor=params.domain["floor"])
card = save_stain_model(generator, card, out.model)
with atomic_path(out.history) as tmp:
    history.to_csv(tmp, index=False)
log.info("model %s: best epoch %d, %s", out.model, card["metrics"]["best_epoch"], card["metrics"])
