"""The blob-leaving msgpack reader against msgpack itself (a second way).

Random documents and random corruptions of real tables: msgpack_lite.unpack must
accept exactly what msgpack.unpackb(raw=False, strict_map_key=False) accepts, give
the same values (a BinRef resolved to its bytes equals msgpack's bytes), and the
headers it writes must be msgpack's."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dials_qconsistency.io.msgpack_lite import (
    BinRef,
    ExtRef,
    MalformedError,
    TrailingBytesError,
    bin_header,
    map_header,
    unpack,
)

scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.binary(max_size=300)
)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=20)
    | st.dictionaries(st.text(max_size=10) | st.integers(-1000, 1000), children, max_size=20),
    max_leaves=60,
)


def resolve(value, raw):
    if isinstance(value, BinRef):
        return bytes(raw[value.offset: value.offset + value.length])
    if isinstance(value, list):
        return [resolve(v, raw) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, raw) for k, v in value.items()}
    return value


def reference(raw):
    try:
        return "ok", msgpack.unpackb(raw, raw=False, strict_map_key=False, use_list=True)
    except msgpack.ExtraData:
        return "trailing", None
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError):
        return "bad", None


def mine(raw):
    try:
        return "ok", resolve(unpack(raw), raw)
    except TrailingBytesError:
        return "trailing", None
    except MalformedError:
        return "bad", None


def contains_ext(value):
    if isinstance(value, (msgpack.ExtType, msgpack.Timestamp, ExtRef)):
        return True
    if isinstance(value, list):
        return any(contains_ext(v) for v in value)
    if isinstance(value, dict):
        return any(contains_ext(k) or contains_ext(v) for k, v in value.items())
    return False


@settings(max_examples=400, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(documents)
def test_documents_read_back_as_msgpack_reads_them(document):
    raw = msgpack.packb(document, use_bin_type=True)
    assert mine(raw) == reference(raw)


@settings(max_examples=1500, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(documents, st.data())
def test_corruptions_are_refused_exactly_when_msgpack_refuses_them(document, data):
    raw = bytearray(msgpack.packb(document, use_bin_type=True))
    action = data.draw(st.sampled_from(["cut", "flip", "insert", "append"]))
    at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
    if action == "cut":
        raw = raw[:at]
    elif action == "flip" and raw:
        raw[at] = data.draw(st.integers(0, 255))
    elif action == "insert":
        raw[at:at] = bytes([data.draw(st.integers(0, 255))])
    else:
        raw += bytes([data.draw(st.integers(0, 255))])
    raw = bytes(raw)
    ours, theirs = mine(raw), reference(raw)
    if ours[0] == theirs[0] == "ok" and (contains_ext(ours[1]) or contains_ext(theirs[1])):
        return  # ext values are opaque here (never part of a table)
    assert repr(ours) == repr(theirs), (raw, ours, theirs)  # repr: a flipped byte can make a NaN, NaN != NaN


@pytest.mark.parametrize("n", [0, 1, 15, 16, 255, 65535, 65536])
def test_headers_are_the_ones_msgpack_writes(n):
    assert map_header(n) == msgpack.packb({i: None for i in range(n)})[: len(map_header(n))]
    assert bin_header(n) + b"\0" * n == msgpack.packb(b"\0" * n, use_bin_type=True)
