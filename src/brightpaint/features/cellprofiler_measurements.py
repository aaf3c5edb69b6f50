"""CellProfiler headless with its measurements buffered in memory.

Run with CellProfiler's own interpreter, in CellProfiler's environment (this file imports nothing
from brightpaint):

    <CellProfiler's python> cellprofiler_measurements.py <the arguments of `cellprofiler`>

Why: CellProfiler stores every measurement in an HDF5 file the moment a module makes it: one
append to a gzip-compressed dataset plus an index update per feature, image set and object, and
each object feature rewrites its objects' ObjectNumber column too. On the Cell Painting pipeline
that bookkeeping took about half of a headless run (cProfile of a demo shard: 52 of 101 s in
`Measurements.add_measurement`). `BufferedMeasurementStore` keeps what is written to a feature in
memory until something asks about that feature, then hands all of it to CellProfiler's own
`HDF5Dict.add_all` (or `__setitem__`) in one call. Every read, export and saved file therefore
goes through CellProfiler's own store and code; only the number of writes changes.
"""

from __future__ import annotations

import re
import sys

import numpy
from cellprofiler_core.measurement import _measurements
from cellprofiler_core.utilities.hdf5_dict import HDF5Dict, infer_hdf5_type


class _Pending:
    """The writes to one feature that wait, as HDF5Dict would have stored them: the data type it
    would have made and recast write by write, and each image set's values cast to it. For a
    feature HDF5 already holds, `load` reads what it holds (needed only if a write recasts it)."""

    def __init__(self, dtype=None, stored_values: int = 0, load=None):
        self.dtype = dtype                   # None: no dataset yet, or HDF5Dict's empty int one
        self.stored_values = stored_values   # how many values the dataset holds (never shrinks)
        self.values: dict[int, object] = {}  # image number -> values; the last write wins
        self.load = load
        self.replace = load is None          # written with add_all (else appended)

    def write(self, image_number: int, values, data_type) -> bool:
        """Take one image set's values as HDF5Dict.__setitem__ would; False if their type is one
        this class does not follow (the caller then lets HDF5Dict write the feature)."""
        if data_type is not None:
            if self.dtype is None or self.stored_values == 0:
                self._recast(numpy.dtype(data_type) if not _is_string(data_type) else data_type)
        elif len(values) > 0:
            kind = infer_hdf5_type(values)
            if not (_is_number(kind) or _is_string(kind)):
                return False
            if (self.dtype is None or self.stored_values == 0
                    or (_is_float(kind) and self.dtype.kind in ("i", "u"))
                    or (_is_string(kind) and not _is_string(self.dtype))):
                self._recast(kind)
        if len(values) > 0 or data_type is not None:
            values = self._cast(values)
        self.values[image_number] = values
        self.stored_values += len(values)
        return True

    def readable(self) -> bool:
        """Whether `read` answers as HDF5Dict would: the whole feature is here (nothing of it only
        in HDF5) and it holds numbers (HDF5Dict returns text in its own ways)."""
        return self.load is None and self.replace and (self.dtype is None
                                                       or not _is_string(self.dtype))

    def read(self, image_numbers) -> list:
        """HDF5Dict.__getitem__ for several image sets: an empty array each if its dataset is
        empty, else None for an image set without values and a copy of the values for the others."""
        if self.stored_values == 0:
            return [numpy.array([]) for _ in image_numbers]
        found = [self.values.get(n) for n in image_numbers]
        return [None if v is None or len(v) == 0 else v.copy() for v in found]

    def _cast(self, values):
        if _is_string(self.dtype):
            return numpy.array([str(v) for v in values], object)
        return numpy.hstack([values]).astype(self.dtype) if len(values) else numpy.array([], self.dtype)

    def _recast(self, dtype) -> None:
        if self.load is not None and self.stored_values > 0:
            # HDF5Dict recasts what the dataset holds too: write the whole feature anew
            self.values = {**self.load(), **self.values}
            self.load, self.replace = None, True
        self.dtype = dtype
        self.values = {n: self._cast(v) if len(v) else v for n, v in self.values.items()}


def _is_string(dtype) -> bool:
    return numpy.dtype(dtype).kind in ("S", "U", "O")


def _is_float(dtype) -> bool:
    return numpy.issubdtype(dtype, numpy.floating)


