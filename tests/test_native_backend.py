"""The native backend against the standalone one, inside a DIALS environment.

Every test here needs DIALS and dxtbx (conda-forge); elsewhere the module is
skipped with that reason. What is checked: the dxtbx models give the same
geometry as the standalone reader, dxtbx's own pixel -> mm mapping gives the
same millimetres, both backends give the same q to 1e-12 1/Angstrom on every
shared real pair, DIALS reads the standalone writer's table, and the command
runs as a native DIALS program.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from dials_qconsistency import backends
from conftest import REAL_PAIRS, REPO_ROOT

pytestmark = pytest.mark.skipif(
    not backends.dials_importable(),
    reason="DIALS and dxtbx are not importable here (they come from conda-forge); "
    "the native backend is tested inside a DIALS environment",
)

TOLERANCE = 1e-12  # 1/Angstrom


def both(shared, folder, name, **options):
    """(standalone, native) results of the numpy core for one real pair."""
    from dials_qconsistency.compute import Options, compute_q
    from dials_qconsistency.decomposition import decompose

    out = []
    for backend in (backends.Standalone, backends.get("native")):
        experiments = backend.read_experiments(shared(folder, name + ".expt"))
        table = backend.read_table(shared(folder, name + ".refl"))
        result = compute_q(experiments, table.columns(), table.identifiers, Options(**options))
        out.append((experiments, table, result, decompose(experiments, result)))
    return out


def assert_close(a, b, tolerance=TOLERANCE):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    finite = ~np.isnan(a)
    assert np.max(np.abs(a[finite] - b[finite]), initial=0.0) <= tolerance


@pytest.mark.parametrize("folder, name", REAL_PAIRS)
@pytest.mark.parametrize("source", ["calculated", "observed", "observed_px"])
def test_both_backends_agree_on_every_real_pair(shared, folder, name, source):
    (_, _, mine, my_parts), (_, _, theirs, their_parts) = both(shared, folder, name, q_pixel_source=source)
    np.testing.assert_array_equal(mine.reason, theirs.reason)
    for field in ("q_bragg", "q_pixel", "q_pred", "delta_q"):
        assert_close(getattr(mine, field), getattr(theirs, field))
    assert_close(my_parts.angle, their_parts.angle)


@pytest.mark.parametrize("folder, name", REAL_PAIRS)
def test_dxtbx_models_equal_the_standalone_reader(shared, folder, name):
    (mine, *_), (theirs, *_) = both(shared, folder, name)
    for a, b in zip(mine, theirs):
        assert_close(a.beam.s0, b.beam.s0)
        assert_close(a.crystal.A, b.crystal.A)
        if a.crystal.A_at_scan_points is not None:
            assert_close(a.crystal.A_at_scan_points, b.crystal.A_at_scan_points)
        for p, q in zip(a.detector.panels, b.detector.panels):
            assert_close(p.origin, q.origin, 1e-9)  # mm
            assert_close(p.fast, q.fast)
            assert_close(p.slow, q.slow)
        assert a.detector.groups == b.detector.groups


@pytest.mark.parametrize("folder, name", REAL_PAIRS)
def test_dxtbx_pixel_mapping_equals_the_numpy_one(shared, folder, name):
    from dials_qconsistency.compute import panel_millimetres

    (mine, my_table, *_), (theirs, *_) = both(shared, folder, name)
    columns = my_table.columns()
    if "xyzobs.px.value" not in columns:
        pytest.skip("no xyzobs.px.value in this table")
    ids = columns["id"]
    for index, (a, b) in enumerate(zip(mine, theirs)):
        rows = ids == index
        panels = columns["panel"][rows].astype(np.int64)
        xy = columns["xyzobs.px.value"][rows, :2]
        assert_close(panel_millimetres(a.detector, panels, xy), panel_millimetres(b.detector, panels, xy), 1e-9)


def run_command(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "dials_qconsistency.command_line.q_consistency", *args],
        cwd=cwd, env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True, text=True,
    )


@pytest.mark.parametrize("folder, name", REAL_PAIRS)
def test_dials_reads_what_either_backend_wrote(shared, tmp_path, folder, name):
    from dials.array_family import flex

    from dials_qconsistency.reflection_table import ReflectionTable

    tables = {}
    for backend in ("standalone", "native"):
        out = tmp_path / f"{backend}.refl"
        done = run_command(shared(folder, name + ".expt"), shared(folder, name + ".refl"), f"backend={backend}",
                           f"output.reflections={out}", "output.plots=None", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        tables[backend] = flex.reflection_table.from_file(str(out))
        ReflectionTable.from_file(str(out))  # and the standalone reader reads DIALS' as_file
    from dxtbx import flumpy

    original = flex.reflection_table.from_file(shared(folder, name + ".refl"))
    for key in original.keys():  # every input column survives both writers
        if key == "shoebox":
            assert all(table["shoebox"].size() == original["shoebox"].size() for table in tables.values())
            continue
        for table in tables.values():
            try:  # numeric columns through flumpy; the rest (int6, strings) element by element
                np.testing.assert_array_equal(flumpy.to_numpy(table[key]), flumpy.to_numpy(original[key]), err_msg=key)
            except (TypeError, ValueError, RuntimeError):
                assert list(table[key]) == list(original[key]), key
    for key in ("q_bragg", "q_pixel", "delta_q", "delta_q.norm"):
        assert_close(flumpy.to_numpy(tables["standalone"][key]), flumpy.to_numpy(tables["native"][key]))


def test_native_command_shows_its_configuration(tmp_path):
    done = run_command("-c", cwd=tmp_path)
    assert done.returncode == 0
    assert "backend = *auto native standalone" in done.stdout
    assert os.listdir(tmp_path) == []
