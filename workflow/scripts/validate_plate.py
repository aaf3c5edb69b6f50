"""Check a plate's manifest, plate map and image headers (rule validate_plate)."""

from pathlib import Path

from brightpaint.atomic import atomic_path
from brightpaint.ingest import plan_layout
from brightpaint.logs import log_to_rule
from brightpaint.validate import ImageLimits, validate_plate

log = log_to_rule(snakemake)  # noqa: F821
p, out = snakemake.params, snakemake.output  # noqa: F821
plate = snakemake.wildcards.plate  # noqa: F821
# Image paths in a manifest are relative to the screen folder, resolved only here: an absolute path
# in params would make a moved or copied results folder rerun every plate.
root = str(Path(p.screen_folder).resolve())
limits = ImageLimits(max_image_pixels=p.max_image_pixels, max_planes=p.max_planes,
                     max_plate_bytes=p.max_plate_bytes)
images, flags = validate_plate(p.manifest, p.platemap, plate, p.role, dict(p.channels), root,
                               p.on_missing, threads=snakemake.threads, limits=limits,  # noqa: F821
                               control_labels=dict(p.control_labels))
layout = plan_layout(images, plate, dict(p.channels))
with atomic_path(out.flags) as tmp:
    flags.to_csv(tmp, index=False)
with atomic_path(out.layout) as tmp:
    tmp.write_text(layout.to_json())
with atomic_path(out.images) as tmp:
    images.to_parquet(tmp, index=False)
log.info("plate %s: %d images accepted, %d QC flag(s); channels %s, %d planes, shape %s",
         plate, len(images), len(flags), layout.channels, layout.n_z, layout.shape)