def _is_number(dtype) -> bool:
    return numpy.issubdtype(dtype, numpy.signedinteger) or numpy.dtype(dtype).kind == "u" \
        or _is_float(dtype)


class BufferedMeasurementStore(HDF5Dict):
    """An `HDF5Dict` whose writes, one image set at a time, wait in memory per feature, with the
    data type HDF5Dict would have given them write by write. Reads of numbers and the names of
    objects and features are answered from there; anything that needs the feature from HDF5 (a read
    of text, a kept file) first writes it in one `add_all` (a new feature) or one `__setitem__`
    (more image sets of a feature HDF5 holds). Anything unusual (several image sets in one write,
    a type other than numbers and text) is written by HDF5Dict itself."""

    def __init__(self, *args, **kwargs):
        self._pending: dict[tuple[str, str], _Pending] = {}
        super().__init__(*args, **kwargs)

    # --- writes --------------------------------------------------------------------------------
    def __setitem__(self, idxs, vals):
        image_number, values = _image_number(idxs), vals
        if image_number is not None and not numpy.isscalar(idxs[2]):
            # [number] with [values]: Measurements' way of writing one image feature
            if isinstance(vals, (list, tuple, numpy.ndarray)) and len(vals) == 1:
                values = vals[0]
            else:
                image_number = None
        key = idxs[:2] if isinstance(idxs, tuple) else None
        if image_number is None:
            self._flush(key)
            return super().__setitem__(idxs, vals)
        data_type = idxs[3] if len(idxs) == 4 else None
        with self.lock:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = self._start(*key)
            if not pending.write(image_number, _image_set_values(values), data_type):
                self._flush(key)
                return super().__setitem__(idxs, vals)

    def _start(self, object_name, feature_name) -> _Pending:
        """The first write to a feature since it was last written to HDF5 (if ever)."""
        if not self._stored(object_name, feature_name):
            return _Pending()
        dataset = super().get_dataset(object_name, feature_name)

        def load():
            data = dataset[:]
            return {n: data[where] for n, (where, _) in
                    super(BufferedMeasurementStore, self).get_indices(object_name,
                                                                      feature_name).items()}
        return _Pending(dataset.dtype, dataset.shape[0], load)

    def add_all(self, object_name, feature_name, values, idxs=None, data_type=None):
        # replaces the whole feature, so what waits for it is void
        with self.lock:
            self._pending.pop((object_name, feature_name), None)
            return super().add_all(object_name, feature_name, values, idxs, data_type)

    def __delitem__(self, idxs):
        self._flush(idxs[:2] if isinstance(idxs, tuple) else None)
        return super().__delitem__(idxs)

    def clear(self):
        with self.lock:
            self._pending.clear()
            return super().clear()

    # --- questions answered without writing ------------------------------------------------------
    def has_feature(self, object_name, feature_name):
        # HDF5Dict.has_feature, plus what waits (it must not ask has_object, below, which would
        # then look for a group that is not written yet)
        return (object_name, feature_name) in self._pending or self._stored(object_name,
                                                                             feature_name)

    def _stored(self, object_name, feature_name) -> bool:
        """HDF5Dict.has_feature: whether HDF5 holds the feature."""
        if (object_name, feature_name) in self.indices:
            return True
        return HDF5Dict.has_object(self, object_name) and feature_name in self.top_group[object_name]

    def has_object(self, object_name):
        return (any(key[0] == object_name for key in self._pending)
                or super().has_object(object_name))

    def has_data(self, object_name, feature_name, num_idx):
        pending = self._pending.get((object_name, feature_name))
        if pending is not None and num_idx in pending.values:
            return True
        return super().has_data(object_name, feature_name, num_idx)

    # --- everything else reads HDF5, after the writes it concerns --------------------------------
    def __getitem__(self, idxs):
        pending = self._pending.get(idxs[:2]) if isinstance(idxs, tuple) and len(idxs) == 3 else None
        if pending is None or not pending.readable():
            self._flush(idxs[:2])
            return super().__getitem__(idxs)
        # HDF5Dict.__getitem__ on what it would hold, for numbers
        if numpy.isscalar(idxs[2]):
            result = self[idxs[0], idxs[1], [idxs[2]]]
            return result if result is None else result[0]
        return pending.read(idxs[2])

    def get_dataset(self, object_name, feature_name):
        self._flush((object_name, feature_name))
        return super().get_dataset(object_name, feature_name)

    def get_feature_dtype(self, object_name, feature_name):
        pending = self._pending.get((object_name, feature_name))
        if pending is not None and pending.readable():
            # an all-empty feature is HDF5Dict's empty int dataset
            return pending.dtype if pending.dtype is not None else numpy.dtype(int)
        self._flush((object_name, feature_name))
        return super().get_feature_dtype(object_name, feature_name)

    def get_indices(self, object_name, feature_name):
        self._flush((object_name, feature_name))
        return super().get_indices(object_name, feature_name)

    def reorder(self, object_name, feature_name, image_numbers):
        self._flush((object_name, feature_name))
        return super().reorder(object_name, feature_name, image_numbers)

    def erase(self, object_name, first_idx, mask):
        self._flush(None)
        return super().erase(object_name, first_idx, mask)

    def top_level_names(self):
        with self.lock:
            return _in_hdf5_order(set(super().top_level_names()) | {o for o, _ in self._pending})

    def second_level_names(self, object_name):
        with self.lock:
            waiting = {f for o, f in self._pending if o == object_name}
            if not waiting:
                return super().second_level_names(object_name)
            stored = (super().second_level_names(object_name)
                      if HDF5Dict.has_object(self, object_name) else [])
            return _in_hdf5_order(set(stored) | waiting)

    def flush(self):
        self._flush(None)
        return super().flush()

    def file_contents(self):
        self._flush(None)
        return super().file_contents()

    def close(self):
        # a temporary or memory-only store is gone after this: only a kept file needs the writes
        if hasattr(self, "hdf5_file") and self.filename is not None and not self.is_temporary:
            self._flush(None)
        return super().close()

    def _flush(self, key) -> None:
        """Write what waits for `key` ((object, feature); None: every feature) to HDF5."""
        if not getattr(self, "_pending", None):
            return
        with self.lock:
            keys = list(self._pending) if key is None or len(key) != 2 else [tuple(key)]
            for object_name, feature_name in keys:
                pending = self._pending.pop((object_name, feature_name), None)
                if pending is None:
                    continue
                numbers = numpy.fromiter(pending.values, dtype=int, count=len(pending.values))
                values = list(pending.values.values())
                if pending.replace:
                    super().add_all(object_name, feature_name, values, numbers, pending.dtype)
                else:
                    super().__setitem__((object_name, feature_name, numbers, pending.dtype), values)
                data = self.top_group[object_name][feature_name]["data"]
                if pending.stored_values > 0 and data.shape[0] == 0:
                    # HDF5Dict's dataset keeps overwritten values, and whether it is empty
                    # decides both a later write's type and what a read returns
                    data.resize(1, 0)


