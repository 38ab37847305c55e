"""A msgpack reader that leaves binary blobs where they are.

``msgpack.unpackb`` copies every ``bin`` into a new ``bytes`` object: for a
10-million-row table that is gigabytes copied before a single column is used.
:func:`unpack` decodes everything else exactly as ``unpackb(raw=False,
strict_map_key=False)`` does and returns each ``bin`` as a :class:`BinRef`
(its offset and length in the buffer), so a table's columns can stay in the
memory-mapped file, and unchanged ones can be copied file to file by the kernel.

Malformed input raises :class:`MalformedError` (a ValueError); bytes after the
top-level object raise :class:`TrailingBytesError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_DEPTH = 256


class MalformedError(ValueError):
    """Truncated data, a reserved byte, bad UTF-8 or impossible sizes."""


class TrailingBytesError(ValueError):
    """Bytes follow the top-level object."""


@dataclass(frozen=True)
class BinRef:
    """A ``bin`` value: ``length`` bytes at ``offset`` of the unpacked buffer."""

    offset: int
    length: int


@dataclass(frozen=True)
class ExtRef:
    """An ``ext`` value (never part of a reflection table): its type code and bytes."""

    code: int
    data: bytes


_FIXED = {
    0xC0: None,
    0xC2: False,
    0xC3: True,
}
_INTS = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
_FLOATS = {0xCA: ">f", 0xCB: ">d"}
_LENGTHS = {1: ">B", 2: ">H", 4: ">I"}


class _Reader:
    def __init__(self, buffer):
        self.view = memoryview(buffer).cast("B")
        self.size = len(self.view)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > self.size:
            raise MalformedError("truncated")
        chunk = self.view[self.pos:end]
        self.pos = end
        return chunk

    def number(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def text(self, n: int) -> str:
        return str(self.take(n), "utf-8")

    def count(self, n: int, per_item: int) -> int:
        if n * per_item > self.size - self.pos:  # each item needs at least a byte
            raise MalformedError("container larger than the data")
        return n

    def value(self, depth: int = 0):
        if depth > MAX_DEPTH:
            raise MalformedError("nested too deeply")
        byte = self.take(1)[0]
        if byte <= 0x7F:
            return byte
        if byte >= 0xE0:
            return byte - 0x100
        if 0xA0 <= byte <= 0xBF:
            return self.text(byte & 0x1F)
        if 0x90 <= byte <= 0x9F:
            return self.array(byte & 0x0F, depth)
        if 0x80 <= byte <= 0x8F:
            return self.map(byte & 0x0F, depth)
        if byte in _FIXED:
            return _FIXED[byte]
        if byte in _INTS:
            return self.number(_INTS[byte])
        if byte in _FLOATS:
            return float(self.number(_FLOATS[byte]))
        if byte in (0xC4, 0xC5, 0xC6):  # bin 8/16/32
            length = self.number(_LENGTHS[1 << (byte - 0xC4)])
            start = self.pos
            self.take(length)
            return BinRef(start, length)
        if byte in (0xD9, 0xDA, 0xDB):  # str 8/16/32
            return self.text(self.number(_LENGTHS[1 << (byte - 0xD9)]))
        if byte in (0xDC, 0xDD):  # array 16/32
            return self.array(self.number(">H" if byte == 0xDC else ">I"), depth)
        if byte in (0xDE, 0xDF):  # map 16/32
            return self.map(self.number(">H" if byte == 0xDE else ">I"), depth)
        if 0xD4 <= byte <= 0xD8:  # fixext 1, 2, 4, 8, 16
            code = self.number(">b")
            return _ext(code, bytes(self.take(1 << (byte - 0xD4))))
        if byte in (0xC7, 0xC8, 0xC9):  # ext 8/16/32
            length = self.number(_LENGTHS[1 << (byte - 0xC7)])
            code = self.number(">b")
            return _ext(code, bytes(self.take(length)))
        raise MalformedError(f"reserved byte 0x{byte:02x}")  # 0xc1

    def array(self, n: int, depth: int) -> list:
        return [self.value(depth + 1) for _ in range(self.count(n, 1))]

    def map(self, n: int, depth: int) -> dict:
        out = {}
        for _ in range(self.count(n, 2)):
            key = self.value(depth + 1)
            try:
                hash(key)
            except TypeError:
                raise MalformedError("a map key that cannot be a key") from None
            out[key] = self.value(depth + 1)
        return out


def _ext(code: int, data: bytes) -> ExtRef:
    """Ext values msgpack accepts: codes 0..127, and timestamps (-1) of 4, 8 or 12 bytes."""
    if code < -1 or (code == -1 and len(data) not in (4, 8, 12)):
        raise MalformedError(f"ext code {code} with {len(data)} bytes")
    return ExtRef(code, data)


def unpack(buffer):
    """The object in ``buffer`` (bytes, mmap or memoryview), bins as :class:`BinRef`."""
    reader = _Reader(buffer)
    try:
        obj = reader.value()
    except UnicodeDecodeError:
        raise MalformedError("invalid UTF-8 in a string") from None
    except struct.error:
        raise MalformedError("truncated") from None
    if reader.pos != reader.size:
        raise TrailingBytesError(f"{reader.size - reader.pos} bytes after the object")
    return obj


def map_header(n: int) -> bytes:
    """The msgpack header of a map of n entries (what packb writes)."""
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + struct.pack(">H", n)
    return b"\xdf" + struct.pack(">I", n)


def bin_header(length: int) -> bytes:
    """The msgpack header of a bin of ``length`` bytes (what packb writes)."""
    if length < 1 << 8:
        return b"\xc4" + struct.pack(">B", length)
    if length < 1 << 16:
        return b"\xc5" + struct.pack(">H", length)
    return b"\xc6" + struct.pack(">I", length)
