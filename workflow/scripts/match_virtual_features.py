"""Per feature, the real-vs-virtual agreement over the wells of the plates measured on both stain
sources: the features the virtual profiles are matched on (rule match_virtual_features)."""

import pandas as pd

from brightpaint.atomic import atomic_path
from brightpaint.logs import log_to_rule
from brightpaint.match import virtual_feature_agreement

log = log_to_rule(snakemake)  # noqa: F821
inp, out = snakemake.input, snakemake.output  # noqa: F821
normalised = (pd.concat([pd.read_parquet(path) for path in inp.normalised], ignore_index=True)
              if inp.normalised else pd.DataFrame())
agreement = virtual_feature_agreement(normalised)
with atomic_path(out.agreement) as tmp:
    agreement.to_parquet(tmp, index=False)
log.info("real-vs-virtual agreement of %d features over the wells of %d plate(s); median Pearson r %s",
         len(agreement), len(inp.normalised), agreement["pearson"].median() if len(agreement) else "none")
