"""Virtual-staining throughput: prediction (sites/s at 1080 x 1080 and 2048 x 2048, tiles/s) and
training step time (fp32 and, where the hardware has bf16 units, bf16 mixed precision), on CPU and,
where torch sees one, on the GPU.

    python bench/stain.py --out bench/results/stain.json [--device auto] [--threads 2] \
        [--arch unet] [--model results/models/stain/all/model.safetensors]

Prediction is timed with the configured tiles per pass (`stain.batch`, resolved for the device) and,
for the before / after, with 8 tiles per pass and with unbalanced tiles; CPU seconds are this
process's user + system time (all its threads).

Throughput does not depend on the weights, so without --model a freshly initialised network of the
configured size (config/config.yaml `stain.model`) is timed. Prediction times the whole path a site
takes in the workflow (tiling, batching, blending, bf16 autocast on GPU), from a normalised
brightfield stack in memory; reading and writing the stores is the ingest benchmark's business.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from brightpaint.inference import (
    autocast,
    balanced_tile,
    channels_last,
    predict_tiled,
    resolve_device,
    resolve_precision,
    tile_starts,
    tiles_per_pass,
    torch_threads,
)
from brightpaint.stain import models
from brightpaint.stain.files import load_stain_model
from brightpaint.stain.settings import StainSettings

REPO = Path(__file__).resolve().parents[1]


def gpu_utilisation() -> float | None:
    """GPU utilisation in percent from nvidia-smi, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.split()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_prediction(generator, device, size: int, tile: int, overlap: int, batch: int, repeats: int,
                    balance: bool = True) -> dict:
    shape = (generator.config["in_channels"], size, size)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    predict_tiled(generator, image, tile=tile, overlap=overlap, batch=batch, device=device,
                  balance=balance)  # warm-up
    synchronise(device)
    utilisation = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(repeats):
        predict_tiled(generator, image, tile=tile, overlap=overlap, batch=batch, device=device,
                      balance=balance)
        utilisation.append(gpu_utilisation())
    synchronise(device)
    seconds = (time.perf_counter() - start) / repeats
    done = resource.getrusage(resource.RUSAGE_SELF)
    user, system = ((getattr(done, f) - getattr(usage, f)) / repeats for f in ("ru_utime", "ru_stime"))
    padded = -(-size // generator.multiple) * generator.multiple
    side = balanced_tile(padded, tile, overlap, generator.multiple) if balance else tile
    tiles = len(tile_starts(padded, side, overlap, generator.multiple)) ** 2
    used = [u for u in utilisation if u is not None]
    return {"size": size, "tile": tile, "balanced": balance, "tile_side": side, "overlap": overlap,
            "batch": tiles_per_pass(batch, device), "tiles_per_site": tiles,
            "seconds_per_site": seconds, "sites_per_s": 1 / seconds, "tiles_per_s": tiles / seconds,
            "cpu_user_s_per_site": round(user, 3), "cpu_system_s_per_site": round(system, 3),
            "gpu_utilisation_percent": float(np.mean(used)) if used else None}


def time_training(settings: StainSettings, device, steps: int, precision: str) -> dict:
    generator = models.build_generator(settings.arch, 2 * settings.half_width + 1, 3,
                                             width=settings.width, depth=settings.depth, seed=0).to(device)
    channels_last(generator)  # as stain.train trains it
    optimiser = torch.optim.Adam(generator.parameters(), lr=settings.lr)
    loss_fn = models.reconstruction_loss(settings.loss)
    planes = 2 * settings.half_width + 1
    x = channels_last(torch.randn(settings.batch, planes, settings.patch, settings.patch, device=device))
    y = torch.randn(settings.batch, 3, settings.patch, settings.patch, device=device)
    mask = torch.ones(settings.batch, 3, device=device)
    times = []
    for step in range(steps + 2):
        synchronise(device)
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, precision):
            prediction = generator(x)
        loss_fn(prediction.float(), y, mask).backward()
        optimiser.step()
        synchronise(device)
        if step >= 2:  # the first steps allocate and pick kernels
            times.append(time.perf_counter() - start)
    return {"arch": settings.arch, "loss": settings.loss, "batch": settings.batch, "patch": settings.patch,
            "precision": precision, "seconds_per_step": float(np.median(times)), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/stain.json")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="a trained model file (default: a fresh network of the config size)")
    parser.add_argument("--arch", help="override stain.model.arch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=10)
    args = parser.parse_args()
    defaults = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["stain"]
    settings = StainSettings.from_config({**defaults["model"], **({"arch": args.arch} if args.arch else {})})
    device = resolve_device(args.device, what="benchmark")
    with torch_threads(args.threads):
        if args.model:
            generator, card = load_stain_model(args.model)
        else:
            generator = models.build_generator(settings.arch, 2 * settings.half_width + 1, 3,
                                                     width=settings.width, depth=settings.depth, seed=0)
        generator = generator.to(device).eval()
        if device.type == "cuda":
            generator = generator.to(memory_format=torch.channels_last)
        tile = defaults["tile"] if device.type == "cpu" else 1024
        # balanced tiles and the configured tiles per pass (the workflow's) and, for the before /
        # after, 8 tiles per pass and tiles of the configured side
        batches = list(dict.fromkeys([tiles_per_pass(defaults["batch"], device), 8]))
        prediction = [time_prediction(generator, device, size, tile, defaults["overlap"], batch,
                                      args.repeats, balance) for size in (1080, 2048)
                      for batch, balance in [*((b, True) for b in batches), (batches[0], False)]]
        # both precisions where bf16 has hardware units (what `precision: auto` picks), else fp32 only
        precisions = sorted({"fp32", resolve_precision("auto", device)})
        training = [time_training(settings, device, args.train_steps, p) for p in precisions]
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": args.threads, "torch": torch.__version__, "arch": generator.config,
        "parameters": sum(p.numel() for p in generator.parameters()),
        "prediction": prediction, "training": training,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
