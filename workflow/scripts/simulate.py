"""Write the demo screen (rule simulate_demo)."""

from pathlib import Path

from brightpaint.logs import log_to_rule
from brightpaint.simulate import simulate_screen, spec_from_config
from brightpaint.workflow import demo_spec_config

log = log_to_rule(snakemake)  # noqa: F821
spec_config = demo_spec_config(dict(snakemake.params.spec))  # noqa: F821
outdir = Path(snakemake.output.sheet).parent  # noqa: F821
sheet = simulate_screen(outdir, spec_from_config(spec_config), workers=snakemake.threads)  # noqa: F821
log.info("demo screen written: %s", sheet)
