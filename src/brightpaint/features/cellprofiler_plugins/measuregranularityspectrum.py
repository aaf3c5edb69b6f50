"""CellProfiler plugin: MeasureGranularity that records only the granular spectrum.

CellProfiler 5's MeasureGranularity also writes, for every object feature, five per-image summaries
(Mean_/Median_/Max_/Min_/StDev_Granularity_<i>_<channel>_<objects>): 720 image columns per site for
3 channels x 3 object sets x 16 spectrum steps, against 192 spectrum columns. Each column is a
write into CellProfiler's HDF5 measurement store (~2.5 ms on the CI machine) and a column of
Image.csv, so the summaries were ~35 % of the site half's CellProfiler time, and brightpaint never
reads them (it aggregates per well itself, brightpaint.profiles). This module runs CellProfiler's
own MeasureGranularity code on the same settings and keeps its spectrum, per image
(Granularity_<i>_<channel>) and per object, unchanged.

Loaded by CellProfiler from this folder (`cellprofiler --plugins-directory`,
brightpaint.features.runner); runs under the CellProfiler environment's Python only.
"""

from types import SimpleNamespace

from cellprofiler.modules.measuregranularity import MeasureGranularity


class _SpectrumOnly:
    """Passes on the measurements named in `names` (of any object, "Image" included), drops the rest."""

    def __init__(self, measurements, names: set[str]):
        self._measurements, self._names = measurements, names

    def add_image_measurement(self, name, value, *args, **kwargs):
        if name in self._names:
            self._measurements.add_image_measurement(name, value, *args, **kwargs)

    def add_measurement(self, object_name, name, values, *args, **kwargs):
        if name in self._names:
            self._measurements.add_measurement(object_name, name, values, *args, **kwargs)


class MeasureGranularitySpectrum(MeasureGranularity):
    module_name = "MeasureGranularitySpectrum"

    def run_on_image_setting(self, workspace, image_name):
        spectrum = {self.granularity_feature(i, image_name)
                    for i in range(1, self.granular_spectrum_length.value + 1)}
        filtered = SimpleNamespace(image_set=workspace.image_set, object_set=workspace.object_set,
                                   measurements=_SpectrumOnly(workspace.measurements, spectrum))
        return super().run_on_image_setting(filtered, image_name)
