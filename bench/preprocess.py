"""CPU time per site of the preprocessing stages on one ingested plate.

    python bench/preprocess.py --plate-dir results/plates/P1 [--n2v-steps 300] \
        --out bench/results/preprocess.json

`--plate-dir` is a workflow plate folder (images.zarr, ingest/layout.json, ingest/images.parquet),
e.g. from `make demo`, or from `bench/ingest_throughput.py --keep DIR` for a generated 384-well plate.
Times are process CPU seconds (time.process_time) and wall seconds, with torch limited to --threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from brightpaint.denoise import denoise_image, sample_training_images, train_n2v
from brightpaint.focus import plate_focus
from brightpaint.illumination import correct_illumination, plate_illumination
from brightpaint.ingest import StoreLayout
from brightpaint.layout import PlateFolder


def timed(function, *args, **kwargs):
    cpu, wall = time.process_time(), time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plate-dir", required=True)
    parser.add_argument("--method", default="cellprofiler", choices=["cellprofiler", "basic"])
    parser.add_argument("--n2v-steps", type=int, default=300)
    parser.add_argument("--n2v-sites", type=int, default=16)
    parser.add_argument("--predict-sites", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/preprocess.json")
    args = parser.parse_args()

    folder = PlateFolder(args.plate_dir)
    store = folder.store
    layout = StoreLayout.from_json(Path(folder.layout).read_text())
    sites = pd.read_parquet(folder.images, columns=["well", "site"]).drop_duplicates()
    wells = sorted(set(sites["well"]))
    n_sites = len(sites)
    result = {"benchmark": "preprocess", "plate": layout.plate, "sites": n_sites,
              "image_shape": list(layout.shape), "channels": layout.channels, "stages": {}}

    for channel in layout.channels:
        function, cpu, wall = timed(plate_illumination, store, layout, channel, method=args.method)
        result["stages"][f"illumination_{channel}"] = {
            "method": args.method, "images_used": function.n_images, "cpu_s": cpu, "wall_s": wall,
            "cpu_s_per_site": cpu / n_sites}

    table, cpu, wall = timed(plate_focus, store, wells, layout)
    result["stages"]["focus"] = {"cpu_s": cpu, "wall_s": wall, "cpu_s_per_site": cpu / max(1, len(table)),
                                 "flagged": int((table["flag"] != "").sum())}

    fluorescence = [c for c in layout.channels if layout.roles.get(c) != "brightfield"]
    if fluorescence:
        channel = fluorescence[0]
        function = plate_illumination(store, layout, channel, method=args.method)
        images = sample_training_images(store, layout, channel, wells, max_sites=args.n2v_sites,
                                        correct=lambda image: correct_illumination(image, function))
        (model, _), cpu, wall = timed(train_n2v, images, steps=args.n2v_steps, threads=args.threads,
                                      channel=channel)
        result["stages"]["n2v_train"] = {"channel": channel, "steps": args.n2v_steps,
                                         "training_images": len(images), "cpu_s": cpu, "wall_s": wall}
        cpu = wall = 0.0
        for image in images[: args.predict_sites]:
            _, c, w = timed(denoise_image, model, image, threads=args.threads)
            cpu, wall = cpu + c, wall + w
        count = min(len(images), args.predict_sites)
        result["stages"]["n2v_predict"] = {"channel": channel, "cpu_s_per_site": cpu / count,
                                           "wall_s_per_site": wall / count}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
