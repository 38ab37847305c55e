"""Property-based fuzzing: random mutations of real DIALS tables and experiment lists.

Whatever the mutation, reading the table (and, when it reads, computing q
with its experiment list and writing it back) either works or raises the
program's own one-line QConsistencyError, never anything else. The same holds
for mutated ``.expt`` JSON. A short run is part of the default suite;
``python -m pytest -m fuzz tests`` runs 10,000 examples of each.
"""

from __future__ import annotations

import json
import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dials_qconsistency.core.statistics import summarise
from dials_qconsistency.core.q_vectors import Options, compute_q
from dials_qconsistency.core.decomposition import decompose
from dials_qconsistency.core.diagnosis import diagnose
from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.io.expt import experiments_from_bytes, read_experiments
from dials_qconsistency.report.columns import output_columns
from dials_qconsistency.io.refl import ReflectionTable
from dials_qconsistency.io.refl_format import FIXED_TYPES, OPAQUE_TYPES
from dials_qconsistency.report.text import diagnosis_text, json_report, residuals_text, summary_text
from conftest import SHARED_DATA

#: Small real pairs: stills with shoeboxes (v1), a rotation sweep (v2), a 64-panel CSPAD (v2).
#: A numpy warning would be a second line on stderr: any of them fails the fuzzing.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

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
        expt = os.path.join(SHARED_DATA, folder, stem + ".expt")
        loaded.append((raw, read_experiments(expt), open(expt, "rb").read()))
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


# -- experiment-list mutations (decode the JSON, change one node, re-encode) ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _nodes(node, trail=()):
    """Every (container, key) path in a JSON document."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found.append(trail + (key,))
        found.extend(_nodes(value, trail + (key,)))
    return found


@st.composite
def expt_mutation(draw, raw: bytes) -> bytes:
    document = json.loads(raw)
    trail = draw(st.sampled_from(_nodes(document)))
    parent = document
    for key in trail[:-1]:
        parent = parent[key]
    kind = draw(st.sampled_from(["replace", "delete", "scale", "swap_type"]))
    value = parent[trail[-1]]
    if kind == "delete":
        del parent[trail[-1]]
    elif kind == "scale" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[trail[-1]] = value * draw(st.sampled_from([0, -1, 1e300, float("nan"), 1.5]))
    elif kind == "swap_type":
        parent[trail[-1]] = [value] if not isinstance(value, list) else {"0": value}
    else:
        parent[trail[-1]] = draw(json_values)
    text = json.dumps(document)
    if draw(st.booleans()):  # and sometimes a byte-level change on top
        return draw(byte_mutation(text.encode()))
    return text.encode()


class Mutant:
    """A mutated file; its repr names the source and the size, not 100 kB of bytes."""

    def __init__(self, raw: bytes, pair: int, kind: str):
        self.raw, self.pair, self.kind = raw, pair, kind

    def __repr__(self):
        return f"Mutant({self.kind} from {'/'.join(PAIRS[self.pair])}, {len(self.raw)} bytes, starts {self.raw[:12]!r})"


@st.composite
def mutants(draw, kinds=("refl", "refl", "expt")):
    pair = draw(st.integers(0, len(PAIRS) - 1))
    kind = draw(st.sampled_from(kinds))
    if kind == "expt":
        return Mutant(draw(expt_mutation(LOADED[pair][2])), pair, kind)
    mutate = byte_mutation if draw(st.booleans()) else structure_mutation
    return Mutant(draw(mutate(LOADED[pair][0])), pair, kind)


def read_experiment_list(raw: bytes, table_raw: bytes) -> str:
    """A mutated .expt: read it and, when it reads, compute q for its own table."""
    try:
        experiments = experiments_from_bytes(raw, "fuzzed.expt")
    except QConsistencyError as error:
        text = str(error)
        assert "\n" not in text and text.startswith("fuzzed.expt: "), text
        event("expt: " + text.split(": ", 1)[1][:40])
        return "error"
    return read_compute_write(table_raw, experiments)


def read_compute_write(raw: bytes, experiments) -> str:
    """What one mutated table does: 'read' (and computed) or 'error'. Anything else raises."""
    try:
        table = ReflectionTable.from_bytes(raw, "fuzzed.refl")
        columns = table.columns()
        for source in ("calculated", "observed"):
            options = Options(q_pixel_source=source)
            result = compute_q(
                experiments, columns, table.identifiers, options, path="fuzzed.refl", experiments_path="fuzzed.expt"
            )
            # everything the command does after reading, but the figures
            parts = decompose(experiments, result)
            summary = summarise(result, experiments, parts, 10, 1)
            diagnoses = diagnose(experiments, result, parts)
            json.dumps(json_report(summary, diagnoses, options, {}))
            summary_text(summary, options), residuals_text(summary), diagnosis_text(diagnoses)
        for name, (type_name, values) in output_columns(result, parts).items():
            table.set_column(name, type_name, values)
        ReflectionTable.from_bytes(table.to_bytes(), "rewritten.refl")
        return "read"
    except QConsistencyError as error:
        text = str(error)
        assert "\n" not in text and text.startswith(("fuzzed.refl: ", "fuzzed.expt: ", "rewritten.refl: ")), text
        event(text.split(": ", 1)[1][:48])
        return "error"


def check_fuzz(mutant) -> str:
    if mutant.kind == "expt":
        outcome = read_experiment_list(mutant.raw, LOADED[mutant.pair][0])
    else:
        outcome = read_compute_write(mutant.raw, LOADED[mutant.pair][1])
    event(outcome)
    return outcome


_common = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@needs_data
def test_fuzz_short():
    """300 mutants (derandomised): each is read or refused in one line, and the
    run reaches both outcomes (some mutants still read, and the core then runs
    on them; some are refused)."""
    outcomes: dict[str, int] = {}

    @settings(max_examples=300, derandomize=True, **_common)
    @given(mutants())
    def run(mutant):
        outcome = check_fuzz(mutant)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    run()
    assert outcomes.get("read", 0) >= 30 and outcomes.get("error", 0) >= 100, outcomes


@needs_data
@pytest.mark.fuzz
@settings(max_examples=10_000, **_common)
@given(mutants(kinds=("refl",)))
def test_fuzz_tables_10000(mutant):
    check_fuzz(mutant)


@needs_data
@pytest.mark.fuzz
@settings(max_examples=10_000, **_common)
@given(mutants(kinds=("expt",)))
def test_fuzz_experiment_lists_10000(mutant):
    check_fuzz(mutant)


@needs_data
def test_the_unmutated_tables_read_and_compute():
    """The fuzzing starts from tables that work: a mutation is what breaks them."""
    assert [read_compute_write(raw, experiments) for raw, experiments, _ in LOADED] == ["read"] * len(LOADED)
    assert [read_experiment_list(expt, raw) for raw, _, expt in LOADED] == ["read"] * len(LOADED)
