"""Train a Cellpose network from scratch on the demo generator's images (rule segment_train)."""

import json
from pathlib import Path

from brightpaint.atomic import atomic_path
from brightpaint.demo.cellpose_weights import train_shipped_model
from brightpaint.logs import log_to_rule

log = log_to_rule(snakemake)  # noqa: F821
out, settings = snakemake.output, snakemake.params.settings  # noqa: F821
kind = snakemake.wildcards.kind  # noqa: F821
card = train_shipped_model(kind, out.weights, sites=settings["sites"], epochs=settings["epochs"],
                           seed=settings["seed"], threads=snakemake.threads,  # noqa: F821
                           real_nuclei=settings["real_nuclei"] or None)
with atomic_path(out.card) as tmp:
    Path(tmp).write_text(json.dumps(card, indent=2) + "\n")
log.info("%s model: %d epochs in %.0f s; held-out AP@0.5 %s", kind, card["training"]["epochs"],
         card["training"]["seconds"], card["metrics"])
