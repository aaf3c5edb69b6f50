"""Virtual-staining model study on a finished demo run: each model variant trained on the run's
training plates with the same budget, scored on sites it never saw, against the generator's truth;
and on real paired data (--real), brightfield -> DAPI of two real fields, each model trained on one
field and scored on the other.

    python bench/stain_study.py --run RUN/results --out bench/results/stain_study.json \
        [--variants unet_l1 unext2 ms_ssim_l1 gan stack stem3d per_channel] [--epochs 10] [--steps 50] \
        [--curve-epochs 40] [--sites 24]
    python bench/stain_study.py --real ../shared/data/sephace-bf-zstack-dapi \
        --out bench/results/stain_study_real.json [--variants ...]

RUN/results is a finished demo run's results folder (the demo's screen under RUN/results/demo/screen,
with its truth). Every variant starts from the demo's model settings (config/config.yaml under
config/demo.yaml, `stain.model`) and changes one thing:

- unet_l1: the default (U-Net, L1 loss, the focus plane +- 1 as input, one model for all stains);
- unext2: the UNeXt2-style network; ms_ssim_l1: 0.5 L1 + 0.5 MS-SSIM; gan: a conditional WGAN-GP on
  top of L1; stack: the whole z-stack as input (focus +- 2 of the demo's 5 planes), its planes as
  channels (2.5-D); stem3d: the same five planes through a 3-D convolution along z first (3-D stem,
  weights shared between depths); per_channel: one model per stain.

Held-out sites: the validation wells of the training plates (`validation`: the wells each model's
early stop watched, never trained on) and every well of the apply-only plates (`apply`: plates no
model saw; the demo writes their stains into its truth, not into their images). Scores per site and
stain: PCC and SSIM against the generator's clean (noise-free) stain, each image scaled by its own
median and IQR, and, where the plate has real stains, PCC against the real (denoised) stain the
workflow trains on. Nuclei and cells: Cellpose on the virtual stains against the generator's masks
(border objects dropped on both sides, as the workflow's evaluation does), AP@0.5 pooled over the
sites and F1@0.7, beside the workflow's real-stain masks against the same truth (the ratio is the
issue's nuclei floor). Toxic and
non-toxic wells (the generator's `toxic` flag) are scored apart. With --curve-epochs, the default
is trained once more for that many epochs (patience off) and its validation PCC per epoch is the
learning curve (its cosine learning-rate schedule spans the longer run, so each point is not a
shorter run's end). Profile-level scores (NSC, replicate mAP) need CellProfiler on every site: they
come from the workflow's own run of the chosen default (the demo report), not from this bench.

Real data (--real, `sephace-bf-zstack-dapi`: two fields at 40x, brightfield at focus -25 / -10 / 0 /
+10 / +25 um and DAPI, halved to ~20x as the virtual-staining test does): two folds, each model
trained on one field (its left two thirds; early stopping watches the right third) and scored on the
whole other field: DAPI PCC and SSIM, and Cellpose nuclei on the virtual DAPI against Cellpose nuclei
on the real DAPI (AP@0.5, F1@0.7; each input's diameter estimated from itself, as the workflow does),
beside the best hand-made baseline's PCC. `stack` and `stem3d` take all five planes (focus +- 2);
per_channel is the default here (one stain).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
import yaml
from scipy import ndimage

from brightpaint.io import read_platemap, read_screen_sheet
from brightpaint.labels import read_labels
from brightpaint.layout import PlateFolder
from brightpaint.metrics import image_metrics, pearson
from brightpaint.plate import VIRTUAL_PREFIX, fluorescence_plane, open_plate_source, robust_scale
from brightpaint.segment.evaluate import instance_metrics, pooled_ap, read_truth
from brightpaint.segment.run import Segmenter
from brightpaint.segment.settings import SegmentSettings
from brightpaint.segment.weights import load_cellpose_model
from brightpaint.stain.data import StainSite, TrainingSet
from brightpaint.stain.files import load_stain_model, save_stain_model
from brightpaint.stain.predict import predict_normalised, predict_virtual
from brightpaint.stain.reference import SEPHACE_FIELDS, sephace_field
from brightpaint.stain.settings import StainSettings
from brightpaint.stain.train import fit_stain_model, train_stain_model

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"unet_l1": {}, "unext2": {"arch": "unext2"}, "ms_ssim_l1": {"loss": "ms_ssim_l1"},
            "gan": {"gan": True}, "stack": {"half_width": 2}, "stem3d": {"half_width": 2, "stem": "3d"},
            "per_channel": {}}
NUCLEI, CELLS = "DNA", "CYTO"  # the demo's stains that Cellpose segments


def demo_settings(**overrides) -> StainSettings:
    """config/config.yaml's stain.model under config/demo.yaml's, with `overrides`."""
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    return StainSettings.defaults(**{**demo["stain"]["model"], **overrides})


def per_field(image: np.ndarray) -> np.ndarray:
    median, spread = robust_scale(image, "fov")
    return (np.asarray(image, np.float64) - median) / spread


def clean_stain(screen: Path, plate: str, well: str, site: int, channel: str) -> np.ndarray:
    return tifffile.imread(screen / "truth" / plate / "clean" / f"{well}_s{site}_{channel}.tif")


def truth_masks(screen: Path, plate: str, well: str, site: int) -> dict[str, np.ndarray]:
    """The generator's nuclei and cells, related and with border objects dropped as the workflow's
    own masks are (segment.evaluate.read_truth)."""
    pattern = str(screen / "truth" / "{plate}" / "masks" / "{well}_s{site}_{objects}.tif")
    return read_truth(pattern, plate, well, site, SegmentSettings.defaults().exclude_border)


def held_out_sites(cards: list[dict], sources: dict, apply_plates: list[str], per_split: int,
                   seed: int) -> list[tuple[str, str, str, int]]:
    """(split, plate, well, site): up to `per_split` sites of the validation wells every model held
    out, and of the apply-only plates, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    chosen = []
    for split in ("validation", "apply"):
        sites = []
        for plate, source in sources.items():
            if split == "apply" and plate not in apply_plates:
                continue
            if split == "validation":
                held = set.intersection(*(set(card["wells"].get(plate, {}).get("validation", []))
                                          for card in cards))
                if not held:
                    continue
            sites += [(split, plate, well, int(site)) for well, site in source.usable_sites()
                      if split == "apply" or well in held]
        picked = rng.choice(len(sites), size=min(per_split, len(sites)), replace=False) if sites else []
        chosen += [sites[i] for i in sorted(picked)]
    return chosen


