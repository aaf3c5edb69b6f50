"""CellProfiler 5 reference illumination function (run with .venv-cellprofiler's Python).

Builds a pipeline with CellProfiler's own API -- LoadData (a CSV listing the images) ->
CorrectIlluminationCalculate ("Regular" intensities, "All" images, the chosen smoothing, rescale
"Median") -> SaveImages (32-bit float TIFF, last cycle) -- runs it headless and writes the
illumination function to a .npy.

    .venv-cellprofiler/bin/python tests/cellprofiler/illum_reference.py OUT.npy IMAGE... \\
        [--smoothing "Median Filter"] [--size 128]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cellprofiler_core.preferences as preferences  # noqa: E402

preferences.set_headless()

from cellprofiler_core.reader import fill_readers, filter_active_readers  # noqa: E402

fill_readers(check_config=False)
filter_active_readers(["imageio_reader"])  # never Bio-Formats (it would download Java)

import numpy  # noqa: E402
import tifffile  # noqa: E402
from cellprofiler.modules.correctilluminationcalculate import CorrectIlluminationCalculate  # noqa: E402
from cellprofiler.modules.saveimages import SaveImages  # noqa: E402
from cellprofiler_core.modules.loaddata import LoadData  # noqa: E402
from cellprofiler_core.pipeline import Pipeline  # noqa: E402


def build_pipeline(csv_path: Path, smoothing: str, size: int) -> Pipeline:
    pipeline = Pipeline()
    load = LoadData()
    load.module_num = 1
    load.csv_directory.value = f"Elsewhere...|{csv_path.parent}"
    load.csv_file_name.value = csv_path.name
    load.wants_images.value = True
    load.rescale.value = True  # intensities in 0..1, as CellProfiler expects (its median filter x 65535)
    pipeline.add_module(load)

    calc = CorrectIlluminationCalculate()
    calc.module_num = 2
    calc.image_name.value = "GFP"
    calc.illumination_image_name.value = "IllumGFP"
    calc.intensity_choice.value = "Regular"
    calc.dilate_objects.value = False
    calc.rescale_option.value = "Median"
    calc.each_or_all.value = "All"
    calc.smoothing_method.value = smoothing
    calc.automatic_object_width.value = "Manually"
    calc.size_of_smoothing_filter.value = size
    pipeline.add_module(calc)

    save = SaveImages()
    save.module_num = 3
    save.save_image_or_figure.value = "Image"
    save.image_name.value = "IllumGFP"
    save.file_name_method.value = "Single name"
    save.single_file_name.value = "IllumGFP"
    save.file_format.value = "tiff"
    save.bit_depth.value = "32-bit floating point"
    save.when_to_save.value = "Last cycle"
    save.tiff_compress.value = False  # its zlib tuple argument fails with this tifffile
    save.overwrite.value = True
    pipeline.add_module(save)
    return pipeline


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--smoothing", default="Median Filter")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pipeline", type=Path, help="also write the pipeline (.cppipe) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv_path = tmp / "images.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["FileName_GFP", "PathName_GFP"])
            for image in args.images:
                writer.writerow([image.name, str(image.resolve().parent)])
        preferences.set_default_output_directory(str(tmp))
        preferences.set_default_image_directory(str(tmp))
        pipeline = build_pipeline(csv_path, args.smoothing, args.size)
        if args.pipeline is not None:  # the .cppipe this script built with the API, to inspect
            with open(args.pipeline, "w") as handle:
                pipeline.dump(handle)
        errors = []
        pipeline.add_listener(lambda _, event: errors.append(event)
                              if type(event).__name__ == "RunException" else None)
        pipeline.run()
        if errors:
            print(f"CellProfiler run failed: {errors[0].error!r}", file=sys.stderr)
            return 1
        saved = tmp / "IllumGFP.tiff"
        if not saved.is_file():
            print(f"CellProfiler wrote no illumination image ({sorted(os.listdir(tmp))})", file=sys.stderr)
            return 1
        function = tifffile.imread(saved).astype(numpy.float32)
    numpy.save(args.out, function)
    print(f"wrote {args.out}: shape {function.shape}, range {function.min():.4g}..{function.max():.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
