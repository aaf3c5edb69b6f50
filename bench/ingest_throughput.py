"""Ingest throughput and peak memory on a generated full 384-well plate.

    python bench/ingest_throughput.py [--screen DIR] [--wells 384 --sites 2 --size 256]
                                      [--shards 4 --threads 2] --out bench/results/ingest.json

Generates the plate with `brightpaint simulate` in a child process (so this process's peak RSS is
the ingest's own), then times the three ingest steps as the workflow runs them: validation (every
TIFF header), the shards (read + write zarr, one after the other as on a 1-node run), assembly.
Throughput counts the raw pixel bytes of the plate's TIFFs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from brightpaint.ingest import assemble_plate_store, plan_layout, shard_wells, write_shard_store
from brightpaint.layout import PlateFolder
from brightpaint.validate import validate_plate

CHANNELS = {"brightfield": "BF", "nuclei": "DNA", "cell": "CYTO", "fluorescence": ["DNA", "CYTO", "DAMAGE"]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screen", help="an existing screen folder (default: generate one)")
    parser.add_argument("--wells", type=int, default=384)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/ingest_throughput.json")
    parser.add_argument("--keep", help="keep the ingested plate here (images.zarr + ingest/), e.g. for "
                                       "bench/preprocess.py")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    screen = Path(args.screen) if args.screen else work / "screen"
    generate_s = None
    if not args.screen:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "brightpaint.cli", "simulate", "--out", str(screen),
                        "--plates", "1", "--wells", str(args.wells), "--sites", str(args.sites),
                        "--size", str(args.size), "--workers", str(args.threads)], check=True)
        generate_s = time.perf_counter() - start
    sheet = pd.read_csv(screen / "plates.tsv", sep="\t")
    plate = sheet.iloc[0]
    manifest, platemap = screen / plate["manifest"], screen / plate["platemap"]

    start = time.perf_counter()
    images, flags = validate_plate(str(manifest), str(platemap), plate["plate"], plate["role"], CHANNELS,
                                   str(screen), threads=args.threads)
    layout = plan_layout(images, plate["plate"], CHANNELS)
    validate_s = time.perf_counter() - start

    start = time.perf_counter()
    stores = []
    for shard in range(args.shards):
        store = work / f"shard{shard}.zarr"
        write_shard_store(images, shard_wells(list(images["well"]), args.shards, shard), layout, store,
                          threads=args.threads, root=screen)
        stores.append(store)
    shards_s = time.perf_counter() - start

    start = time.perf_counter()
    out = work / "images.zarr"
    assemble_plate_store(stores, out, layout)
    assemble_s = time.perf_counter() - start

    n_sites = images[["well", "site"]].drop_duplicates().shape[0]
    raw_mb = len(images) * layout.shape[0] * layout.shape[1] * 2 / 1e6
    stored_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    total_s = validate_s + shards_s + assemble_s
    result = {
        "benchmark": "ingest_throughput",
        "plate": {"wells": int(images["well"].nunique()), "sites": n_sites, "images": len(images),
                  "image_shape": list(layout.shape), "channels": layout.channels, "z_planes": layout.n_z},
        "settings": {"shards": args.shards, "threads": args.threads},
        "seconds": {"generate": generate_s, "validate": validate_s, "shards": shards_s,
                    "assemble": assemble_s, "ingest_total": total_s},
        "raw_pixel_mb": raw_mb,
        "stored_mb": stored_mb,
        "throughput_mb_per_s": raw_mb / total_s,
        "sites_per_s": n_sites / total_s,
        "peak_rss_mb": peak_rss_mb(),
        "host": {"machine": platform.machine(), "python": platform.python_version(),
                 "cpus": __import__("os").cpu_count()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.keep:
        keep = PlateFolder(args.keep)
        Path(keep.layout).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out), keep.store)
        Path(keep.layout).write_text(layout.to_json())
        images.to_parquet(keep.images, index=False)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
