"""Read and write DIALS reflection tables (``.refl``, msgpack) without DIALS.

The file is the msgpack array written by DIALS' C++ adaptor::

    ["dials::af::reflection_table", VERSION,
     {"identifiers": {id: identifier, ...}, "nrows": N,
      "data": {name: [type_name, [N, <binary blob>]], ...}}]

Fixed-size columns are little-endian C arrays (``vec3<double>`` is N x 3
float64, ``cctbx::miller::index<>`` N x 3 int32, ...). Shoebox columns are a
variable-length stream of per-row records. Every column is kept as the bytes it
was read as, so a column the program does not change is written back byte for
byte; numpy views of the fixed-size columns are made on request.

Files are memory-mapped and their columns left in place (:mod:`msgpack_lite`):
reading touches only the header and the columns that are used, and writing
copies every unchanged column from the input file to the output file in the
kernel (``copy_file_range``), so neither a read nor a write copies the table
through Python, and memory holds only the columns computed on. Every piece of
the output has a known place in the file before any value is computed, so
:meth:`ReflectionTable.begin_write` copies the unchanged columns while the
program computes, and writes each new column into its place when it is handed
over (:class:`TableWriter`).
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import weakref

import msgpack
import numpy as np

from dials_qconsistency.core.blocks import row_blocks
from dials_qconsistency.errors import OtherTableFormat, QConsistencyError
from dials_qconsistency.io.staged import write_atomically
from dials_qconsistency.io.msgpack_lite import BinRef, MalformedError, TrailingBytesError, bin_header, map_header, unpack

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


def _what_it_is(raw: bytes) -> str:
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

    def release(self) -> None:
        """Drop the file's pages from this process's memory: they stay in the
        page cache, and a later read maps them back in (a read-only mapping
        of the file, so nothing is lost)."""
        if isinstance(self.map, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)


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


#: Unchanged columns are copied in pieces of this size, so that a cancelled
#: write stops soon.
COPY_BYTES = 1 << 28


def _write_at(descriptor: int, payload, at: int) -> None:
    view = memoryview(payload).cast("B")
    while view:
        written = os.pwrite(descriptor, view[: 1 << 30], at)
        view = view[written:]
        at += written


def _copy_range(source: SourceFile, offset: int, length: int, descriptor: int, at: int, stop=None) -> None:
    """Copy ``length`` bytes at ``offset`` of the source file to ``at`` in
    ``descriptor`` in the kernel; through memory where the kernel cannot."""
    done = 0
    try:
        while done < length and not (stop and stop.is_set()):
            copied = os.copy_file_range(source.descriptor, descriptor, min(length - done, COPY_BYTES),
                                        offset + done, at + done)
            if copied == 0:
                raise OSError("copy_file_range copied nothing")
            done += copied
    except (AttributeError, OSError):  # an old kernel or Python, another file system
        _write_at(descriptor, memoryview(source.map)[offset + done: offset + length], at + done)


def _write_pieces(layout, descriptor: int, changed: bool, stop=None, names=None) -> None:
    """Write the pieces of ``layout`` ((offset, piece) pairs) at their places:
    the framing and unchanged columns, or (``changed``) the new columns (those
    in ``names`` if given)."""
    for at, piece in layout:
        if stop and stop.is_set():
            return
        if isinstance(piece, bytes):
            if not changed:
                _write_at(descriptor, piece, at)
            continue
        name, column = piece
        if column.changed != changed or (names is not None and name not in names):
            continue
        if column.blob is None:
            raise RuntimeError(f"the reserved column {name} was never given its values")
        if column.source is not None and not column.changed:
            _copy_range(column.source, column.offset, column.nbytes, descriptor, at, stop)
        else:
            _write_at(descriptor, column.blob, at)


class ColumnBlocks:
    """A column's values made a block of rows at a time, never held whole:
    ``make(rows)`` gives the values of the rows in the slice ``rows``; blocks of
    ``rows_per_block`` rows (None: :data:`blocks.BLOCK_ROWS`)."""

    def __init__(self, make, rows_per_block: int | None = None):
        self.make = make
        self.rows_per_block = rows_per_block

    def blocks(self, nrows: int):
        """(rows, values) for consecutive slices covering ``range(nrows)``."""
        for rows in row_blocks(nrows, self.rows_per_block):
            yield rows, self.make(rows)

    def whole(self, nrows: int) -> np.ndarray:
        pieces = self.blocks(nrows)
        rows, first = next(pieces, (slice(0, 0), np.asarray(self.make(slice(0, 0)))))
        first = np.asarray(first)
        values = np.empty((nrows,) + first.shape[1:], dtype=first.dtype)
        values[rows] = first
        for rows, block in pieces:
            values[rows] = block
        return values


def column_values(values, nrows: int):
    """An array of a column's values: ``values`` itself, or a ColumnBlocks made whole."""
    return values.whole(nrows) if isinstance(values, ColumnBlocks) else values


