"""Choosing the backend, and the native backend's conversions where DIALS is absent.

The native backend itself runs only where DIALS and dxtbx can be imported
(tests/test_native_backend.py). Here: how ``backend=`` resolves with DIALS
present or not, and the native code paths that need no DIALS: converting
dxtbx-style models (through a stand-in with dxtbx's getter conventions) and
mapping pixels through a per-panel callable, as dxtbx's panels do.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dials_qconsistency import backends, native
from dials_qconsistency.compute import Options, compute_q, panel_millimetres
from dials_qconsistency.geometry import pixel_to_millimetre
from conftest import EXAMPLES, REAL_PAIRS, REPO_ROOT, load


def fake_find_spec(present):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name in ("dials", "dxtbx"):
            return object() if present else None
        return real(name, *args)

    return find_spec


@pytest.mark.parametrize("present, expected", [(True, "native"), (False, "standalone")])
def test_auto_takes_native_exactly_when_dials_and_dxtbx_are_found(monkeypatch, present, expected):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(present))
    assert backends.resolve("auto") == expected
    assert backends.resolve("standalone") == "standalone"


def test_native_without_dials_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(False))
    with pytest.raises(Exception) as error:
        backends.resolve("native")
    assert "backend=native needs DIALS and dxtbx" in str(error.value)


def test_backend_choice_is_read_from_words_and_phil_files(tmp_path):
    from dials_qconsistency.command_line.program import peek_backend
    from dials_qconsistency.command_line.q_consistency import phil_scope

    phil = tmp_path / "choice.phil"
    phil.write_text("backend = standalone\n")
    assert peek_backend(["backend=native", "-v"], phil_scope) == ("native", None)
    assert peek_backend(["-c", "-e", "1", "backend=native"], phil_scope) == ("native", None)  # DIALS' -e N
    assert peek_backend([str(phil)], phil_scope) == ("standalone", None)
    assert str(peek_backend(["missing.txt"], phil_scope)[1]) == "missing.txt: file not found"
    assert peek_backend(["missing.txt"], phil_scope)[0] == "auto"
    assert str(peek_backend(["nproc=0"], phil_scope)[1]).startswith("bad parameter")
    assert str(peek_backend([], phil_scope)[0]).lower() == "auto"  # libtbx.phil's Auto


@pytest.mark.skipif(backends.dials_importable(), reason="DIALS is importable here: backend=native works")
def test_command_refuses_native_without_dials_and_writes_nothing(tmp_path):
    example = os.path.join(EXAMPLES, "stills")
    done = subprocess.run(
        [sys.executable, "-m", "dials_qconsistency.command_line.q_consistency", example + ".expt", example + ".refl",
         "backend=native"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True, text=True,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "backend=native needs DIALS and dxtbx" in done.stderr
    assert os.listdir(tmp_path) == []


def test_log_names_the_backend(tmp_path):
    from dials_qconsistency.command_line.q_consistency import run

    example = os.path.join(EXAMPLES, "rotation")
    os.chdir(tmp_path)
    run([example + ".expt", example + ".refl", "backend=standalone", "output.plots=None"])
    assert "(standalone backend)" in (tmp_path / "dials.q_consistency.log").read_text().splitlines()[0]


# -- the native backend, through a stand-in for DIALS and dxtbx ---------------------

STAND_IN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dials_stand_in")


@pytest.fixture
def dials_stand_in(monkeypatch):
    """tests/dials_stand_in importable as dials and dxtbx (see its README.txt)."""
    if backends.dials_importable():
        pytest.skip("the real DIALS is importable here: tests/test_native_backend.py runs instead")
    monkeypatch.syspath_prepend(STAND_IN)
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("dials", "dxtbx")]:
        del sys.modules[name]


@pytest.mark.parametrize("folder, name", REAL_PAIRS)
def test_models_from_dxtbx_getters_equal_the_standalone_models(shared, dials_stand_in, folder, name):
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt = shared(folder, name + ".expt")
    experiments, table, columns = load(expt, shared(folder, name + ".refl"))
    converted = native.experiments_from_dxtbx(ExperimentListFactory.from_json_file(expt, check_format=False))
    for mine, theirs in zip(experiments, converted):
        for kind in ("beam", "goniometer", "scan", "crystal"):
            a, b = getattr(mine, kind), getattr(theirs, kind)
            assert (a is None) == (b is None)
            if a is not None:
                for field in dataclasses.fields(a):
                    if field.name not in ("kind", "space_group"):
                        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name), err_msg=field.name)
        for a, b in zip(mine.detector.panels, theirs.detector.panels):
            for field in ("origin", "fast", "slow", "pixel_size", "image_size", "mu", "thickness", "parallax"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        assert mine.detector.groups == theirs.detector.groups  # from Detector.to_dict()'s hierarchy
    # The same models give the same numbers (the mapping callables aside).
    a = compute_q(experiments, columns, table.identifiers)
    b = compute_q(converted, columns, table.identifiers)
    np.testing.assert_array_equal(a.delta_q, b.delta_q)


def test_per_panel_pixel_mapping_callables_are_used_row_by_panel(shared):
    """The native path maps px -> mm by each panel's own callable (dxtbx's
    panel.pixel_to_millimeter); on 64 CSPAD panels, rows must reach their own
    panel's mapping and come back in place."""
    experiments, table, columns = load(
        shared("dials_current", "cspad_stills_refined.expt"), shared("dials_current", "cspad_stills_refined.refl")
    )
    detector = experiments[0].detector
    rows = table.get("panel").astype(np.int64)
    xy_px = table.get("xyzobs.px.value")[:, :2]
    expected = panel_millimetres(detector, rows, xy_px)
    calls = []

    def mapping_of(panel, index):
        def mapping(xy):
            calls.append(index)
            return pixel_to_millimetre(xy, panel.pixel_size, panel.origin, panel.fast, panel.slow,
                                       panel.mu, panel.thickness, panel.parallax)
        return mapping

    for index, panel in enumerate(detector.panels):
        panel.pixel_to_millimetre = mapping_of(panel, index)
    np.testing.assert_array_equal(panel_millimetres(detector, rows, xy_px), expected)
    assert sorted(calls) == sorted(set(rows.tolist())) and len(set(rows.tolist())) > 32
    result = compute_q(experiments, columns, table.identifiers, Options(q_pixel_source="observed_px"))
    assert np.nanmax(np.linalg.norm(result.q_pixel - result.q_pixel_observed, axis=1)) < 1e-12


