"""Run by CellProfiler's python (tests/test_features.py): the same random sequence of writes and
reads on two CellProfiler Measurements, one on CellProfiler's HDF5Dict and one on
BufferedMeasurementStore; prints a JSON line with the operations run and every answer that differs.
Then a pipeline's pattern (every image set writes every feature, an export reads them all) on two
fresh ones, counting the writes that reach HDF5 (HDF5Dict.__setitem__ and add_all) in each.

    python cellprofiler_store_check.py <path of cellprofiler_measurements.py> <seed> <operations>
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy
from cellprofiler_core.measurement import _measurements
from cellprofiler_core.utilities.hdf5_dict import HDF5Dict

OBJECTS = ("Image", "Nuclei", "Cells")
FEATURES = ("Count", "Area", "Label", "Mixed", "Intensity", "ObjectNumber", "FileName")


def load_store(path):
    spec = importlib.util.spec_from_file_location("cellprofiler_measurements", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BufferedMeasurementStore


def measurements(store):
    _measurements.HDF5Dict = store
    try:
        return _measurements.Measurements(mode="memory")
    finally:
        _measurements.HDF5Dict = HDF5Dict


def value(rng, feature):
    """A value of the kind a module writes, its type drawn per feature so that features get recast
    (int then float, numbers then text) as well as kept."""
    kind = rng.choice(["int", "float", "float32", "text", "none", "empty"],
                      p=[0.25, 0.3, 0.1, 0.15, 0.1, 0.1])
    if feature == "FileName":
        kind = "text"
    n = int(rng.integers(0, 4))
    if kind == "int":
        return rng.integers(-5, 5, n)
    if kind == "float":
        return rng.normal(size=n)
    if kind == "float32":
        return rng.normal(size=n).astype(numpy.float32)
    if kind == "text":
        return [f"t{int(x)}é" for x in rng.integers(0, 9, n)]
    return None if kind == "none" else numpy.array([])


def canonical(answer):
    if isinstance(answer, numpy.ndarray):
        return ["array", answer.dtype.kind, [canonical(x) for x in answer.tolist()]]
    if isinstance(answer, (list, tuple)):
        return [canonical(x) for x in answer]
    if isinstance(answer, float) and numpy.isnan(answer):
        return "nan"
    if isinstance(answer, (numpy.generic,)):
        return canonical(answer.item())
    if isinstance(answer, bytes):
        return ["bytes", answer.decode(errors="replace")]
    return answer if answer is None or isinstance(answer, (str, int, float, bool)) else repr(answer)


def ask(m, operation):
    try:
        return canonical(operation(m))
    except Exception as error:  # both stores must fail alike
        return ["error", type(error).__name__]


PIPELINE_IMAGE_SETS, PIPELINE_FEATURES = 20, 30


def hdf5_writes_of_a_pipeline(store_path, differences: list) -> dict:
    """Writes reaching HDF5 in each store ({"stock": n, "buffered": n}) while PIPELINE_IMAGE_SETS
    image sets each write PIPELINE_FEATURES per-object and as many per-image features, then every
    feature is read back (answers that differ go into `differences`)."""
    counts = {}

    def counting(method):
        def wrapper(self, *args, **kwargs):
            counts[type(self).__name__] = counts.get(type(self).__name__, 0) + 1
            return method(self, *args, **kwargs)
        return wrapper

    originals = HDF5Dict.__setitem__, HDF5Dict.add_all
    HDF5Dict.__setitem__, HDF5Dict.add_all = (counting(m) for m in originals)
    try:
        rng = numpy.random.default_rng(1)
        stores = (measurements(HDF5Dict), measurements(load_store(store_path)))
        for image in range(1, PIPELINE_IMAGE_SETS + 1):
            cells = int(rng.integers(0, 8))
            for i in range(PIPELINE_FEATURES):
                values, total = rng.normal(size=cells), float(rng.normal())
                for m in stores:
                    m.add_measurement("Nuclei", f"F{i}", values, image_set_number=image)
                    m.add_measurement("Image", f"Mean_F{i}", total, image_set_number=image)
        numbers = list(range(1, PIPELINE_IMAGE_SETS + 1))
        for obj in ("Nuclei", "Image"):
            for feature in stores[0].get_feature_names(obj):
                answers = [ask(m, lambda m, o=obj, f=feature: m.get_measurement(o, f, numbers))
                           for m in stores]
                if answers[0] != answers[1]:
                    differences.append({"step": "pipeline", "object": obj, "feature": feature,
                                        "stock": answers[0], "buffered": answers[1]})
    finally:
        HDF5Dict.__setitem__, HDF5Dict.add_all = originals
    return {"stock": counts.get("HDF5Dict", 0), "buffered": counts.get("BufferedMeasurementStore", 0)}


def main() -> int:
    store_path, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = numpy.random.default_rng(seed)
    stores = (measurements(HDF5Dict), measurements(load_store(store_path)))
    differences, reads = [], 0
    for step in range(count):
        obj, feature = rng.choice(OBJECTS), str(rng.choice(FEATURES))
        image = int(rng.integers(1, 6))
        roll = rng.random()
        if roll < 0.6:
            data = value(rng, feature)
            if obj == "Image":
                data = None if data is None or len(data) == 0 else data[0]
            operation = lambda m, o=obj, f=feature, d=data, n=image: m.add_measurement(  # noqa: E731
                o, f, d, image_set_number=n)
        elif roll < 0.85:
            reads += 1
            numbers = image if rng.random() < 0.6 else [int(x) for x in rng.integers(1, 6, 3)]
            operation = lambda m, o=obj, f=feature, n=numbers: m.get_measurement(o, f, n)  # noqa: E731
        elif roll < 0.9:
            operation = lambda m, o=obj, f=feature, n=image: (  # noqa: E731
                m.has_feature(o, f), m.has_measurements(o, f, n))
        elif roll < 0.95:
            operation = lambda m, o=obj: (m.get_object_names(), m.get_feature_names(o),  # noqa: E731
                                          m.get_image_numbers())
        elif roll < 0.98:
            operation = lambda m: m.get_measurement_columns()  # noqa: E731
        else:
            operation = lambda m, o=obj, f=feature: m.remove_measurement(o, f)  # noqa: E731
        answers = [ask(m, operation) for m in stores]
        if answers[0] != answers[1]:
            differences.append({"step": step, "object": obj, "feature": feature,
                                "stock": answers[0], "buffered": answers[1]})
    # and at the end, what an export reads: every feature of every object and image set
    for obj in stores[0].get_object_names():
        for feature in stores[0].get_feature_names(obj):
            reads += 1
            answers = [ask(m, lambda m, o=obj, f=feature: m.get_measurement(o, f, [1, 2, 3, 4, 5]))
                       for m in stores]
            if answers[0] != answers[1]:
                differences.append({"step": "end", "object": obj, "feature": feature,
                                    "stock": answers[0], "buffered": answers[1]})
    writes = hdf5_writes_of_a_pipeline(store_path, differences)
    print(json.dumps({"operations": count, "reads": reads, "differences": differences[:20],
                      "n_differences": len(differences), "hdf5_writes": writes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
