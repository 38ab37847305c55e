"""Write a reflection table while the program computes.

Every piece of the output has a known place in the file before any value is
computed, so :class:`TableWriter` copies the unchanged columns from the input
file in the kernel (``copy_file_range``) on a thread, and writes each new
column into its place when it is handed over, whole or a block of rows at a
time (:class:`ColumnBlocks`). The bytes are those of a write in one go.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import threading

import numpy as np

from dials_qconsistency.core.blocks import row_blocks
from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.io.refl_format import FIXED_TYPES, SourceFile, row_bytes

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


_SYNC_FILE_RANGE_WRITE = 2


@functools.lru_cache(maxsize=None)
def _sync_file_range():
    """libc's sync_file_range (Linux), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


def start_writeback(descriptor: int) -> None:
    """Ask the kernel to start writing the file's dirty pages to disk now,
    without waiting (Linux' sync_file_range): the sync before the output is
    committed then waits for the last pieces only, not for the whole table
    (the kernel would otherwise hold up to a tenth of the memory unwritten)."""
    function = _sync_file_range()
    if function is not None:
        function(descriptor, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a hint: an error changes nothing


def write_pieces(layout, descriptor: int, changed: bool, stop=None, names=None, between=None) -> None:
    """Write the pieces of ``layout`` ((offset, piece) pairs) at their places:
    the framing and unchanged columns, or (``changed``) the new columns (those
    in ``names`` if given); the writing back to disk is started after each
    column, and ``between()`` (if given) is called before each piece."""
    for at, piece in layout:
        if between is not None:
            between()
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
        start_writeback(descriptor)


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
    thread writes the framing and copies the unchanged columns from the
    start; each new column handed over (:meth:`put`), whole or a block of
    rows at a time, is written between two copied ones, or as it comes once
    the copy is done. After :meth:`close` (no more columns) it writes any new
    column set in the table meanwhile and syncs the file to disk, while the
    program goes on; :meth:`finish` waits for it. The bytes are those of a
    write in one go.
    """

    def __init__(self, table, outputs, path: str, new_columns):
        self._table = table
        self._path = path
        self._layout = table._layout()
        self._places = {piece[0]: at for at, piece in self._layout if not isinstance(piece, bytes)}
        self._new = set(new_columns)
        self._written = set()
        self._queue = queue.SimpleQueue()
        self._queue_ended = False  # the writer thread has taken the close (None) off the queue
        self._closed = False
        self._descriptor = os.open(outputs.reserve(path), os.O_WRONLY)
        self._stop = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._write, name="table writer", daemon=True)
        outputs.on_abort(self.cancel)
        self._thread.start()

    def put(self, name: str, type_name: str, values) -> None:
        """Hand over a new column: an array (held until it is written, not
        kept in the table: the caller may let it go then) or a
        :class:`ColumnBlocks` (written block by block, never whole)."""
        if name not in self._new:
            raise RuntimeError(f"column {name} has no place kept in the table being written")
        if self._closed:
            raise RuntimeError(f"column {name} handed over after the write was closed")
        if not isinstance(values, ColumnBlocks):
            values = self._table.column_array(name, type_name, values)
        self._queue.put((name, type_name, values))

    def _write(self) -> None:
        try:
            # The input's columns are copied from the start; a column handed
            # over meanwhile is written between two of them, so that its array
            # may go soon; then the rest as they come.
            write_pieces(self._layout, self._descriptor, changed=False, stop=self._stop,
                         between=lambda: self._write_columns(wait=False))
            self._write_columns()
            if self._stop.is_set():
                return
            layout = self._table._layout()  # closed: the table no longer changes
            if [at for at, _ in layout] != [at for at, _ in self._layout]:
                raise RuntimeError("the table's columns changed after its layout was fixed")
            write_pieces(layout, self._descriptor, changed=True, names=self._new - self._written)
            os.fsync(self._descriptor)
        except BaseException as error:  # raised by finish
            self._error = error

    def _write_columns(self, wait: bool = True) -> None:
        """Write the columns handed over, as they come, until the write is
        closed (the end of the queue seen) or stopped; without ``wait``,
        only those waiting now."""
        while not (self._stop.is_set() or self._queue_ended):
            try:
                item = self._queue.get(block=wait)
            except queue.Empty:
                return
            if item is None:
                self._queue_ended = True
                return
            self._write_column(*item)
            item = None  # written: its array is not held while the next is awaited

    def _write_column(self, name: str, type_name: str, values) -> None:
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
        start_writeback(self._descriptor)
        self._written.add(name)

    def close(self) -> None:
        """No more columns: the thread writes what is left and syncs the file."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def failed(self) -> bool:
        """Has the thread stopped on an error (raised by :meth:`finish`)?"""
        return self._error is not None

    def finish(self) -> None:
        """Close, and wait for the thread; errors name the file."""
        self.close()
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
        except OSError as error:
            raise QConsistencyError(f"cannot be written ({error.strerror})", self._path) from None
        finally:
            self._close()

    def cancel(self) -> None:
        """Stop the thread (the run failed); the staged file is removed."""
        self._stop.set()
        self.close()
        self._thread.join()
        self._close()

    def _close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