def _in_hdf5_order(names) -> list[str]:
    """Names as an HDF5 group lists its members: by name, byte by byte."""
    return sorted(names, key=lambda name: name.encode())


def _image_number(idxs):
    """The image number of an HDF5Dict key (object, feature, image number[, data type]) that
    writes one image set, else None."""
    if not (isinstance(idxs, tuple) and len(idxs) in (3, 4) and isinstance(idxs[0], str)
            and isinstance(idxs[1], str)):
        return None
    number = idxs[2]
    if not numpy.isscalar(number):  # Measurements writes an image feature as [number]
        number = numpy.atleast_1d(number)
        if number.shape != (1,):
            return None
        number = number[0]
    if isinstance(number, (int, numpy.integer)) and number >= 0:
        return int(number)
    return None


def _image_set_values(values):
    """One image set's values as HDF5Dict normalises them (None: none, a scalar: one), copied:
    HDF5Dict stores them as they are at the time of the write."""
    if values is None:
        return []
    if numpy.isscalar(values):
        return [values]
    if isinstance(values, numpy.ndarray):
        return values.copy()
    return list(values)


def main() -> int:
    # Measurements looks HDF5Dict up in its module when it creates its store
    _measurements.HDF5Dict = BufferedMeasurementStore
    from cellprofiler.__main__ import main as cellprofiler_main

    sys.argv[0] = re.sub(r"(-script\.pyw|\.exe)?$", "", sys.argv[0])
    return cellprofiler_main()


if __name__ == "__main__":
    sys.exit(main())