def score(models: list[tuple[torch.nn.Module, dict]], sites, sources: dict, screen: Path,
          segmenters: dict, toxic: dict, real_segmentation: dict) -> pd.DataFrame:
    """One row per held-out site and stain, and one per site for the nuclei and cells."""
    rows, images = [], []
    for split, plate, well, site in sites:
        source = sources[plate]
        virtual = {}
        for generator, card in models:
            virtual |= predict_virtual(generator, card, source, well, site)
        where = {"split": split, "plate": plate, "well": well, "site": site,
                 "toxic": bool(toxic[plate].get(well, False))}
        for name, image in virtual.items():
            channel = name.removeprefix(VIRTUAL_PREFIX)
            truth = clean_stain(screen, plate, well, site, channel)
            metrics = image_metrics(per_field(truth), per_field(image))
            row = {**where, "channel": channel, "pcc": metrics["pcc"], "ssim": metrics["ssim"]}
            if source.has_channel(channel):
                row["pcc_real"] = pearson(fluorescence_plane(source, well, site, channel), image)
            rows.append(row)
        images.append((where, virtual[VIRTUAL_PREFIX + NUCLEI], virtual[VIRTUAL_PREFIX + CELLS]))
    for where, nuclei, cells in images:
        found = segmenters[where["plate"]].segment([(nuclei, cells)])[0]
        row = {**where, "channel": "objects"}
        truth = truth_masks(screen, where["plate"], where["well"], where["site"])
        for objects in ("nuclei", "cells"):
            scores = instance_metrics(truth[objects], getattr(found, objects))
            row |= {f"{objects}_{k}": scores[k] for k in ("f1_70", "tp50", "n_true", "n_predicted")}
            real = real_segmentation.get((where["plate"], where["well"], where["site"], objects))
            if real is not None:
                row |= {f"{objects}_real_{k}": real[k] for k in ("tp50", "n_true", "n_predicted")}
        rows.append(row)
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> dict:
    """Means per split (and toxic / non-toxic) of each stain's PCC / SSIM and the objects' scores."""
    out = {}
    stains = table[table["channel"] != "objects"]
    objects = table[table["channel"] == "objects"]
    for split, part in [*stains.groupby("split"), ("all", stains)]:
        for channel, rows in part.groupby("channel"):
            for metric in ("pcc", "ssim", "pcc_real"):
                if metric in rows and rows[metric].notna().any():
                    out[f"{split}/{channel}/{metric}"] = round(float(rows[metric].mean()), 4)
            for flag, name in ((True, "toxic"), (False, "non-toxic")):
                chosen = rows[rows["toxic"] == flag]
                if len(chosen):
                    out[f"{split}/{channel}/pcc/{name}"] = round(float(chosen["pcc"].mean()), 4)
    for split, part in [*objects.groupby("split"), ("all", objects)]:
        for name in ("nuclei", "cells"):
            # AP@0.5 pooled over the sites by object counts, as the plate report's
            out[f"{split}/{name}_ap50"] = round(pooled(part, f"{name}_"), 4)
            out[f"{split}/{name}_f1_70"] = round(float(part[f"{name}_f1_70"].mean()), 4)
            if f"{name}_real_tp50" in part and part[f"{name}_real_tp50"].notna().any():
                both = part.dropna(subset=[f"{name}_real_tp50"])
                virtual, real = pooled(both, f"{name}_"), pooled(both, f"{name}_real_")
                out[f"{split}/{name}_ap50_real"] = round(real, 4)
                out[f"{split}/{name}_ap50_ratio"] = round(virtual / real, 4) if real > 0 else None
    return out


