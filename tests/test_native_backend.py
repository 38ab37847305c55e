"""The native backend against the standalone one, with the real DIALS.

Every test here is marked ``dials``: it runs in the DIALS environment
(README.rst: the third command) and is deselected in the plain one. What is
checked: the dxtbx models give the same geometry as the standalone reader,
dxtbx's own pixel -> mm mapping gives the same millimetres, both backends give
the same q to 1e-12 1/Angstrom on every shared real pair, both write tables
DIALS reads with every input column kept, the command runs as a native DIALS
program (DIALS' parser and logging) with the standalone program's
outputs, over many files too, and dials.q_map gives the same maps.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from dials_qconsistency.io import backends
from dials_qconsistency.report.columns import OUTPUT_TYPES
from conftest import REAL_PAIRS, REPO_ROOT

pytestmark = pytest.mark.dials

TOLERANCE = 1e-12  # 1/Angstrom


def both(shared, folder, name, **options):
    """(standalone, native) results of the numpy core for one real pair."""
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.core.decomposition import decompose

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
    # a model the experiments share is one model on both sides (the native side
    # made one copy per experiment: 300 stills' 64-panel detector 300 times)
    for kind in ("beam", "detector", "goniometer", "scan", "crystal"):
        assert [len({id(getattr(e, kind)) for e in side}) for side in (mine, theirs)] == [
            len({id(getattr(e, kind)) for e in mine})] * 2, kind


@pytest.mark.parametrize("folder, name", REAL_PAIRS)
def test_dxtbx_pixel_mapping_equals_the_numpy_one(shared, folder, name):
    from dials_qconsistency.core.panels import panel_pixel_to_millimetre

    (mine, my_table, *_), (theirs, *_) = both(shared, folder, name)
    columns = my_table.columns()
    if "xyzobs.px.value" not in columns:
        pytest.skip("no xyzobs.px.value in this table")
    ids = columns["id"]
    for index, (a, b) in enumerate(zip(mine, theirs)):
        rows = ids == index
        panels = columns["panel"][rows].astype(np.int64)
        xy = columns["xyzobs.px.value"][rows, :2]
        assert_close(panel_pixel_to_millimetre(a.detector, panels, xy), panel_pixel_to_millimetre(b.detector, panels, xy), 1e-9)


def run_command(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "dials_qconsistency.command_line.q_consistency", *args],
        cwd=cwd, env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True, text=True,
    )


@pytest.mark.parametrize("folder, name", REAL_PAIRS)
def test_dials_reads_what_either_backend_wrote(shared, tmp_path, folder, name):
    from dials.array_family import flex

    from dials_qconsistency.io.refl import ReflectionTable

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


def test_both_backends_show_the_same_configuration(tmp_path):
    """-c (with DIALS' -a and -e) prints the same text whichever parser reads it."""
    for levels in ([], ["-a", "1", "-e", "2"]):
        shown = [run_command("-c", *levels, f"backend={backend}", cwd=tmp_path) for backend in ("native", "standalone")]
        assert all(done.returncode == 0 for done in shown)
        assert shown[0].stdout == shown[1].stdout
        assert shown[0].stdout.startswith("Showing configuration parameters with:")
    assert os.listdir(tmp_path) == []


def decoded_columns(path):
    """Every column of a table as DIALS decodes it: numpy arrays where flumpy can, lists otherwise."""
    from dials.array_family import flex
    from dxtbx import flumpy

    table = flex.reflection_table.from_file(str(path))
    columns = {}
    for key in table.keys():
        if key == "shoebox":
            columns[key] = table[key].size()
            continue
        try:
            columns[key] = flumpy.to_numpy(table[key])
        except (TypeError, ValueError, RuntimeError):
            columns[key] = list(table[key])
    return columns


#: Columns the program computes: equal between the backends to the geometry's
#: tolerance, 1e-12 1/Angstrom or radian, 1e-9 mm.
COMPUTED = {name: 1e-9 if name.endswith(".mm") else TOLERANCE for name in OUTPUT_TYPES}


@pytest.mark.parametrize("folder, name, options", [
    ("dials_current", "cspad_stills_refined", ["q_pixel.source=observed_px"]),
    ("quartz_processed", "refined", ["q_pixel.source=observed_px", "phi=observed"]),
    ("ssx_CuNiR_test_data", "integrated", []),
    ("dials_current", "centroid_refined", ["q_pixel.source=observed", "phi=observed"]),
])
def test_the_native_program_gives_the_standalone_outputs(shared, tmp_path, folder, name, options):
    """DIALS' parser reads the command line, dxtbx the models, DIALS the table,
    DIALS' logging writes the log: the same columns and
    report as the standalone program."""
    inputs = [shared(folder, name + ".expt"), shared(folder, name + ".refl")]
    for backend in ("auto", "standalone"):
        os.mkdir(tmp_path / backend)
        done = run_command(*inputs, *options, f"backend={backend}", "output.json=qc.json", "output.plots=None",
                           cwd=tmp_path / backend)
        assert done.returncode == 0, done.stderr
    from dials.util.version import dials_version

    log = (tmp_path / "auto" / "dials.q_consistency.log").read_text()
    assert "dials.q_consistency 0.1.0 (native backend)" in log and f"\n{dials_version()}\n" in log
    assert "(standalone backend)" in (tmp_path / "standalone" / "dials.q_consistency.log").read_text()
    native, standalone = (decoded_columns(tmp_path / b / "q_consistency.refl") for b in ("auto", "standalone"))
    assert sorted(native) == sorted(standalone)
    for key in native:
        if key in COMPUTED:
            assert_close(native[key], standalone[key], COMPUTED[key])
        elif isinstance(native[key], np.ndarray):
            np.testing.assert_array_equal(native[key], standalone[key], err_msg=key)
        else:
            assert native[key] == standalone[key], key
    reports = [json.loads((tmp_path / b / "qc.json").read_text()) for b in ("auto", "standalone")]
    for key in ("n", "median", "mean", "rms", "p95", "max"):
        assert reports[0]["overall"]["delta_q"][key] == pytest.approx(reports[1]["overall"]["delta_q"][key], rel=1e-9, abs=1e-15)
    # The fits too: the last bits that differ between the backends' models must
    # not send a fit elsewhere (a turn about the rotation axis, which the spots
    # cannot see with observed phi, once fitted 83.8 deg on one and 10.2 on the other).
    for native_scope, standalone_scope in zip(reports[0]["diagnosis"], reports[1]["diagnosis"]):
        assert [f["mistake"] for f in native_scope["findings"]] == [f["mistake"] for f in standalone_scope["findings"]]
        assert sorted(native_scope["fits"]) == sorted(standalone_scope["fits"])
        for key, fit in native_scope["fits"].items():
            other = standalone_scope["fits"][key]
            for field, tolerance in (("rms_before", 1e-12), ("rms_after", 1e-12), ("angle_deg", 1e-6)):
                # 1/Angstrom; degrees, far below the 0.005 deg a turn must have to be named (a turn
                # fitted to a residual of rounding differs by 2e-8 deg between the backends)
                if field in fit:
                    assert fit[field] == pytest.approx(other[field], rel=1e-6, abs=tolerance), (key, field)


def test_the_native_program_over_many_files_and_bad_input(shared, tmp_path):
    pairs = [("ssx_CuNiR_test_data", "indexed"), ("quartz_processed", "refined")]
    inputs = [shared(f, n + ext) for f, n in pairs for ext in (".expt", ".refl")]
    for backend in ("native", "standalone"):
        os.mkdir(tmp_path / backend)
        done = run_command(*inputs, f"backend={backend}", "nproc=2", "output.per_file_csv=files.csv",
                           "output.plots=None", cwd=tmp_path / backend)
        assert done.returncode == 0, done.stderr
    outputs = sorted(n for n in os.listdir(tmp_path / "native") if n.endswith(".refl"))
    assert len(outputs) == 2 and outputs == sorted(n for n in os.listdir(tmp_path / "standalone") if n.endswith(".refl"))
    for output in outputs:
        native, standalone = (decoded_columns(tmp_path / b / output) for b in ("native", "standalone"))
        for key, tolerance in COMPUTED.items():
            assert_close(native[key], standalone[key], tolerance)
    rows = [(tmp_path / b / "files.csv").read_text().splitlines() for b in ("native", "standalone")]
    assert len(rows[0]) == len(rows[1]) == 3 and rows[0][0] == rows[1][0]

    done = run_command(inputs[0], inputs[1], "backend=native", "nproc=0", cwd=tmp_path / "native")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "bad parameter" in done.stderr, done.stderr


def test_a_pickled_table_is_read_by_dials_and_said(shared, tmp_path):
    """The one format difference: DIALS still reads pickled tables (older DIALS);
    the native backend reads one and says so, the standalone one says how to convert it."""
    from dials.array_family import flex

    expt = shared("quartz_processed", "refined.expt")
    pickled = tmp_path / "old.refl"
    flex.reflection_table.from_file(shared("quartz_processed", "refined.refl")).as_pickle(str(pickled))
    assert pickled.read_bytes()[:1] == pickle.PROTO
    os.mkdir(tmp_path / "native")
    done = run_command(expt, str(pickled), "backend=native", "output.plots=None", cwd=tmp_path / "native")
    assert done.returncode == 0, done.stderr
    assert f"{pickled} is a Python pickle (older DIALS), read by DIALS" in done.stdout
    reference = run_command(expt, shared("quartz_processed", "refined.refl"), "backend=native", "output.plots=None",
                            "output.reflections=reference.refl", cwd=tmp_path / "native")
    assert reference.returncode == 0, reference.stderr
    a, b = (decoded_columns(tmp_path / "native" / n) for n in ("q_consistency.refl", "reference.refl"))
    np.testing.assert_array_equal(a["delta_q"], b["delta_q"])
    os.mkdir(tmp_path / "standalone")
    done = run_command(expt, str(pickled), "backend=standalone", cwd=tmp_path / "standalone")
    assert done.returncode == 1 and "is a Python pickle" in done.stderr and "convert it with DIALS" in done.stderr
    assert os.listdir(tmp_path / "standalone") == []


def test_the_native_backend_writes_msgpack_tables_as_the_standalone_one(shared, tmp_path):
    """A msgpack input is written by the package's writer on both backends
    (README: Backends): every input column byte for byte, the table's version
    (1 here) and identifiers kept, the new columns equal to 1e-12; DIALS reads
    the output back with the same values. A pickled input, which only DIALS
    reads, is written by DIALS' as_file as version 2."""
    from dials.array_family import flex
    from dxtbx import flumpy

    from dials_qconsistency.io.refl import ReflectionTable

    source_path = shared("quartz_processed", "refined.refl")
    source = ReflectionTable.from_file(source_path)
    assert source.version == 1
    written = {}
    for backend in ("native", "standalone"):
        out = tmp_path / f"{backend}.refl"
        done = run_command(shared("quartz_processed", "refined.expt"), source_path, f"backend={backend}",
                           f"output.reflections={out}", "output.plots=None", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        written[backend] = ReflectionTable.from_file(str(out))
    native, standalone = written["native"], written["standalone"]
    assert native.version == 1 and native.identifiers == source.identifiers
    assert native.keys() == standalone.keys() and len(native.keys()) == len(source.keys()) + len(OUTPUT_TYPES)
    for name in source.keys():
        assert native.column_blob(name) == source.column_blob(name), name
    for name in OUTPUT_TYPES:
        assert_close(native.get(name), standalone.get(name), COMPUTED[name])
    read_back = flex.reflection_table.from_file(str(tmp_path / "native.refl"))
    np.testing.assert_array_equal(flumpy.to_numpy(read_back["delta_q"]), native.get("delta_q"))
    np.testing.assert_array_equal(flumpy.to_numpy(read_back["miller_index"]), source.get("miller_index"))

    pickled, out = tmp_path / "old.refl", tmp_path / "from_pickle.refl"
    flex.reflection_table.from_file(source_path).as_pickle(str(pickled))
    done = run_command(shared("quartz_processed", "refined.expt"), str(pickled), "backend=native",
                       f"output.reflections={out}", "output.plots=None", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert ReflectionTable.from_file(str(out)).version == 2


def test_q_map_is_a_native_program_with_the_same_maps(shared, tmp_path):
    """dials.q_map through DIALS' parser and dxtbx's models and px -> mm
    mapping (parallax-corrected CuNiR panel; 64 CSPAD panels): the same maps."""
    import h5py

    for folder, name in (("ssx_CuNiR_test_data", "indexed"), ("dials_current", "cspad_stills_refined")):
        maps = {}
        for backend in ("native", "standalone"):
            out = tmp_path / f"{name}_{backend}.h5"
            done = subprocess.run(
                [sys.executable, "-m", "dials_qconsistency.command_line.q_map", shared(folder, name + ".expt"),
                 f"backend={backend}", "subsample=16", "precision=float64", "experiments=0", f"output.hdf5={out}",
                 f"output.log={tmp_path / (backend + '.log')}"],
                cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True, text=True,
            )
            assert done.returncode == 0, done.stderr
            with h5py.File(out, "r") as handle:
                group = handle["experiment_0"]
                maps[backend] = {f"{p}/{k}": group[p][k][()] for p in group for k in ("q", "two_theta")}
        assert "(native backend)" in (tmp_path / "native.log").read_text()
        assert sorted(maps["native"]) == sorted(maps["standalone"]) and len(maps["native"]) >= 2
        for key in maps["native"]:
            tolerance = 1e-12 if key.endswith("/q") else 1e-9  # 1/Angstrom; degrees
            assert np.max(np.abs(maps["native"][key] - maps["standalone"][key])) <= tolerance, key
