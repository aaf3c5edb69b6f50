"""Command line: `brightpaint simulate | validate | manifest-from-folder`.

The workflow itself runs with snakemake; these commands serve a user preparing a screen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .demo.screen import simulate_screen
from .demo.spec import DEFAULT_PLATES, ScreenSpec, spec_from_config
from .io import InputError, manifest_from_folder, read_screen_sheet
from .validate import validate_plate

DEMO_CHANNELS = {"brightfield": "BF", "nuclei": "DNA", "cell": "CYTO",
                 "fluorescence": ["DNA", "CYTO", "DAMAGE"]}


def _simulate(args: argparse.Namespace) -> int:
    if args.config:
        # the demo config's `simulate:` section: where to write and the generator's spec
        settings = dict(_config_section(args.config, "simulate"))
        out = args.out or settings.pop("outdir", None)
        settings.pop("outdir", None)
        if not out:
            raise SystemExit(f"{args.config}: `simulate.outdir` is not set (or give --out)")
        try:
            spec = spec_from_config(settings)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"{args.config}: simulate: {err}") from err
    else:
        if not args.out:
            raise SystemExit("give --out (the screen folder to write) or --config")
        if not 1 <= args.plates <= len(DEFAULT_PLATES):
            raise SystemExit(f"--plates must be 1..{len(DEFAULT_PLATES)}")
        out = args.out
        spec = ScreenSpec(plates=DEFAULT_PLATES[: args.plates], wells=args.wells, sites=args.sites,
                          size=args.size, z_planes=args.z_planes, seed=args.seed)
    sheet = simulate_screen(out, spec, workers=args.workers)
    print(f"screen written: {sheet}")
    return 0


def _config_section(path: str, key: str) -> dict:
    """One section of a YAML config file, or a clear exit naming the file and what is wrong."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise SystemExit(f"config {path}: cannot be read ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise SystemExit(f"config {path}: not valid YAML ({err})") from err
    section = config.get(key) if isinstance(config, dict) else None
    if not isinstance(section, dict):
        raise SystemExit(f"config {path}: no `{key}:` section (a mapping)")
    return section


def _validate(args: argparse.Namespace) -> int:
    channels = DEMO_CHANNELS
    if args.config:
        channels = yaml.safe_load(Path(args.config).read_text())["channels"]
    failures = []
    try:
        sheet = read_screen_sheet(args.sheet)
    except InputError as err:
        print(err, file=sys.stderr)
        return 1
    root = str(Path(args.sheet).parent.resolve())
    for row in sheet.itertuples():
        try:
            images, flags = validate_plate(row.manifest, row.platemap, row.plate, row.role, channels,
                                           root, args.on_missing, threads=args.threads)
        except InputError as err:
            failures.append(str(err))
            continue
        print(f"plate {row.plate}: {len(images)} images, {len(flags)} QC flag(s)")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"{len(sheet)} plate(s) valid")
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
    val.add_argument("--config", help="a config file whose `channels:` to use (default: demo's)")
    val.add_argument("--on-missing", choices=["error", "flag"], default="error")
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
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
