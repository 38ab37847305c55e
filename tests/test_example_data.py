"""The bundled example is what the simulator writes.

The files are computed (positions from the model through numpy), so they are
compared as values, not bytes: another CPU's numpy may round the last bit of a
float differently (SIMD paths). Floats agree to 1e-12 relative (a last-bit
difference through the ~20 operations behind a position is ~1e-14 relative,
while the smallest change worth noticing, 1 µm on a 100 mm detector, is
1e-5); integers, strings, names and the table's structure exactly.
"""

from __future__ import annotations

import json
import os

import numpy as np

from dials_qconsistency.io.refl import ReflectionTable
from dials_qconsistency.io.refl_format import FIXED_TYPES
from simulation.simulate import write_example
from conftest import EXAMPLES

RTOL = 1e-12


def assert_same_document(written, committed, where="document"):
    """Two parsed JSON documents: the same structure, floats to RTOL."""
    assert type(written) is type(committed) or {type(written), type(committed)} <= {int, float}, where
    if isinstance(committed, dict):
        assert list(written) == list(committed), where
        for key in committed:
            assert_same_document(written[key], committed[key], f"{where}.{key}")
    elif isinstance(committed, list):
        assert len(written) == len(committed), where
        for i, (a, b) in enumerate(zip(written, committed)):
            assert_same_document(a, b, f"{where}[{i}]")
    elif isinstance(committed, float):
        assert abs(written - committed) <= RTOL * max(1.0, abs(committed)), (where, written, committed)
    else:
        assert written == committed, where


def test_bundled_example_is_reproducible(tmp_path):
    written = write_example(str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["rotation.expt", "rotation.refl", "stills.expt",
                                                            "stills.refl"]
    for path in written:
        committed = os.path.join(EXAMPLES, os.path.basename(path))
        if path.endswith(".expt"):
            assert_same_document(json.load(open(path)), json.load(open(committed)), os.path.basename(path))
            continue
        new, old = ReflectionTable.from_file(path), ReflectionTable.from_file(committed)
        assert (new.nrows, new.identifiers, new.version) == (old.nrows, old.identifiers, old.version)
        assert [(n, new.column_type(n)) for n in new.keys()] == [(n, old.column_type(n)) for n in old.keys()]
        for name in old.keys():
            a, b = new.get(name), old.get(name)
            if FIXED_TYPES[old.column_type(name)][0].kind == "f":
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL, err_msg=name)
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_the_comparison_notices_a_changed_value(tmp_path):
    """The tolerance is tight enough to see a 1 nm change of one position."""
    written = write_example(str(tmp_path))
    refl = next(p for p in written if p.endswith("rotation.refl"))
    table = ReflectionTable.from_file(refl)
    xyz = np.array(table.get("xyzcal.mm"))
    xyz[7, 0] += 1e-6
    committed = ReflectionTable.from_file(os.path.join(EXAMPLES, "rotation.refl")).get("xyzcal.mm")
    assert not np.allclose(xyz, committed, rtol=RTOL, atol=RTOL)
    document = json.load(open(next(p for p in written if p.endswith("rotation.expt"))))
    document["beam"][0]["wavelength"] *= 1 + 1e-10
    try:
        assert_same_document(document, json.load(open(os.path.join(EXAMPLES, "rotation.expt"))))
    except AssertionError:
        return
    raise AssertionError("a changed wavelength passed the comparison")