def run_command(*args, cwd, stand_in=True):
    path = REPO_ROOT + (os.pathsep + STAND_IN if stand_in else "")
    return subprocess.run(
        [sys.executable, "-m", "dials_qconsistency.command_line.q_consistency", *args],
        cwd=cwd, env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True,
    )


def assert_same_tables(path_a, path_b):
    from dials_qconsistency.reflection_table import ReflectionTable

    a, b = ReflectionTable.from_file(str(path_a)), ReflectionTable.from_file(str(path_b))
    assert sorted(a.keys()) == sorted(b.keys()) and a.identifiers == b.identifiers
    for name in a.keys():
        assert a.column_blob(name) == b.column_blob(name), name


@pytest.mark.skipif(backends.dials_importable(), reason="the real DIALS is importable: test_native_backend.py runs")
@pytest.mark.parametrize("folder, name, options", [
    ("dials_current", "cspad_stills_refined", ["q_pixel.source=observed_px"]),
    ("quartz_processed", "refined", ["q_pixel.source=observed_px", "phi=observed"]),
    ("ssx_CuNiR_test_data", "integrated", []),
])
def test_native_plumbing_gives_the_standalone_outputs(shared, tmp_path, folder, name, options):
    """Through the stand-in: DIALS' parser reads the pair, the flex table is
    filled through flumpy and written by as_file, DIALS' logging writes the log;
    the table and JSON equal the standalone backend's."""
    inputs = [shared(folder, name + ".expt"), shared(folder, name + ".refl")]
    for backend in ("auto", "standalone"):
        os.mkdir(tmp_path / backend)
        done = run_command(*inputs, *options, f"backend={backend}", "output.json=qc.json", "output.plots=None",
                           cwd=tmp_path / backend)
        assert done.returncode == 0, done.stderr
    log = (tmp_path / "auto" / "dials.q_consistency.log").read_text()
    assert "(native backend)" in log and "DIALS (stand-in for tests)" in log
    assert "(standalone backend)" in (tmp_path / "standalone" / "dials.q_consistency.log").read_text()
    assert_same_tables(tmp_path / "auto" / "q_consistency.refl", tmp_path / "standalone" / "q_consistency.refl")
    reports = [json.loads((tmp_path / b / "qc.json").read_text()) for b in ("auto", "standalone")]
    assert reports[0]["overall"] == reports[1]["overall"]


@pytest.mark.skipif(backends.dials_importable(), reason="the real DIALS is importable: test_native_backend.py runs")
def test_native_plumbing_over_many_files_and_bad_input(shared, tmp_path):
    pairs = [("ssx_CuNiR_test_data", "indexed"), ("quartz_processed", "refined")]
    inputs = [shared(f, n + ext) for f, n in pairs for ext in (".expt", ".refl")]
    for backend in ("native", "standalone"):
        os.mkdir(tmp_path / backend)
        done = run_command(*inputs, f"backend={backend}", "nproc=2", "output.per_file_csv=files.csv",
                           cwd=tmp_path / backend)
        assert done.returncode == 0, done.stderr
    outputs = sorted(n for n in os.listdir(tmp_path / "native") if n.endswith(".refl"))
    assert len(outputs) == 2 and outputs == sorted(n for n in os.listdir(tmp_path / "standalone") if n.endswith(".refl"))
    for output in outputs:
        assert_same_tables(tmp_path / "native" / output, tmp_path / "standalone" / output)
    assert (tmp_path / "native" / "files.csv").read_bytes() == (tmp_path / "standalone" / "files.csv").read_bytes()

    done = run_command(inputs[0], inputs[1], "backend=native", "nproc=0", cwd=tmp_path / "native")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "bad parameter" in done.stderr, done.stderr

    broken = tmp_path / "broken.refl"
    broken.write_bytes(b"\x93not a table")
    os.mkdir(tmp_path / "bad")
    done = run_command(inputs[0], str(broken), "backend=native", cwd=tmp_path / "bad")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and str(broken) in done.stderr, done.stderr
    assert os.listdir(tmp_path / "bad") == []
    done = run_command("-c", "backend=native", cwd=tmp_path / "bad")
    assert done.returncode == 0 and "backend = *auto native standalone" in done.stdout  # DIALS shows the master scope
