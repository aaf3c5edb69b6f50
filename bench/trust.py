"""Cost and value of the trust checks on a finished demo run: per site, the time of the domain guard
(brightfield statistics and score) against the prediction's, and for 1, 2, 4 and 8 test-time
augmentations the prediction time, the accuracy of the mean prediction (PCC with the real stain)
and how well the uncertainty ranks held-out sites by error (Spearman, 1 - PCC).

    python bench/trust.py --run results/.. --out bench/results/trust.json [--threads 2]

`--run` is the working directory of a demo run (the folder holding results/). Every usable site of
the held-out wells (with --all-sites, of every well) of the plates with real stains is predicted
once per augmentation count, in memory (no store I/O).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from report_json import emit

from brightpaint.inference import torch_threads
from brightpaint.layout import PlateFolder
from brightpaint.plate import (
    brightfield_planes,
    fluorescence_plane,
    open_plate_source,
    plate_scales,
    sample_items,
)
from brightpaint.stain.data import normalise_brightfield
from brightpaint.stain.evaluate import site_split
from brightpaint.stain.files import load_stain_model
from brightpaint.stain.predict import predict_normalised
from brightpaint.trust import (
    brightfield_statistics,
    domain_scores,
    predict_augmented,
    site_uncertainty,
    uncertainty_error_correlation,
)

COUNTS = (1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--all-sites", action="store_true", help="training wells' sites too")
    args = parser.parse_args()
    results = args.run / "results"
    generator, card = load_stain_model(results / "models" / "stain" / "all" / "model.safetensors")
    sheet = pd.read_csv(results / "demo" / "screen" / "plates.tsv", sep="\t")
    rows, guard_seconds = [], []
    with torch_threads(args.threads), torch.inference_mode():
        for plate in sheet[sheet["role"] != "apply"]["plate"]:
            source = open_plate_source(PlateFolder.of(results, plate).sources_on_disk(),
                                       card["inputs"]["channel"], use_denoised=False)
            sites = source.usable_sites()
            scales = plate_scales(source, sample_items(np.random.default_rng(0), sites, 64), card["targets"],
                                  "plate")
            for well, site in sites:
                if site_split(card, plate, well) == "train" and not args.all_sites:
                    continue
                planes = brightfield_planes(source, well, site, card["inputs"]["half_width"])
                start = time.perf_counter()
                statistics = pd.DataFrame([brightfield_statistics(planes[len(planes) // 2])])
                domain_scores(statistics, card["domain"])
                guard_seconds.append(time.perf_counter() - start)
                inputs = normalise_brightfield(planes)
                real = {c: (fluorescence_plane(source, well, site, c) - scales[c][0]) / scales[c][1]
                        for c in card["targets"]}
                for count in COUNTS:
                    start = time.perf_counter()
                    mean, spread = predict_augmented(
                        lambda x: predict_normalised(generator, card, x, tile=args.tile, overlap=96),
                        inputs, count)
                    seconds = time.perf_counter() - start
                    for index, channel in enumerate(card["targets"]):
                        pcc = float(np.corrcoef(mean[index].ravel(), real[channel].ravel())[0, 1])
                        rows.append({"plate": plate, "well": well, "site": site, "augmentations": count,
                                     "split": site_split(card, plate, well), "channel": channel, "pcc": pcc,
                                     "uncertainty": site_uncertainty(mean[index], spread[index]),
                                     "seconds": seconds})
    table = pd.DataFrame(rows)
    per_site = table.drop_duplicates(["plate", "well", "site", "augmentations"])
    one = per_site[per_site["augmentations"] == 1]["seconds"].median()
    by_count = {}
    for count, group in table.groupby("augmentations"):
        held = group[group["split"] != "train"]
        seconds = per_site[per_site["augmentations"] == count]["seconds"].median()
        entry = {"seconds_per_site": round(float(seconds), 4),
                 "mean_pcc_held_out": {c: round(float(g["pcc"].mean()), 4)
                                       for c, g in held.groupby("channel")}}
        if count > 1:
            rho = uncertainty_error_correlation(held).set_index("channel")["spearman"]
            entry["spearman_uncertainty_vs_error_held_out"] = {k: round(float(v), 3) for k, v in rho.items()}
        by_count[str(count)] = entry
    emit({"benchmark": "trust", "host": platform.node(), "threads": args.threads,
          "sites": int(len(per_site) // len(COUNTS)),
          "held_out_sites": int((per_site["split"] != "train").sum() // len(COUNTS)),
          "domain_guard_seconds_per_site": round(float(np.median(guard_seconds)), 5),
          "domain_guard_share_of_one_prediction": round(float(np.median(guard_seconds)) / float(one), 4),
          "augmentations": by_count}, args.out)


if __name__ == "__main__":
    main()
