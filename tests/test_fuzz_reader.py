"""Property-based fuzzing: random mutations of real DIALS tables.

Whatever the mutation, reading the table (and, when it reads, computing q
with its experiment list and writing it back) either works or raises the
program's own one-line QConsistencyError, never anything else. A short run is
part of the default suite; ``python -m pytest -m fuzz tests`` runs 10,000
examples.
"""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dials_qconsistency.compute import Options, compute_q
from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.experiments import read_experiments
from dials_qconsistency.reflection_table import FIXED_TYPES, OPAQUE_TYPES, ReflectionTable
from conftest import SHARED_DATA

#: Small real pairs: stills with shoeboxes (v1), a rotation sweep (v2), a 64-panel CSPAD (v2).
PAIRS = [
    ("ssx_CuNiR_test_data", "indexed"),
    ("dials_current", "centroid_refined"),
    ("dials_current", "cspad_stills_refined"),
]
TYPE_NAMES = sorted(FIXED_TYPES) + list(OPAQUE_TYPES) + ["complex<float>", "", "vec3<int>"]
REQUIRED = ["miller_index", "id", "s1", "xyzcal.mm", "panel", "xyzobs.mm.value"]


def _load_pairs():
    if not os.path.isdir(SHARED_DATA):
        return None
    loaded = []
    for folder, stem in PAIRS:
        raw = open(os.path.join(SHARED_DATA, folder, stem + ".refl"), "rb").read()
        experiments = read_experiments(os.path.join(SHARED_DATA, folder, stem + ".expt"))
        loaded.append((raw, experiments))
    return loaded


LOADED = _load_pairs()
needs_data = pytest.mark.skipif(LOADED is None, reason=f"real DIALS data folder {SHARED_DATA} is absent (CI always has it)")

# -- byte-level mutations -------------------------------------------------------------


@st.composite
def byte_mutation(draw, raw: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite", "splice_head"]))
    n = len(raw)
    at = draw(st.integers(0, n - 1))
    if kind == "truncate":
        return raw[:at]
    if kind == "flip":
        data = bytearray(raw)
        for position in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8)):
            data[position] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "insert":
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:]
    if kind == "delete":
        return raw[:at] + raw[at + draw(st.integers(1, 64)):]
    if kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=32))
        return raw[:at] + chunk + raw[at + len(chunk):]
    return draw(st.binary(max_size=8)) + raw[draw(st.integers(0, 64)):]


# -- structure-level mutations (decode, change one thing, re-encode) -------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(-3, 3), inner, max_size=4),
    max_leaves=12,
)


def _columns(obj):
    return obj[2]["data"]


