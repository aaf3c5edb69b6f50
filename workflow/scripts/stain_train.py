"""Train one virtual-staining model on the screen's plates with real stains (rule stain_train)."""

from brightpaint.atomic import atomic_path
from brightpaint.io import read_platemap
from brightpaint.logs import log_to_rule
from brightpaint.stain import (
    StainSettings,
    build_training_set,
    model_card,
    open_plate_source,
    save_stain_model,
    train_stain_model,
    training_domain,
)

log = log_to_rule(snakemake)  # noqa: F821
inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
settings = StainSettings.from_config(dict(params.settings))
sources = [open_plate_source(folder, params.brightfield, platemap=read_platemap(platemap))
           for folder, platemap in zip(params.plate_dirs, inp.platemaps, strict=True)]
targets = list(params.targets)
data = build_training_set(sources, targets, settings, params.train_wells)
log.info("training on %d sites (%d validation) of plates %s", len(data.train), len(data.validation),
         [s.plate for s in sources])
generator, history = train_stain_model(data, targets, settings, device=params.device,
                                       threads=snakemake.threads)  # noqa: F821
card = model_card(settings, data, targets, params.brightfield, history,
                  [{k: str(v) for k, v in row.items()} for row in params.plates], params.train_wells)
card["domain"] = training_domain(sources, data, quantile=params.domain["quantile"],
                                 floor=params.domain["floor"])
log.info("domain: %s, threshold %.2f robust SD (validation sites' max %.2f)",
         {k: round(v["median"], 4) for k, v in card["domain"]["statistics"].items()},
         card["domain"]["threshold"], card["domain"]["validation_score_max"])
card = save_stain_model(generator, card, out.model)
with atomic_path(out.history) as tmp:
    history.to_csv(tmp, index=False)
log.info("model %s: best epoch %d, %s", out.model, card["metrics"]["best_epoch"], card["metrics"])
