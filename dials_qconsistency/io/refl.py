"""Read DIALS reflection tables (``.refl``, msgpack) without DIALS, and write them.

The format, its column types and the checks of each column are in
:mod:`refl_format`. Every column is kept as the bytes it was read as, so a
column the program does not change is written back byte for byte; numpy views
of the fixed-size columns are made on request.

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

import msgpack
import numpy as np

from dials_qconsistency.errors import OtherTableFormat, QConsistencyError
from dials_qconsistency.io.refl_format import (
    DEFAULT_VERSION,
    FILETYPE,
    FIXED_TYPES,
    HDF5_MAGIC,
    SUPPORTED_VERSIONS,
    Column,
    SourceFile,
    check_column,
    is_int,
    pickle_hint,
    row_bytes,
    what_it_is,
)
from dials_qconsistency.io.refl_writer import TableWriter, column_values, write_pieces
from dials_qconsistency.io.staged import write_atomically
from dials_qconsistency.io.msgpack_lite import MalformedError, TrailingBytesError, bin_header, map_header, unpack


class ReflectionTable:
    """A DIALS reflection table held as raw column blobs.

    Attributes: ``version`` (1 or 2), ``identifiers`` (dict experiment id ->
    identifier string, may be empty), ``nrows``.
    """

    def __init__(self, nrows: int, identifiers=None, version: int = DEFAULT_VERSION):
        self.nrows = int(nrows)
        self.identifiers = dict(identifiers or {})
        self.version = version
        self.notes: list[str] = []  # the standalone reader has nothing to add about a file it reads
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

    def release_rows(self, start: int, stop: int) -> None:
        """Let go of the input file's pages holding rows ``start`` to ``stop``
        of its fixed-size columns, once they have been read (a stage going
        through the table a block at a time keeps only its blocks' pages)."""
        for column in self._columns.values():
            if column.source is not None and column.type_name in FIXED_TYPES:
                width = row_bytes(column.type_name)
                column.source.release(column.offset + start * width, (stop - start) * width)

    def set_column(self, name: str, type_name: str, values) -> None:
        """Add or replace a fixed-size column from an array of N rows."""
        self._columns[name] = Column(type_name, self.column_array(name, type_name, values), changed=True)

    def column_array(self, name: str, type_name: str, values) -> np.ndarray:
        """``values`` as the contiguous array a column of this type and length
        is written from (no copy when they already are one)."""
        dtype, shape = FIXED_TYPES[type_name]
        array = np.ascontiguousarray(column_values(values, self.nrows), dtype=dtype)
        if array.shape != (self.nrows,) + shape:
            raise ValueError(
                f"column {name}: shape {array.shape} != {(self.nrows,) + shape}"
            )
        return array

    def remove_column(self, name: str) -> None:
        """Leave column ``name`` out of the table (and of what it writes)."""
        del self._columns[name]

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
            message = f"is not a DIALS reflection table ({what_it_is(start)})"
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
        if not is_int(version) or version not in SUPPORTED_VERSIONS:
            raise bad(f"reflection table version {version!r:.20} is not supported (1 or 2 are)")
        if not isinstance(header, dict):
            raise bad("reflection table header is not a map")
        unknown = set(header) - {"identifiers", "nrows", "data"}
        if unknown:
            raise bad(f"unknown key {sorted(map(str, unknown))[0]!r:.40} in the table header")
        nrows = header.get("nrows")
        if not is_int(nrows) or nrows < 0:
            raise bad("reflection table has no valid nrows")
        identifiers = header.get("identifiers", {})
        if not isinstance(identifiers, dict) or not all(
            is_int(k) and isinstance(v, str) for k, v in identifiers.items()
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
            table._columns[name] = check_column(name, entry, nrows, version, path, view, source)
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
        write_pieces(layout, descriptor, changed=False)
        write_pieces(layout, descriptor, changed=True)

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


