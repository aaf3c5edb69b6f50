"""Train the generalisation matrix's model of one group of wells (rule generalisation_train)."""

from dataclasses import asdict

from brightpaint.atomic import atomic_path
from brightpaint.generalisation import group_sources
from brightpaint.groups import Group
from brightpaint.io import read_platemap
from brightpaint.layout import PlateSources
from brightpaint.logs import log_to_rule
from brightpaint.plate import open_plate_source
from brightpaint.stain.files import save_stain_model
from brightpaint.stain.settings import StainError, StainSettings
from brightpaint.stain.train import fit_stain_model

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
control_labels = dict(params.control_labels)  # plate-map control_type labels
group = Group(**params.group)
# each plate's sources as the registry names them, checked to be among the job's inputs
plates = [(open_plate_source(PlateSources.from_params(files).among(inp, snakemake.rule),  # noqa: F821
                             params.brightfield, platemap=read_platemap(platemap, control_labels)), row)
          for files, platemap, row in zip(params.sources, inp.platemaps, params.plates, strict=True)]
sources = group_sources(group, [(source, str(row["cell_type"])) for source, row in plates])
if not sources:
    raise StainError(f"generalisation group {group.name}: no training plate has wells of cell type "
                     f"{group.cell_type or 'any'} matching {group.query or 'all wells'!r}")
rows = [{k: str(v) for k, v in row.items()} for source, row in plates if source in sources]
generator, card, history = fit_stain_model(
    sources, list(params.targets), StainSettings.from_config(dict(params.settings)),
    brightfield=params.brightfield, plates=rows, well_query=group.query, device=params.device,
    threads=snakemake.threads, domain_quantile=params.domain["quantile"],  # noqa: F821
    domain_floor=params.domain["floor"])
card = save_stain_model(generator, {**card, "group": asdict(group)}, out.model)
with atomic_path(out.history) as tmp:
    history.to_csv(tmp, index=False)
log.info("group %s: trained on %s sites of plates %s, best epoch %d, %s", group.name, card["n_sites"],
         [s.plate for s in sources], card["metrics"]["best_epoch"], card["metrics"])