@st.composite
def structure_mutation(draw, raw: bytes) -> bytes:
    obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    header, data = obj[2], _columns(obj)
    names = sorted(data)
    name = draw(st.sampled_from(names + REQUIRED))
    kind = draw(st.sampled_from([
        "version", "nrows", "drop", "type", "count", "blob_length", "blob_values", "identifiers",
        "header_key", "replace_anything", "rename", "column_name_type", "magic", "top_length",
    ]))
    if kind == "version":
        obj[1] = draw(st.integers(-2, 5) | msgpack_values)
    elif kind == "nrows":
        header["nrows"] = draw(st.integers(-5, 2**64 - 1) | msgpack_values)
    elif kind == "drop":
        data.pop(name, None)
    elif kind == "type" and name in data:
        data[name][0] = draw(st.sampled_from(TYPE_NAMES))
    elif kind == "count" and name in data:
        data[name][1][0] = draw(st.integers(-1, 2**33) | msgpack_values)
    elif kind == "blob_length" and name in data:
        blob = data[name][1][1]
        cut = draw(st.integers(-len(blob), 64))
        data[name][1][1] = blob[:cut] if cut < 0 else blob + bytes(cut)
    elif kind == "blob_values" and name in data:
        blob = bytearray(data[name][1][1])
        if blob:
            start = draw(st.integers(0, len(blob) - 1))
            chunk = draw(st.sampled_from([
                np.array([np.nan, np.inf, -np.inf, 0.0, 1e308]).tobytes(),
                bytes(24),
                b"\xff" * 24,
            ]) | st.binary(min_size=1, max_size=24))
            blob[start:start + len(chunk)] = chunk[: len(blob) - start]
        data[name][1][1] = bytes(blob)
    elif kind == "identifiers":
        header["identifiers"] = draw(
            st.dictionaries(st.integers(-2, 12), st.text(max_size=6), max_size=4) | msgpack_values
        )
    elif kind == "header_key":
        header[draw(st.text(max_size=6))] = draw(msgpack_values)
    elif kind == "replace_anything":
        target = draw(st.sampled_from(["column", "payload", "header", "data"]))
        value = draw(msgpack_values)
        if target == "column" and name in data:
            data[name] = value
        elif target == "payload" and name in data:
            data[name][1] = value
        elif target == "header":
            obj[2] = value
        else:
            header["data"] = value
    elif kind == "rename" and name in data:
        data[draw(st.text(max_size=12))] = data.pop(name)
    elif kind == "column_name_type" and name in data:
        data[draw(st.integers(-3, 3) | st.binary(max_size=4))] = data.pop(name)
    elif kind == "magic":
        obj[0] = draw(st.text(max_size=30))
    elif kind == "top_length":
        obj = obj[: draw(st.integers(0, 2))] if draw(st.booleans()) else obj + [draw(msgpack_values)]
    return msgpack.packb(obj, use_bin_type=True)


class Mutant:
    """A mutated table; its repr names the source and the size, not 100 kB of bytes."""

    def __init__(self, raw: bytes, pair: int):
        self.raw, self.pair = raw, pair

    def __repr__(self):
        return f"Mutant(from {'/'.join(PAIRS[self.pair])}.refl, {len(self.raw)} bytes, starts {self.raw[:12]!r})"


@st.composite
def mutants(draw):
    pair = draw(st.integers(0, len(PAIRS) - 1))
    raw = LOADED[pair][0]
    mutate = byte_mutation if draw(st.booleans()) else structure_mutation
    return Mutant(draw(mutate(raw)), pair)


def read_compute_write(raw: bytes, experiments) -> str:
    """What one mutated table does: 'read' (and computed) or 'error'. Anything else raises."""
    try:
        table = ReflectionTable.from_bytes(raw, "fuzzed.refl")
        columns = {k: table.get(k) for k in table.keys() if table.column_type(k) in FIXED_TYPES}
        for source in ("calculated", "observed"):
            compute_q(experiments, columns, table.identifiers, Options(q_pixel_source=source), path="fuzzed.refl")
        ReflectionTable.from_bytes(table.to_bytes(), "rewritten.refl")
        return "read"
    except QConsistencyError as error:
        text = str(error)
        assert "\n" not in text and text.startswith(("fuzzed.refl: ", "rewritten.refl: ")), text
        event(text.split(": ", 1)[1][:48])
        return "error"


OUTCOMES: dict[str, int] = {}


def check_fuzz(mutant):
    outcome = read_compute_write(mutant.raw, LOADED[mutant.pair][1])
    event(outcome)
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


_common = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@needs_data
@settings(max_examples=300, derandomize=True, **_common)
@given(mutants())
def test_fuzz_short(example):
    check_fuzz(example)


@needs_data
@pytest.mark.fuzz
@settings(max_examples=10_000, **_common)
@given(mutants())
def test_fuzz_10000(example):
    check_fuzz(example)


def test_the_short_run_reached_both_outcomes():
    """Some mutants must still read (the core then runs on them) and some must be refused."""
    if not OUTCOMES:
        pytest.skip("test_fuzz_short did not run in this session")
    assert OUTCOMES.get("read", 0) >= 20 and OUTCOMES.get("error", 0) >= 100, OUTCOMES


@needs_data
def test_the_unmutated_tables_read_and_compute():
    """The fuzzing starts from tables that work: a mutation is what breaks them."""
    assert [read_compute_write(raw, experiments) for raw, experiments in LOADED] == ["read"] * len(LOADED)
