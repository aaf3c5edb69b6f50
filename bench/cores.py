"""How the machine's cores share work: the virtual-staining training step (2 threads and 1, bf16)
alone, beside a busy process in Linux's idle scheduling class and beside one at normal priority,
and one Cellpose segmentation process alone against two side by side. It decides whether anything
may run beside the demo run's training (docs/scale-out.md, "How busy the run keeps two cores").

    python bench/cores.py --out bench/results/cores.json [--steps 12] [--sites 8]

The busy process is numpy sorting a 300 x 300 array in a loop (one core, cache-resident).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BUSY = """
import os, sys, time
import numpy as np
if sys.argv[2] == "idle":
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
a = np.random.default_rng(0).random((300, 300))
end = time.time() + float(sys.argv[1])
while time.time() < end:
    a = np.sort(a, axis=None).reshape(300, 300) + 1e-9
"""

TRAIN_STEP = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, yaml
from stain import time_training
from brightpaint.inference import torch_threads
from brightpaint.stain.settings import StainSettings
settings = StainSettings.from_config(yaml.safe_load(open(sys.argv[2]))["stain"]["model"])
with torch_threads(int(sys.argv[3])):
    result = time_training(settings, torch.device("cpu"), int(sys.argv[4]), "bf16")
print(json.dumps(result["seconds_per_step"]))
"""

SEGMENT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from segment import REPO, sites_at
from brightpaint.inference import torch_threads
from brightpaint.segment.run import Segmenter
from brightpaint.segment.settings import SegmentSettings
from brightpaint.segment.weights import load_cellpose_model
models = tuple(load_cellpose_model(REPO / "resources" / "cellpose" / f"{kind}.pth", "cpu")
               for kind in ("nuclei", "cells"))
segmenter = Segmenter(*models, SegmentSettings(tile=0), nuclei_diameter=18.6, cell_diameter=49.7)
sites = sites_at(256, int(sys.argv[2]))
with torch_threads(1):
    segmenter.segment(sites[:1])
    start = time.perf_counter()
    segmenter.segment(sites)
print(json.dumps((time.perf_counter() - start) / len(sites)))
"""


def python(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO)


def answer(process: subprocess.Popen) -> float:
    out, _ = process.communicate()
    if process.returncode:
        raise RuntimeError(f"benchmark process failed ({process.returncode})")
    return float(json.loads(out.strip().splitlines()[-1]))


def training_step(threads: int, steps: int, beside: str | None) -> float:
    """Seconds per training step, alone or beside a busy process of class `beside` ("idle" or
    "normal")."""
    busy = python(BUSY, 600, beside) if beside else None
    try:
        return answer(python(TRAIN_STEP, REPO / "bench", REPO / "config" / "demo.yaml", threads, steps))
    finally:
        if busy:
            busy.kill()
            busy.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cores.json")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sites", type=int, default=8)
    args = parser.parse_args()
    training = [{"threads": threads, "beside": beside or "nothing",
                 "seconds_per_step": round(training_step(threads, args.steps, beside), 3)}
                for threads in (2, 1) for beside in (None, "idle", "normal")]
    for row in training:
        print(row, flush=True)
    alone = answer(python(SEGMENT, REPO / "bench", args.sites))
    pair = [python(SEGMENT, REPO / "bench", args.sites) for _ in range(2)]
    together = [answer(process) for process in pair]
    segmentation = {"seconds_per_site_alone": round(alone, 3),
                    "seconds_per_site_two_side_by_side": [round(s, 3) for s in together]}
    print(segmentation, flush=True)
    result = {"benchmark": "cores", "host": platform.node(), "cpus": os.cpu_count(),
              "training_bf16": training, "segmentation_1_thread": segmentation}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
