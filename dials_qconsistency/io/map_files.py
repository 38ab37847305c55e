"""Writing per-pixel maps block by block: HDF5 (h5py) and NumPy ``.npz``.

Both writers take the same calls — :meth:`begin_panel`, :meth:`write_rows` in
row order, :meth:`close` — so a map never has to be whole in memory. Layout:
one group per experiment and panel, ``experiment_<i>/panel_<j>/<quantity>``;
units and descriptions are HDF5 attributes, and in the ``.npz`` they are in the
JSON string stored under ``metadata`` (as are the experiment and panel
attributes). Both write to a path the caller chose (a staged temporary file).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile

import numpy as np


def _plain(value):
    """Attributes as JSON/HDF5-friendly values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


#: Set once an HDF5 map has been abandoned after a failure (see :meth:`Hdf5MapWriter.abort`).
libhdf5_unclean = False
_abandoned = []


class Hdf5MapWriter:
    """Datasets created at full size per panel, filled a row block at a time."""

    def __init__(self, path: str, file_attributes: dict):
        import h5py  # only dials.q_map needs it

        self._file = h5py.File(path, "w")
        self._file.attrs.update({k: _plain(v) for k, v in file_attributes.items()})
        self._datasets = {}

    def set_group_attributes(self, group: str, attributes: dict) -> None:
        self._file.require_group(group).attrs.update({k: _plain(v) for k, v in attributes.items() if v is not None})

    #: Datasets equal to another panel's are hard links to it (one copy in the file).
    links = True

    def begin_panel(self, group: str, attributes: dict, datasets: dict, coordinates: dict, links=None) -> None:
        """``datasets``: name -> (shape, dtype, units, description); ``coordinates``: name -> 1-d array;
        ``links``: name -> the group whose dataset of that name this panel's is (the
        coordinates then too), a hard link rather than a copy; the group's attribute
        ``same_maps_as`` names it."""
        node = self._file.require_group(group)
        node.attrs.update({k: _plain(v) for k, v in attributes.items() if v is not None})
        links = links or {}
        source = next(iter(links.values()), None)  # the group whose maps these are
        if source:
            node.attrs["same_maps_as"] = source
        for name, values in coordinates.items():
            if source:
                node[name] = self._file[f"{source}/{name}"]
            else:
                node.create_dataset(name, data=values).attrs["units"] = "pixel"
        self._datasets = {}
        for name, (shape, dtype, units, description) in datasets.items():
            if name in links:
                node[name] = self._file[f"{links[name]}/{name}"]
                continue
            dataset = node.create_dataset(name, shape=shape, dtype=dtype)
            dataset.attrs["units"] = units
            dataset.attrs["description"] = description
            self._datasets[name] = dataset

    def write_rows(self, start: int, stop: int, arrays: dict) -> None:
        for name, dataset in self._datasets.items():
            dataset[start:stop] = arrays[name]

    def end_panel(self) -> None:
        self._datasets = {}

    def close(self) -> None:
        self._file.close()

    def abort(self) -> None:
        """Close after a failure (the staged file is removed by the caller).
        libhdf5 (1.10, as Debian's h5py has it) may fail to close a file whose
        writes failed (a full disk, a file-size limit) and then crash in its
        own clean-up when the process exits: :data:`libhdf5_unclean` tells the
        command to end without it (``program.end_process``)."""
        global libhdf5_unclean
        libhdf5_unclean = True
        _abandoned.append(self)  # freeing its h5py objects can crash too: kept to the end
        try:
            self._file.close()
        except Exception:
            pass


class NpzMapWriter:
    """A zip of ``.npy`` members; each panel's arrays are streamed to ``.npy``
    files beside the output and moved into the zip when the panel ends."""

    def __init__(self, path: str, file_attributes: dict):
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._scratch = tempfile.mkdtemp(prefix=".tmp-q_map-", dir=os.path.dirname(os.path.abspath(path)))
        self._metadata = {"file": {k: _plain(v) for k, v in file_attributes.items()}, "groups": {}, "datasets": {}}
        self._open = {}  # member name -> (handle, path, expected row count, rows written)

    def set_group_attributes(self, group: str, attributes: dict) -> None:
        self._metadata["groups"].setdefault(group, {}).update(
            {k: _plain(v) for k, v in attributes.items() if v is not None}
        )

    #: Every member holds its own arrays (a zip has no links): all are computed.
    links = False

    def begin_panel(self, group: str, attributes: dict, datasets: dict, coordinates: dict, links=None) -> None:
        self.set_group_attributes(group, attributes)
        for name, values in coordinates.items():
            self._add_array(f"{group}/{name}", np.asarray(values))
            self._metadata["datasets"][f"{group}/{name}"] = {"units": "pixel"}
        for name, (shape, dtype, units, description) in datasets.items():
            member = f"{group}/{name}"
            scratch = os.path.join(self._scratch, f"{len(self._open)}.npy")
            handle = open(scratch, "wb")
            np.lib.format.write_array_header_2_0(
                handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
            )
            self._open[name] = (member, handle, scratch, np.dtype(dtype))
            self._metadata["datasets"][member] = {"units": units, "description": description}

    def write_rows(self, start: int, stop: int, arrays: dict) -> None:
        """Rows must come in order (the ``.npy`` data is written as it arrives)."""
        for name, values in arrays.items():
            member, handle, scratch, dtype = self._open[name]
            handle.write(np.ascontiguousarray(values, dtype=dtype).tobytes())

    def end_panel(self) -> None:
        for member, handle, scratch, _ in self._open.values():
            handle.close()
            with open(scratch, "rb") as source, self._zip.open(member + ".npy", "w", force_zip64=True) as target:
                shutil.copyfileobj(source, target, 1 << 22)
            os.unlink(scratch)
        self._open = {}

    def _add_array(self, member: str, values: np.ndarray) -> None:
        with self._zip.open(member + ".npy", "w", force_zip64=True) as target:
            np.lib.format.write_array(target, values, allow_pickle=False)

    def close(self) -> None:
        try:
            self._add_array("metadata", np.array(json.dumps(self._metadata, indent=1)))
            self._zip.close()
        finally:
            self.discard_scratch()

    def abort(self) -> None:
        """Close after a failure: the scratch files go (the staged zip is removed by the caller)."""
        try:
            self._zip.close()
        except Exception:
            pass
        finally:
            self.discard_scratch()

    def discard_scratch(self) -> None:
        for _, handle, _, _ in self._open.values():
            handle.close()
        self._open = {}
        shutil.rmtree(self._scratch, ignore_errors=True)


WRITERS = {"hdf5": Hdf5MapWriter, "npz": NpzMapWriter}
