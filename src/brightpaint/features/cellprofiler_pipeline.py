"""The CellProfiler 5 feature pipeline, built with CellProfiler's own API and saved as a .cppipe.

Runs ONLY under the CellProfiler environment's Python (`.venv-cellprofiler/bin/python`: numpy 1.26,
no pandas, no brightpaint), so it imports nothing from brightpaint. The main environment's side
(inputs, running CellProfiler, reading its tables) is the rest of `brightpaint.features`. Run by
path, this file's folder comes first on sys.path: no module beside it may be named like one
CellProfiler imports (hence `runner.py`, not `cellprofiler.py`).

    .venv-cellprofiler/bin/python src/brightpaint/features/cellprofiler_pipeline.py OUT.cppipe \\
        --channels DNA CYTO DAMAGE [--objects Nuclei Cells Cytoplasm]

Pipeline (module numbers in order; object and channel names are CellProfiler's, so the feature
names read e.g. `AreaShape_Area`, `Intensity_MeanIntensity_DNA`, `Texture_Contrast_DNA_3_00_256`
in the per-object CSVs, like the Cell Painting Gallery's outputs):

 1. LoadData: one row per site; images `FileName_<channel>`/`PathName_<channel>` (uint16 TIFFs,
    rescaled to 0..1 by 1/65535), objects from label images `ObjectsFileName_<objects>`/
    `ObjectsPathName_<objects>`; `Metadata_*` columns pass through. Its CSV is replaced at run time
    (`--data-file`).
 2. MeasureImageQuality: all channels; blur at 5/10/20/50 px, saturation, intensity, Otsu
    two-class threshold, rescaling value.
 3. MeasureObjectSizeShape: all objects, Zernike shape features off (--zernike turns them on),
    advanced features off.
 4. MeasureObjectIntensity: all channels x all objects.
 5. MeasureTexture: all channels x all objects (not whole images: 2.7 s per site for nothing the
    image-quality module lacks), one scale (3 px), 256 gray levels.
 6. MeasureGranularitySpectrum (the project's plugin, cellprofiler_plugins/: CellProfiler's
    MeasureGranularity without its per-image summaries of every object feature): all channels,
    within all objects; subsampling 0.5 and background reduction 0.5 with a 10 px element,
    16-step spectrum (the Cell Painting Gallery's values; on a 256 px site that covers granules
    up to ~32 px radius, i.e. nuclei and cell-scale texture).
 7. MeasureObjectIntensityDistribution: all channels; Nuclei (own centres), Cells and Cytoplasm
    (Nuclei as centres); 4 scaled bins, max radius 100, no Zernike.
 8. MeasureColocalization: all channel pairs within all objects; correlation/slope, Manders, RWC,
    overlap; Costes off (very slow); threshold 15 % of each image's maximum.
 9. MeasureObjectNeighbors: Nuclei within 5 px; Cells adjacent.
10. ExportToSpreadsheet: comma CSVs named by object (`Image.csv`, `Nuclei.csv`, ...), no prefix,
    overwrite, all measurements, NaN for NaN/Inf.

No RelateObjects: our label images already share object numbers (object k of every compartment is
one cell), and RelateObjects converts the whole measurement store on every call (~0.6-1.2 s per
site each). CellProfiler numbers objects 1..n by the rank of their label value in the image, so
`brightpaint.features.tables.read_object_tables` maps ObjectNumber back to the label value.

The saved file's header (`Version:5`, `DateRevision:500`, empty `GitHash:`) is fixed for a given
CellProfiler version: building twice gives identical bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import cellprofiler_core.preferences as preferences  # noqa: E402

preferences.set_headless()

from cellprofiler_core.reader import fill_readers, filter_active_readers  # noqa: E402

fill_readers(check_config=False)
filter_active_readers(["imageio_reader"])  # never Bio-Formats (it would download Java)

from cellprofiler.modules.exporttospreadsheet import ExportToSpreadsheet  # noqa: E402
from cellprofiler.modules.measurecolocalization import MeasureColocalization  # noqa: E402
from cellprofiler.modules.measureimagequality import MeasureImageQuality  # noqa: E402
from cellprofiler.modules.measureobjectintensity import MeasureObjectIntensity  # noqa: E402
from cellprofiler.modules.measureobjectintensitydistribution import (  # noqa: E402
    MeasureObjectIntensityDistribution,
)
from cellprofiler.modules.measureobjectneighbors import MeasureObjectNeighbors  # noqa: E402
from cellprofiler.modules.measureobjectsizeshape import MeasureObjectSizeShape  # noqa: E402
from cellprofiler.modules.measuretexture import MeasureTexture  # noqa: E402
from cellprofiler_core.modules.loaddata import LoadData  # noqa: E402
from cellprofiler_core.pipeline import Pipeline  # noqa: E402

# the project's CellProfiler plugins (cellprofiler_plugins/; CellProfiler loads them itself with
# --plugins-directory when it runs the pipeline, brightpaint.features.runner)
sys.path.insert(0, str(Path(__file__).resolve().with_name("cellprofiler_plugins")))
from measuregranularityspectrum import MeasureGranularitySpectrum  # noqa: E402

CHANNELS = ("DNA", "CYTO", "DAMAGE")
OBJECTS = ("Nuclei", "Cells", "Cytoplasm")
LOADDATA_CSV = "loaddata.csv"  # the name in the saved pipeline; replaced by --data-file at run time
BLUR_SCALES = (5, 10, 20, 50)  # px, as the Cell Painting Gallery's pipelines
TEXTURE_SCALE = 3
TEXTURE_LEVELS = 256
GRANULARITY = {"subsample_size": 0.5, "image_sample_size": 0.5, "element_size": 10,
               "granular_spectrum_length": 16}
RADIAL_BINS = 4
RADIAL_MAX_RADIUS = 100
COLOCALIZATION_THRESHOLD = 15.0  # % of each image's maximum
NUCLEI_NEIGHBOR_DISTANCE = 5  # px
NEIGHBOR_DISTANCE = 5  # px; unused by "Adjacent" but saved with the module


def _add(pipeline: Pipeline, module) -> None:
    module.module_num = len(pipeline.modules()) + 1
    pipeline.add_module(module)


def _load_data() -> LoadData:
    load = LoadData()
    load.csv_directory.value = "Default Input Folder|"
    load.csv_file_name.value = LOADDATA_CSV
    load.wants_images.value = True
    load.image_directory.value = "None|"  # PathName_ columns are absolute
    load.rescale.value = True  # uint16 / 65535 -> 0..1, as CellProfiler expects
    load.wants_image_groupings.value = False
    load.wants_rows.value = False
    return load


def _image_quality(channels: list[str]) -> MeasureImageQuality:
    module = MeasureImageQuality()
    module.images_choice.value = "Select..."
    group = module.image_groups[0]
    group.image_names.value = ", ".join(channels)
    group.include_image_scalings.value = True
    group.check_blur.value = True
    group.scale_groups[0].scale.value = BLUR_SCALES[0]
    for scale in BLUR_SCALES[1:]:
        module.add_scale_group(group)
        group.scale_groups[-1].scale.value = scale
    group.check_saturation.value = True
    group.check_intensity.value = True
    group.calculate_threshold.value = True
    group.use_all_threshold_methods.value = False
    if not group.threshold_groups:
        module.add_threshold_group(group, False)
    threshold = group.threshold_groups[0]
    threshold.threshold_method.value = "Otsu"
    threshold.two_class_otsu.value = "Two classes"
    threshold.use_weighted_variance.value = "Weighted variance"
    return module


def _size_shape(objects: list[str], zernike: bool) -> MeasureObjectSizeShape:
    module = MeasureObjectSizeShape()
    module.objects_list.value = ", ".join(objects)
    module.calculate_zernikes.value = zernike
    module.calculate_advanced.value = False
    return module


def _intensity(channels: list[str], objects: list[str]) -> MeasureObjectIntensity:
    module = MeasureObjectIntensity()
    module.images_list.value = ", ".join(channels)
    module.objects_list.value = ", ".join(objects)
    return module


def _texture(channels: list[str], objects: list[str]) -> MeasureTexture:
    module = MeasureTexture()
    module.images_list.value = ", ".join(channels)
    module.objects_list.value = ", ".join(objects)
    module.gray_levels.value = TEXTURE_LEVELS
    module.images_or_objects.value = "Objects"
    del module.scale_groups[1:]
    module.scale_groups[0].scale.value = TEXTURE_SCALE
    return module


def _granularity(channels: list[str], objects: list[str]) -> MeasureGranularitySpectrum:
    module = MeasureGranularitySpectrum()
    module.images_list.value = ", ".join(channels)
    module.wants_objects.value = True
    module.objects_list.value = ", ".join(objects)
    for name, value in GRANULARITY.items():
        getattr(module, name).value = value
    return module


def _radial(channels: list[str], objects: list[str]) -> MeasureObjectIntensityDistribution:
    module = MeasureObjectIntensityDistribution()
    module.images_list.value = ", ".join(channels)
    module.wants_zernikes.value = "None"
    del module.objects[:]
    centre = "Nuclei" if "Nuclei" in objects else None
    for name in objects:
        module.add_object(can_remove=bool(module.objects))
        group = module.objects[-1]
        group.object_name.value = name
        if centre is None or name == centre:
            group.center_choice.value = "These objects"
        else:
            group.center_choice.value = "Centers of other objects"
            group.center_object_name.value = centre
    bins = module.bin_counts[0]
    bins.wants_scaled.value = True
    bins.bin_count.value = RADIAL_BINS
    bins.maximum_radius.value = RADIAL_MAX_RADIUS
    return module


def _colocalization(channels: list[str], objects: list[str]) -> MeasureColocalization:
    module = MeasureColocalization()
    module.images_list.value = ", ".join(channels)
    module.threshold_percentage.value = COLOCALIZATION_THRESHOLD
    module.images_or_objects.value = "Within objects"
    module.objects_list.value = ", ".join(objects)
    module.do_all.value = False
    module.do_corr_and_slope.value = True
    module.do_manders.value = True
    module.do_rwc.value = True
    module.do_overlap.value = True
    module.do_costes.value = False  # very slow (minutes per site); Manders without it is kept
    return module


def _neighbors(objects: str, method: str, distance: int) -> MeasureObjectNeighbors:
    module = MeasureObjectNeighbors()
    module.object_name.value = objects
    module.neighbors_name.value = objects
    module.distance_method.value = method
    module.distance.value = distance
    module.wants_count_image.value = False
    module.wants_percent_touching_image.value = False
    return module


def _export(objects: list[str]) -> ExportToSpreadsheet:
    module = ExportToSpreadsheet()
    module.delimiter.value = 'Comma (",")'
    module.directory.value = "Default Output Folder|"
    module.wants_prefix.value = False
    module.wants_overwrite_without_warning.value = True
    module.add_metadata.value = False
    module.add_filepath.value = False
    module.nan_representation.value = "NaN"
    module.pick_columns.value = False
    module.wants_aggregate_means.value = False
    module.wants_aggregate_medians.value = False
    module.wants_aggregate_std.value = False
    module.wants_genepattern_file.value = False
    module.wants_everything.value = False
    del module.object_groups[:]
    for name in ["Image", *objects]:
        module.add_object_group(can_remove=bool(module.object_groups))
        group = module.object_groups[-1]
        group.name.value = name
        group.previous_file.value = False
        group.wants_automatic_file_name.value = True
    return module


PARTS = ("all", "site", "tiled")


def build_pipeline(channels: Sequence[str] = CHANNELS, objects: Sequence[str] = OBJECTS,
                   zernike: bool = False, part: str = "all") -> Pipeline:
    """The feature pipeline for these channel (image) and object names.

    `part` splits it for tiling (see brightpaint.features.extract.extract_features): `tiled` holds the
    modules whose per-object results depend only on each object's own pixels and the absolute
    intensity scale (size/shape, intensity, texture), which may run on several sites laid side by
    side in one image set; `site` holds the rest, which see beyond the object or depend on the
    image's layout, and run site by site: image quality, granularity (background and openings
    reach past the object), radial distribution (a nucleus's centre is the first of tied
    farthest-from-edge pixels, a tie CellProfiler breaks differently in a larger image),
    colocalisation (threshold relative to the image's maximum), neighbours. `all` is both."""
    channels, objects = list(channels), list(objects)
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if len(set(channels)) != len(channels) or len(set(objects)) != len(objects):
        raise ValueError(f"duplicated channel or object names: {channels} {objects}")
    if set(channels) & set(objects):
        raise ValueError(f"a name is both a channel and an object: {set(channels) & set(objects)}")
    if not channels:
        raise ValueError("need at least one channel")
    if part == "tiled" and not objects:
        raise ValueError("the tiled part measures objects: give at least one")
    site, tiled = part in ("all", "site"), part in ("all", "tiled")
    pipeline = Pipeline()
    _add(pipeline, _load_data())
    if site:
        _add(pipeline, _image_quality(channels))
    if tiled and objects:
        _add(pipeline, _size_shape(objects, zernike))
        _add(pipeline, _intensity(channels, objects))
    if tiled:
        _add(pipeline, _texture(channels, objects))
    if objects:
        if site:
            _add(pipeline, _granularity(channels, objects))
        if site:
            _add(pipeline, _radial(channels, objects))
        if site and len(channels) > 1:
            _add(pipeline, _colocalization(channels, objects))
        if site and "Nuclei" in objects:
            _add(pipeline, _neighbors("Nuclei", "Within a specified distance",
                                      NUCLEI_NEIGHBOR_DISTANCE))
        if site and "Cells" in objects:
            _add(pipeline, _neighbors("Cells", "Adjacent", NEIGHBOR_DISTANCE))
    _add(pipeline, _export(objects))
    return pipeline


def save_pipeline(pipeline: Pipeline, path: str | Path) -> None:
    with open(path, "w", newline="\n") as handle:
        pipeline.dump(handle)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the .cppipe to write")
    parser.add_argument("--channels", nargs="+", default=list(CHANNELS))
    parser.add_argument("--objects", nargs="*", default=list(OBJECTS))
    parser.add_argument("--zernike", action="store_true", help="also Zernike shape features")
    parser.add_argument("--part", choices=PARTS, default="all",
                        help="all modules, or the site-by-site or the tiled part (see build_pipeline)")
    args = parser.parse_args(argv)
    save_pipeline(build_pipeline(args.channels, args.objects, args.zernike, args.part), args.out)
    print(f"wrote {args.out} ({args.part}): channels {args.channels}, objects {args.objects}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
