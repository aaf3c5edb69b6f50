"""The feature pipelines: the shipped ones, the channels and objects a pipeline measures, and
building one with cellprofiler_pipeline.py under the CellProfiler environment's Python."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from .runner import CELLPROFILER, REPO, TAIL_CHARS, thread_environment
from .schema import CHANNELS, OBJECTS, FeatureError

PIPELINE = REPO / "resources" / "cellprofiler" / "features.cppipe"  # every module, site by site
SITE_PIPELINE = REPO / "resources" / "cellprofiler" / "features_site.cppipe"
TILED_PIPELINE = REPO / "resources" / "cellprofiler" / "features_tiled.cppipe"
PIPELINE_BUILDER = Path(__file__).with_name("cellprofiler_pipeline.py")

_IMAGES_SETTING = ("Select the images to measure:", "Select images to measure:")
_OBJECTS_SETTING = ("Select object sets to measure:", "Select objects to measure:")


def pipeline_names(pipeline: str | Path) -> tuple[list[str], list[str]]:
    """(channels, objects) a saved feature pipeline measures: the images of its first measurement
    module that names images, and every object set any module measures (in order of appearance)."""
    channels, objects, module = [], [], None
    for line in Path(pipeline).read_text().splitlines():
        if line and not line[0].isspace() and ":[" in line:
            module = line.split(":", 1)[0]
            continue
        setting = line.strip()
        if not (module or "").startswith("Measure"):
            continue
        if not channels and setting.startswith(_IMAGES_SETTING):
            channels = [n for n in setting.split(":", 1)[1].split(", ") if n]
        elif setting.startswith(_OBJECTS_SETTING):
            objects += [n for n in setting.split(":", 1)[1].split(", ") if n and n not in objects]
    if not channels:
        raise FeatureError(f"{pipeline}: no measurement module names images: not a feature pipeline")
    return channels, objects


def write_pipeline(path: str | Path, channels: Sequence[str] = CHANNELS,
                   objects: Sequence[str] = OBJECTS, python: str | Path | None = None,
                   part: str = "all") -> Path:
    """Build the feature pipeline (`part`: all, site or tiled; see cellprofiler_pipeline.py) with
    CellProfiler's API (cellprofiler_pipeline.py under the CellProfiler environment's Python) and
    save it at `path`."""
    python = Path(python) if python is not None else Path(CELLPROFILER).with_name("python")
    command = [str(python), str(PIPELINE_BUILDER), str(path), "--channels", *channels,
               "--objects", *objects, "--part", part]
    result = subprocess.run(command, capture_output=True, text=True, env=thread_environment(1))
    if result.returncode != 0:
        output = result.stdout + result.stderr
        raise FeatureError(f"building the pipeline failed:\n...{output[-TAIL_CHARS:]}")
    return Path(path)