def pooled(rows: pd.DataFrame, prefix: str) -> float:
    return pooled_ap([{k: row[prefix + k] for k in ("tp50", "n_true", "n_predicted")}
                      for row in rows.to_dict("records")])


def real_study(folder: Path, variants: list[str], budget: dict, segmenter: Segmenter,
               threads: int) -> dict:
    """Each variant trained on one real field and scored on the other (both ways)."""
    out = {}
    fields = SEPHACE_FIELDS
    nuclei_real = {}
    for name in variants:
        if name == "per_channel":  # one stain: the default
            continue
        settings = demo_settings(**budget, **VARIANTS[name])
        folds = {}
        for train_field, test_field in (fields, fields[::-1]):
            inputs, dapi = sephace_field(folder, train_field, settings.half_width)
            cut = inputs.shape[-1] * 2 // 3 // 8 * 8
            left, right = (StainSite(train_field, part, 1, inputs[..., columns], dapi[None, :, columns],
                                     np.ones(1, np.float32))
                           for part, columns in (("left", slice(None, cut)), ("right", slice(cut, None))))
            data = TrainingSet([left], [right], {}, {})
            start = time.perf_counter()
            generator, history = train_stain_model(data, ["DAPI"], settings, threads=threads)
            seconds = time.perf_counter() - start
            test_inputs, real = sephace_field(folder, test_field, settings.half_width)
            card = {"architecture": generator.config, "inputs": {"half_width": settings.half_width}}
            virtual = predict_normalised(generator, card, test_inputs, tile=256, overlap=96)[0]
            metrics = image_metrics(per_field(real), per_field(virtual))
            if test_field not in nuclei_real:
                calibrated = segmenter.calibrate([(real, real)])
                nuclei_real[test_field] = (calibrated.segment_nuclei([real])[0], calibrated.nuclei_diameter)
            calibrated = segmenter.calibrate([(virtual, virtual)])
            found = calibrated.segment_nuclei([virtual])[0]
            objects = instance_metrics(nuclei_real[test_field][0], found)
            focus = test_inputs[settings.half_width]
            baselines = {"brightfield": pearson(real, focus),
                         "smoothed brightfield": pearson(real, ndimage.gaussian_filter(focus, 3)),
                         "defocus difference": pearson(real, test_inputs[-1] - test_inputs[0]),
                         "local contrast": pearson(real, ndimage.gaussian_filter(np.abs(focus), 3))}
            folds[f"{train_field}->{test_field}"] = {
                "training_seconds": round(seconds, 1), "epochs": int(history["epoch"].max()),
                "best_epoch": int(history.loc[history["best"], "epoch"].iloc[0]),
                "pcc": round(metrics["pcc"], 4), "ssim": round(metrics["ssim"], 4),
                "best_baseline_pcc": round(max(abs(v) for v in baselines.values()), 4),
                "nuclei_diameter_real": round(nuclei_real[test_field][1], 1),
                "nuclei_diameter_virtual": round(calibrated.nuclei_diameter, 1),
                **{f"nuclei_{k}": (round(v, 4) if isinstance(v, float) else v) for k, v in objects.items()}}
        out[name] = {"settings": {k: v for k, v in settings.__dict__.items() if not k.startswith("gan_")},
                     "folds": folds,
                     **{f"mean_{k}": round(float(np.mean([f[k] for f in folds.values()])), 4)
                        for k in ("pcc", "ssim", "nuclei_ap50", "nuclei_f1_70")}}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished demo run's results folder")
    parser.add_argument("--real", type=Path, help="the real paired data (sephace-bf-zstack-dapi) instead")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stain_study.json")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="variants to train and score (none: only the learning curve)")
    parser.add_argument("--epochs", type=int, help="max_epochs (default: the demo's)")
    parser.add_argument("--steps", type=int, help="steps_per_epoch (default: the demo's)")
    parser.add_argument("--curve-epochs", type=int, default=0, help="learning curve of the default: epochs")
    parser.add_argument("--sites", type=int, default=24, help="held-out sites per split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.run is None) == (args.real is None):
        parser.error("give one of --run (the demo) or --real (the real paired data)")
    budget = {k: v for k, v in (("max_epochs", args.epochs), ("steps_per_epoch", args.steps)) if v}
    device = torch.device("cpu")
    cellpose = [load_cellpose_model(REPO / "resources" / "cellpose" / f"{k}.pth", device)
                for k in ("nuclei", "cells")]
    if args.real:
        # the cell diameter is never used (nuclei only); fixing it skips its estimate
        segmenter = Segmenter(*cellpose, SegmentSettings.defaults(cell_diameter=30.0))
        result = {"benchmark": "stain_study", "host": platform.node(), "real": str(args.real),
                  "threads": args.threads,
                  "variants": real_study(args.real, args.variants, budget, segmenter, args.threads)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return

    screen = args.run / "demo" / "screen"
    sheet = read_screen_sheet(screen / "plates.tsv")
    brightfield, targets = "BF", ["DNA", "CYTO", "DAMAGE"]
    sources, toxic, plates = {}, {}, {}
    for row in sheet.to_dict("records"):
        plate = row["plate"]
        platemap = read_platemap(screen / row["platemap"])
        sources[plate] = open_plate_source(PlateFolder(args.run / "plates" / plate).sources_on_disk(),
                                           brightfield, platemap=platemap)
        truth = pd.read_csv(screen / "truth" / plate / "platemap_truth.csv")
        toxic[plate] = dict(zip(truth["well"], truth["toxic"], strict=True))
        plates[plate] = {k: str(v) for k, v in row.items()}
    training = [p for p, row in plates.items() if row["role"] in ("train", "both")]
    apply_plates = [p for p, row in plates.items() if row["role"] == "apply"]
    segmenters = {}
    for plate in plates:
        found = json.loads((args.run / "plates" / plate / "segment" / "diameters.json").read_text())
        diameters = found["inputs"]["virtual"]
        segmenters[plate] = Segmenter(*cellpose, SegmentSettings.from_config({}),
                                      diameters["nuclei_diameter"], diameters["cell_diameter"])

    def train(settings: StainSettings, channels: list[str]):
        """A model as the workflow makes it: trained, written to its file and read back."""
        generator, card, history = fit_stain_model(
            [sources[p] for p in training], channels, settings, brightfield=brightfield,
            plates=[plates[p] for p in training], threads=args.threads)
        with tempfile.TemporaryDirectory() as folder:
            save_stain_model(generator, card, Path(folder) / "model.safetensors")
            generator, card = load_stain_model(Path(folder) / "model.safetensors")
        return generator, card, history

    result = {"benchmark": "stain_study", "host": platform.node(), "run": str(args.run),
              "threads": args.threads, "training_plates": training, "apply_plates": apply_plates,
              "variants": {}}
    real_segmentation = None
    for name in args.variants:
        settings = demo_settings(**budget, **VARIANTS[name])
        start = time.perf_counter()
        if name == "per_channel":
            trained = [train(settings, [c]) for c in targets]
        else:
            trained = [train(settings, targets)]
        seconds = time.perf_counter() - start
        models = [(generator, card) for generator, card, _ in trained]
        sites = held_out_sites([card for _, card in models], sources, apply_plates, args.sites, args.seed)
        if real_segmentation is None:  # the real stains' masks against the truth, once
            real_segmentation = {}
            for _, plate, well, site in sites:
                labels = PlateFolder(args.run / "plates" / plate).labels
                truth = truth_masks(screen, plate, well, site)
                for objects in ("nuclei", "cells"):
                    try:
                        found = read_labels(labels, well, site, f"{objects}_real")
                    except KeyError:  # no real stains
                        continue
                    real_segmentation[(plate, well, site, objects)] = instance_metrics(truth[objects], found)
        table = score(models, sites, sources, screen, segmenters, toxic, real_segmentation)
        histories = [history for _, _, history in trained]
        result["variants"][name] = {
            "settings": {k: v for k, v in settings.__dict__.items() if not k.startswith("gan_")},
            "training_seconds": round(seconds, 1),
            "epochs": [int(h["epoch"].max()) for h in histories],
            "best_epoch": [int(h.loc[h["best"], "epoch"].iloc[0]) for h in histories],
            "held_out_sites": {split: int((table["split"] == split).sum() / (len(targets) + 1))
                               for split in ("validation", "apply")},
            **summary(table)}
        print(json.dumps({name: result["variants"][name]}), flush=True)
    if args.curve_epochs:
        settings = demo_settings(**{**budget, "max_epochs": args.curve_epochs,
                                    "patience": args.curve_epochs})
        _, _, history = train(settings, targets)
        columns = ["epoch", "val_l1", *[f"val_pcc_{c}" for c in targets]]
        curve = history[columns].assign(steps=history["epoch"] * settings.steps_per_epoch)
        result["learning_curve"] = curve.round(4).to_dict("records")
        print(json.dumps({"learning_curve": result["learning_curve"]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
