"""The DIALS reflection-table format (msgpack): its column types, the column
record, the input file kept mapped, and the checks of one column's bytes.

The file is the msgpack array written by DIALS' C++ adaptor::

    ["dials::af::reflection_table", VERSION,
     {"identifiers": {id: identifier, ...}, "nrows": N,
      "data": {name: [type_name, [N, <binary blob>]], ...}}]

Fixed-size columns are little-endian C arrays (``vec3<double>`` is N x 3
float64, ``cctbx::miller::index<>`` N x 3 int32, ...). Shoebox columns are a
variable-length stream of per-row records.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref

import numpy as np

from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.io.msgpack_lite import BinRef

FILETYPE = "dials::af::reflection_table"


SUPPORTED_VERSIONS = (1, 2)


DEFAULT_VERSION = 2


#: Fixed-size column types: DIALS type name -> (numpy dtype, per-row shape).
FIXED_TYPES = {
    "bool": (np.dtype("?"), ()),
    "int": (np.dtype("<i4"), ()),
    "std::size_t": (np.dtype("<u8"), ()),
    "double": (np.dtype("<f8"), ()),
    "vec2<double>": (np.dtype("<f8"), (2,)),
    "vec3<double>": (np.dtype("<f8"), (3,)),
    "mat3<double>": (np.dtype("<f8"), (9,)),
    "int6": (np.dtype("<i4"), (6,)),
    "cctbx::miller::index<>": (np.dtype("<i4"), (3,)),
}


#: Column types carried through untouched (variable-length records).
OPAQUE_TYPES = ("Shoebox<>", "FrameSlicedShoebox<>", "std::string")


def pickle_hint(path: str) -> str:
    """What a pickled table is and the DIALS command that converts it."""
    stem = os.path.splitext(os.path.basename(path))[0]
    target = f"{stem}_msgpack.refl" if path.endswith(".refl") else f"{stem}.refl"
    return (
        "is a Python pickle (the reflection-table format of older DIALS versions), not msgpack; "
        "convert it with DIALS, which still reads pickles: dials.python -c \"from dials.array_family import "
        f"flex; flex.reflection_table.from_file('{path}').as_file('{target}')\""
    )


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


#: Leading bytes of files users mistake for a reflection table.
_KNOWN_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed: gunzip it first"),
    (HDF5_MAGIC, "an HDF5 file, not msgpack"),
    (b"{", "JSON text (an experiment list?), not msgpack"),
    (b"\x89PNG", "a PNG image, not msgpack"),
)


def what_it_is(raw: bytes) -> str:
    for magic, what in _KNOWN_MAGIC:
        if raw.startswith(magic):
            return what
    return "not msgpack"


def row_bytes(type_name: str) -> int:
    """Bytes per row of a fixed-size column type."""
    dtype, shape = FIXED_TYPES[type_name]
    return dtype.itemsize * int(np.prod(shape, dtype=int))


class SourceFile:
    """An input table file kept open (and mapped) while its columns are in use."""

    def __init__(self, path: str):
        self.path = path
        self.descriptor = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.descriptor)
        size = os.fstat(self.descriptor).st_size
        self.map = mmap.mmap(self.descriptor, size, access=mmap.ACCESS_READ) if size else b""

    def release(self, offset: int = 0, length: int | None = None) -> None:
        """Drop the file's pages (those holding bytes ``offset`` to ``offset +
        length``; all by default) from this process's memory: they stay in the
        page cache, and a later read maps them back in (a read-only mapping
        of the file, so nothing is lost)."""
        if not (isinstance(self.map, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED")):
            return
        if length is None:
            self.map.madvise(mmap.MADV_DONTNEED)
            return
        start = offset - offset % mmap.PAGESIZE
        stop = min(offset + length, len(self.map))
        if stop > start:
            self.map.madvise(mmap.MADV_DONTNEED, start, stop - start)


class Column:
    """One column: its DIALS type name and its raw binary blob (any buffer).

    ``source`` and ``offset`` say where an unchanged blob lies in its input
    file, so that it can be copied file to file when the table is written.
    """

    __slots__ = ("type_name", "blob", "changed", "source", "offset", "size")

    def __init__(self, type_name: str, blob, changed: bool = False, source=None, offset: int = 0, size: int = 0):
        self.type_name = type_name
        self.blob = blob  # None: a column reserved, its values still to come
        self.changed = changed
        self.source = source
        self.offset = offset
        self.size = size

    @property
    def nbytes(self) -> int:
        return self.size if self.blob is None else memoryview(self.blob).nbytes

    def as_array(self, nrows: int) -> np.ndarray:
        """A read-only numpy view of a fixed-size column."""
        dtype, shape = FIXED_TYPES[self.type_name]
        array = np.frombuffer(self.blob, dtype=dtype).reshape((nrows,) + shape)
        array.flags.writeable = False
        return array


def check_column(name, entry, nrows, version, path, view=None, source=None) -> Column:
    def bad(problem):
        return QConsistencyError(f"column {name!r}: {problem}", path)

    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
        raise bad("is not [type, data]")
    type_name, payload = entry
    if not (isinstance(payload, list) and len(payload) == 2):
        raise bad("data is not [nrows, blob]")
    count, blob = payload
    if not isinstance(blob, BinRef):
        raise bad("data blob is not binary")
    offset = blob.offset
    blob = view[offset: offset + blob.length]
    if not is_int(count) or count != nrows:
        raise bad(f"has {count!r:.20} rows but the table has {nrows}")
    if type_name in FIXED_TYPES:
        expected = nrows * row_bytes(type_name)
        if blob.nbytes != expected:
            raise bad(f"blob is {blob.nbytes} bytes, expected {expected} for {nrows} rows of {type_name}")
    elif type_name == "Shoebox<>":
        problem = shoebox_blob_problem(blob, nrows, version)
        if problem:
            raise bad(problem)
    elif type_name not in OPAQUE_TYPES:
        raise bad(f"unknown column type {type_name!r}")
    return Column(type_name, blob, source=source, offset=offset)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SHOEBOX_HEADER = np.dtype([("panel", "<u4"), ("bbox", "<i4", (6,)), ("flag", "u1")])
_SHOEBOX_HEADER_STRUCT = struct.Struct("<I6iB")


def shoebox_blob_problem(blob: bytes, nrows: int, version: int) -> str | None:
    """Walk a Shoebox<> blob; return what is wrong with it, or None.

    Each row is a uint32 panel, six int32 bbox values, a uint8 flag and, when
    the flag is 1 or 2, float32 data, a mask (int32 for flag 1, uint8 for
    flag 2) and float32 background over the bbox volume. Rows without data
    (flag 0 everywhere, as after refinement) are checked all at once.
    """
    size = memoryview(blob).nbytes
    header_size = _SHOEBOX_HEADER.itemsize
    if size == nrows * header_size:  # every row a bare header, if every flag is 0
        headers = np.frombuffer(blob, dtype=_SHOEBOX_HEADER, count=nrows)
        if not headers["flag"].any():
            bbox = headers["bbox"]
            if np.any((bbox[:, 1] < bbox[:, 0]) | (bbox[:, 3] < bbox[:, 2]) | (bbox[:, 5] < bbox[:, 4])):
                return "shoebox with an inverted bounding box"
            return None
    offset = 0
    for _ in range(nrows):
        if offset + header_size > size:
            return "shoebox data ends early (truncated blob)"
        _, x0, x1, y0, y1, z0, z1, flag = _SHOEBOX_HEADER_STRUCT.unpack_from(blob, offset)
        offset += header_size
        if x1 < x0 or y1 < y0 or z1 < z0:
            return "shoebox with an inverted bounding box"
        if flag in (1, 2):
            n = (x1 - x0) * (y1 - y0) * (z1 - z0)
            offset += n * (4 + (4 if flag == 1 else 1) + 4)
        elif flag != 0:
            return f"shoebox with unknown data flag {flag}"
    if offset != size:
        return f"shoebox blob is {size} bytes, its {nrows} rows need {offset}"
    return None