class TableWriter:
    """A table being written into a staged file while the program computes.

    Its layout is fixed when it starts: every new column has its place. A
    thread writes the framing and copies the unchanged columns at once, then
    each new column as it is handed over (:meth:`put`), whole or a block of
    rows at a time; :meth:`finish` writes any new column set in the table
    meanwhile. The bytes are those of a write in one go.
    """

    def __init__(self, table: "ReflectionTable", outputs, path: str, new_columns):
        self._table = table
        self._path = path
        self._layout = table._layout()
        self._places = {piece[0]: at for at, piece in self._layout if not isinstance(piece, bytes)}
        self._new = set(new_columns)
        self._written = set()
        self._queue = queue.SimpleQueue()
        self._descriptor = os.open(outputs.reserve(path), os.O_WRONLY)
        self._stop = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._write, name="table writer", daemon=True)
        outputs.on_abort(self.cancel)
        self._thread.start()

    def put(self, name: str, type_name: str, values) -> None:
        """Hand over a new column: an array (kept in the table as well) or a
        :class:`ColumnBlocks` (written block by block, never whole)."""
        if name not in self._new:
            raise RuntimeError(f"column {name} has no place kept in the table being written")
        if not isinstance(values, ColumnBlocks):
            self._table.set_column(name, type_name, values)
            values = self._table._columns[name].blob
        self._queue.put((name, type_name, values))

    def _write(self) -> None:
        try:
            _write_pieces(self._layout, self._descriptor, changed=False, stop=self._stop)
            for name, type_name, values in iter(self._queue.get, None):
                if self._stop.is_set():
                    return
                at = self._places[name]
                if isinstance(values, ColumnBlocks):
                    dtype, shape = FIXED_TYPES[type_name]
                    width = row_bytes(type_name)
                    for rows, block in values.blocks(self._table.nrows):
                        if self._stop.is_set():
                            return
                        block = np.ascontiguousarray(block, dtype=dtype)
                        if block.shape != (rows.stop - rows.start,) + shape:
                            raise RuntimeError(f"column {name}: a block of shape {block.shape}")
                        _write_at(self._descriptor, block, at + rows.start * width)
                else:
                    _write_at(self._descriptor, values, at)
                self._written.add(name)
        except BaseException as error:  # raised by finish
            self._error = error

    def finish(self) -> None:
        """Wait for the thread, write the new columns set in the table but not
        handed over; errors name the file."""
        self._queue.put(None)
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            layout = self._table._layout()
            if [at for at, _ in layout] != [at for at, _ in self._layout]:
                raise RuntimeError("the table's columns changed after its layout was fixed")
            _write_pieces(layout, self._descriptor, changed=True, names=self._new - self._written)
        except OSError as error:
            raise QConsistencyError(f"cannot be written ({error.strerror})", self._path) from None
        finally:
            self._close()

    def cancel(self) -> None:
        """Stop the thread (the run failed); the staged file is removed."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join()
        self._close()

    def _close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


class ReflectionTable:
    """A DIALS reflection table held as raw column blobs.

    Attributes: ``version`` (1 or 2), ``identifiers`` (dict experiment id ->
    identifier string, may be empty), ``nrows``.
    """

    def __init__(self, nrows: int, identifiers=None, version: int = DEFAULT_VERSION):
        self.nrows = int(nrows)
        self.identifiers = dict(identifiers or {})
        self.version = version
        self._columns: dict[str, Column] = {}
        self._header_order = ["identifiers", "nrows", "data"]
        self._sorted_on_read = True

    # -- access ---------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._columns

    def __len__(self) -> int:
        return self.nrows

    def keys(self):
        return list(self._columns)

    def column_type(self, name: str) -> str:
        return self._columns[name].type_name

    def column_blob(self, name: str) -> bytes:
        return bytes(self._columns[name].blob)

    def get(self, name: str) -> np.ndarray:
        """The column as a numpy array (N,) or (N, k); fixed-size types only."""
        column = self._columns[name]
        if column.type_name not in FIXED_TYPES:
            raise TypeError(f"column {name} of type {column.type_name} has no array view")
        return column.as_array(self.nrows)

    def columns(self) -> dict[str, np.ndarray]:
        """Numpy views of every fixed-size column (what the numpy core reads)."""
        return {name: self.get(name) for name, column in self._columns.items() if column.type_name in FIXED_TYPES}

    def release_memory(self) -> None:
        """Let the input file's pages go once its columns have been computed
        on (at 10M rows about 1 GB of resident memory): see SourceFile.release."""
        for source in {id(c.source): c.source for c in self._columns.values() if c.source is not None}.values():
            source.release()

    def set_column(self, name: str, type_name: str, values) -> None:
        """Add or replace a fixed-size column from an array of N rows."""
        dtype, shape = FIXED_TYPES[type_name]
        array = np.ascontiguousarray(column_values(values, self.nrows), dtype=dtype)
        if array.shape != (self.nrows,) + shape:
            raise ValueError(
                f"column {name}: shape {array.shape} != {(self.nrows,) + shape}"
            )
        self._columns[name] = Column(type_name, array, changed=True)  # written straight from the array

    def reserve_column(self, name: str, type_name: str) -> None:
        """Add (or replace) a fixed-size column whose values come later
        (:meth:`set_column`, or a TableWriter's ``put``); its place in the
        written file is fixed now."""
        self._columns[name] = Column(type_name, None, changed=True, size=self.nrows * row_bytes(type_name))

    # -- reading --------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str) -> "ReflectionTable":
        """Read a table, its columns left in the memory-mapped file."""
        try:
            source = SourceFile(path)
        except FileNotFoundError:
            raise QConsistencyError("file not found", path) from None
        except IsADirectoryError:
            raise QConsistencyError("is a directory, not a reflection table", path) from None
        except OSError as error:
            raise QConsistencyError(f"cannot be read ({error.strerror})", path) from None
        return cls._parse(source.map, path, source)

    @classmethod
    def from_bytes(cls, raw: bytes, path: str = "<bytes>") -> "ReflectionTable":
        return cls._parse(raw, path)

    @classmethod
    def _parse(cls, raw, path: str, source: SourceFile | None = None) -> "ReflectionTable":
        if not len(raw):
            raise QConsistencyError("is empty, not a reflection table", path)
        start = bytes(raw[:8])
        if start[:1] == b"\x80" or start[:1] in (b"(", b"c"):
            raise OtherTableFormat(pickle_hint(path), path, "pickle")
        if start[:1] != b"\x93":  # every table is a msgpack array of three
            message = f"is not a DIALS reflection table ({_what_it_is(start)})"
            if start.startswith(HDF5_MAGIC):  # DIALS reads HDF5 tables (as_hdf5)
                raise OtherTableFormat(message, path, "hdf5")
            raise QConsistencyError(message, path)
        try:
            obj = unpack(raw)
        except TrailingBytesError:
            raise QConsistencyError(
                "has trailing bytes after the reflection table (corrupt file)", path
            ) from None
        except MalformedError:
            raise QConsistencyError(
                "is truncated or not a msgpack reflection table", path
            ) from None
        return cls._from_object(obj, path, memoryview(raw), source)

    @classmethod
    def _from_object(cls, obj, path: str, view=None, source=None) -> "ReflectionTable":
        def bad(problem):
            return QConsistencyError(problem, path)

        if not (isinstance(obj, list) and len(obj) == 3 and obj[0] == FILETYPE):
            raise bad("is not a DIALS reflection table (no dials::af::reflection_table header)")
        version, header = obj[1], obj[2]
        if not _is_int(version) or version not in SUPPORTED_VERSIONS:
            raise bad(f"reflection table version {version!r:.20} is not supported (1 or 2 are)")
        if not isinstance(header, dict):
            raise bad("reflection table header is not a map")
        unknown = set(header) - {"identifiers", "nrows", "data"}
        if unknown:
            raise bad(f"unknown key {sorted(map(str, unknown))[0]!r:.40} in the table header")
        nrows = header.get("nrows")
        if not _is_int(nrows) or nrows < 0:
            raise bad("reflection table has no valid nrows")
        identifiers = header.get("identifiers", {})
        if not isinstance(identifiers, dict) or not all(
            _is_int(k) and isinstance(v, str) for k, v in identifiers.items()
        ):
            raise bad("identifiers map is not {int: string}")
        data = header.get("data", {})
        if not isinstance(data, dict):
            raise bad("column data is not a map")
        if not all(isinstance(name, str) for name in data):
            raise bad("a column name is not a string")

        table = cls(nrows, identifiers, version)
        table._header_order = list(header)
        for name, entry in data.items():
            table._columns[name] = _check_column(name, entry, nrows, version, path, view, source)
        names = list(data)
        table._sorted_on_read = names == sorted(names)
        return table

    # -- writing --------------------------------------------------------------
    def _pieces(self):
        """The file as consecutive pieces: bytes of msgpack framing, and (name, Column).

        The same bytes as ``msgpack.packb([FILETYPE, version, header],
        use_bin_type=True)``, written without building the whole file in memory.
        """
        names = list(self._columns)
        if self._sorted_on_read:
            names = sorted(names)
        keys = list(self._header_order) + [k for k in ("identifiers", "nrows", "data") if k not in self._header_order]
        pack = lambda value: msgpack.packb(value, use_bin_type=True)
        framing = [b"\x93" + pack(FILETYPE) + pack(self.version) + map_header(len(keys))]
        for key in keys:
            framing.append(pack(key))
            if key == "identifiers":
                framing.append(pack(self.identifiers))
            elif key == "nrows":
                framing.append(pack(self.nrows))
            else:
                framing.append(map_header(len(names)))
                for name in names:
                    column = self._columns[name]
                    framing.append(pack(name) + b"\x92" + pack(column.type_name) + b"\x92" + pack(self.nrows)
                                   + bin_header(column.nbytes))
                    yield b"".join(framing)
                    framing = []
                    yield name, column
        if framing:
            yield b"".join(framing)

    def to_bytes(self) -> bytes:
        return b"".join(piece if isinstance(piece, bytes) else bytes(piece[1].blob) for piece in self._pieces())

    def _layout(self) -> list:
        """(offset in the file, piece) of every piece of :meth:`_pieces`."""
        layout, at = [], 0
        for piece in self._pieces():
            layout.append((at, piece))
            at += len(piece) if isinstance(piece, bytes) else piece[1].nbytes
        return layout

    def write_to(self, descriptor: int) -> None:
        """Write the file to an open descriptor; unchanged columns go file to file."""
        layout = self._layout()
        _write_pieces(layout, descriptor, changed=False)
        _write_pieces(layout, descriptor, changed=True)

    def stage(self, outputs, path: str) -> None:
        """Write the table as one of a :class:`files.StagedOutputs`' files."""
        outputs.add(path, self.write_to)

    def begin_write(self, outputs, path: str, new_columns: dict) -> TableWriter:
        """Reserve ``new_columns`` (name -> type name) and start writing the
        table as one of ``outputs``' files: everything else is copied while the
        program computes; hand the new columns to the writer's ``put`` (or set
        them in the table) as they are made, then call its ``finish``."""
        for name, type_name in new_columns.items():
            self.reserve_column(name, type_name)
        return TableWriter(self, outputs, path, new_columns)

    def write(self, path: str) -> None:
        """Write the table atomically: a temporary file, then a rename."""
        write_atomically(path, self.write_to)


def _check_column(name, entry, nrows, version, path, view=None, source=None) -> Column:
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
    if not _is_int(count) or count != nrows:
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SHOEBOX_HEADER = np.dtype([("panel", "<u4"), ("bbox", "<i4", (6,)), ("flag", "u1")])


def shoebox_blob_problem(blob: bytes, nrows: int, version: int) -> str | None:
    """Walk a Shoebox<> blob; return what is wrong with it, or None.

    Each row is a uint32 panel, six int32 bbox values, a uint8 flag and, when
    the flag is 1 or 2, float32 data, a mask (int32 for flag 1, uint8 for
    flag 2) and float32 background over the bbox volume.
    """
    size = memoryview(blob).nbytes
    offset = 0
    header_size = _SHOEBOX_HEADER.itemsize
    for _ in range(nrows):
        if offset + header_size > size:
            return "shoebox data ends early (truncated blob)"
        header = np.frombuffer(blob, dtype=_SHOEBOX_HEADER, count=1, offset=offset)[0]
        offset += header_size
        x0, x1, y0, y1, z0, z1 = (int(v) for v in header["bbox"])
        if x1 < x0 or y1 < y0 or z1 < z0:
            return "shoebox with an inverted bounding box"
        flag = int(header["flag"])
        if flag in (1, 2):
            n = (x1 - x0) * (y1 - y0) * (z1 - z0)
            offset += n * (4 + (4 if flag == 1 else 1) + 4)
        elif flag != 0:
            return f"shoebox with unknown data flag {flag}"
    if offset != size:
        return f"shoebox blob is {size} bytes, its {nrows} rows need {offset}"
    return None
