"""Command line: `brightpaint simulate | validate | manifest-from-folder`.

The workflow itself runs with snakemake; these commands serve a user preparing a screen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .demo.screen import simulate_screen
from .demo.spec import DEFAULT_PLATES, ScreenSpec, spec_from_config
from .errors import UserError
from .io import manifest_from_folder
from .validate import ImageLimits, sample_pixel_flags, validate_plate
from .workflow import DEFAULT_CONFIG, Screen, check_config, merged_config, read_config_file


def _simulate(args: argparse.Namespace) -> int:
    if args.config:
        # the demo config's `simulate:` section: where to write and the generator's spec
        settings = dict(_config_section(args.config, "simulate"))
        out = args.out or settings.pop("outdir", None)
        settings.pop("outdir", None)
        if not out:
            raise UserError(f"{args.config}: `simulate.outdir` is not set (or give --out)")
        try:
            spec = spec_from_config(settings)
        except (TypeError, ValueError) as err:
            raise UserError(f"{args.config}: simulate: {err}") from err
    else:
        if not args.out:
            raise UserError("give --out (the screen folder to write) or --config")
        if not 1 <= args.plates <= len(DEFAULT_PLATES):
            raise UserError(f"--plates must be 1..{len(DEFAULT_PLATES)}")
        out = args.out
        try:
            spec = ScreenSpec(plates=DEFAULT_PLATES[: args.plates], wells=args.wells,
                              sites=args.sites, size=args.size, z_planes=args.z_planes,
                              seed=args.seed)
        except ValueError as err:  # the spec names its field: z_planes -> --z-planes
            option = str(err).split(":")[0].replace("_", "-")
            raise UserError(f"--{option}: {str(err).split(': ', 1)[-1]}") from err
    sheet = simulate_screen(out, spec, workers=args.workers)
    print(f"screen written: {sheet}")
    return 0


def _config_section(path: str, key: str) -> dict:
    """One section of a YAML config file, or a UserError naming the file and what is wrong."""
    section = read_config_file(path).get(key)
    if not isinstance(section, dict):
        raise UserError(f"config {path}: no `{key}:` section (a mapping)")
    return section


def validation_config(sheet: str, config_path: str) -> dict:
    """The config the workflow would run with: config/config.yaml's defaults, the user's file on top
    (its channels: a screen is checked against its own), and `screen` = the sheet given on the
    command line."""
    user = read_config_file(config_path)
    defaults = read_config_file(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else {}
    return merged_config(defaults, {**user, "screen": sheet})


def _validate(args: argparse.Namespace) -> int:
    """The checks the workflow makes when it is parsed (config schema, channel roles, the sheet,
    the config's plate selection) and in each plate's validate_plate job, in that order."""
    config = validation_config(args.sheet, args.config)
    check_config(config, source=f"config {args.config}")
    screen = Screen.from_config(config)
    screen.stain_training_plates()  # the workflow's parse-time check of the stain settings
    # .get: without the repository's config/config.yaml (a non-editable install) the defaults hold
    ingest = config.get("ingest", {})
    on_missing = args.on_missing or ingest.get("on_missing", "error")
    limits = ImageLimits.from_config(ingest)
    root = str(Path(args.sheet).parent.resolve())
    failures = []
    for plate in screen.selected_plates():
        row = screen.plate_row(plate)
        try:
            images, flags = validate_plate(row["manifest"], row["platemap"], plate, row["role"],
                                           config["channels"], root, on_missing,
                                           threads=args.threads, limits=limits,
                                           profiles=config.get("profiles", {}), plate_info=row,
                                           control_labels=config.get("platemap", {}).get("control_types"))
        except UserError as err:
            failures.append(str(err))
            continue
        print(f"plate {plate}: {len(images)} images, {len(flags)} QC flag(s)")
        if args.pixels:
            flagged = sample_pixel_flags(images, root, args.pixels, seed=0,
                                         saturation_limit=float(ingest.get("saturation_flag", 0.01)))
            checked = min(args.pixels, len(images))
            print(f"plate {plate}: pixels of {checked} image(s) read, {len(flagged)} flagged as ingest "
                  "would flag them")
            for row in flagged.itertuples():
                print(f"  {row.file} (well {row.well}, site {row.site}, {row.channel} z {row.z}): "
                      f"{row.flag}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"{len(screen.selected_plates())} plate(s) valid")
    return 0


def _manifest_from_folder(args: argparse.Namespace) -> int:
    manifest = manifest_from_folder(args.folder, args.pattern, plate=args.plate,
                                    site_offset=args.site_offset)
    out = Path(args.out) if args.out else Path(args.folder) / "manifest.csv"
    manifest.to_csv(out, index=False)
    print(f"{len(manifest)} images -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brightpaint", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="write the demo screen (input contract + truth)")
    sim.add_argument("--config", help="a config file whose `simulate:` section gives the spec and "
                                      "the folder (e.g. config/demo.yaml); the other options are ignored")
    sim.add_argument("--out", help="screen folder to write (default with --config: simulate.outdir)")
    sim.add_argument("--wells", type=int, default=24, help="wells per plate (384 = full plate)")
    sim.add_argument("--sites", type=int, default=2)
    sim.add_argument("--size", type=int, default=256, help="image side in pixels")
    sim.add_argument("--z-planes", type=int, default=5)
    sim.add_argument("--plates", type=int, default=4, help="how many of the default plates")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--workers", type=int, default=1)
    sim.set_defaults(run=_simulate)

    val = commands.add_parser("validate", help="check a screen sheet, its manifests, plate maps "
                                               "and image headers; list every problem")
    val.add_argument("sheet")
    val.add_argument("--config", required=True,
                     help="the config file the workflow will run with: its channels and settings "
                          "(its `screen:` is replaced by SHEET; the demo: config/demo.yaml)")
    val.add_argument("--pixels", type=int, default=0, metavar="N",
                     help="also read the pixels of up to N images per plate (a seeded sample) and list "
                          "the saturated, blank or NaN ones, as ingest would flag them")
    val.add_argument("--on-missing", choices=["error", "flag"],
                     help="default: the config's ingest.on_missing")
    val.add_argument("--threads", type=int, default=2)
    val.set_defaults(run=_validate)

    mff = commands.add_parser("manifest-from-folder",
                              help="build a manifest from file names, e.g. "
                                   "'{well}_s{site}_{channel}_z{z}.tif'")
    mff.add_argument("folder")
    mff.add_argument("pattern", help="placeholders {plate} {well} {site} {channel} {z}, * = any")
    mff.add_argument("--plate", help="plate id when the pattern has no {plate}")
    mff.add_argument("--site-offset", type=int, default=0,
                     help="added to parsed sites (1 when fields count from 0)")
    mff.add_argument("--out", help="manifest path (default: FOLDER/manifest.csv)")
    mff.set_defaults(run=_manifest_from_folder)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        # a problem with what the user gave: its message (file, line, field) is the whole story
        print(f"brightpaint {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
