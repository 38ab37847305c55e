"""dials.q_consistency end to end, in a subprocess as a user runs it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from dials_qconsistency.io.refl import ReflectionTable
from conftest import BACKENDS, EXAMPLES, REPO_ROOT


def run_command(*args, cwd, backend="standalone", stdin=""):
    """The program in a fresh process, with ``backend=`` given explicitly
    (None: the default, auto, which is native inside DIALS), ``stdin`` its
    standard input."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    chosen = [] if backend is None else [f"backend={backend}"]
    return subprocess.run(
        [sys.executable, "-m", "dials_qconsistency.command_line.q_consistency", *map(str, args), *chosen],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, input=stdin,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_example_runs_and_writes_columns_and_log(tmp_path, backend):
    done = run_command(os.path.join(EXAMPLES, "rotation.expt"), os.path.join(EXAMPLES, "rotation.refl"), cwd=tmp_path,
                       backend=backend)
    assert done.returncode == 0, done.stderr
    assert "Mean |delta_q|" in done.stdout
    assert done.stdout.count("Verdict: CONSISTENT to numerical precision") == 1
    assert (tmp_path / "dials.q_consistency.log").read_text().count("Mean |delta_q|") == 1
    assert "already had" not in done.stdout
    table = ReflectionTable.from_file(str(tmp_path / "q_consistency.refl"))
    assert {"q_bragg", "q_pixel", "q_pred", "delta_q", "delta_q.norm"} <= set(table.keys())
    used = np.isfinite(table.get("delta_q.norm"))
    assert used.sum() == table.nrows - 5  # the five simulated unindexed spots are NaN
    assert table.get("delta_q.norm")[used].max() < 1e-12
    # Its own output as input: the 13 columns are said to be replaced, and are, with the same values.
    again = run_command(os.path.join(EXAMPLES, "rotation.expt"), tmp_path / "q_consistency.refl",
                        "output.reflections=again.refl", cwd=tmp_path, backend=backend)
    assert again.returncode == 0, again.stderr
    assert "Note: the input already had q_bragg, q_pixel, q_pred, delta_q, delta_q.norm, delta_q.along_q" in again.stdout
    second = ReflectionTable.from_file(str(tmp_path / "again.refl"))
    assert second.keys() == table.keys()
    for name in ("q_bragg", "delta_q.norm", "delta_q.transverse"):
        assert np.array_equal(second.get(name), table.get(name), equal_nan=True)


def test_show_config_and_help(tmp_path):
    """-c as DIALS programs show it (the native backend's is compared in test_native_backend)."""
    done = run_command("-c", cwd=tmp_path)
    assert done.returncode == 0 and "model_state = *auto refinement integrate" in done.stdout
    assert done.stdout.startswith("Showing configuration parameters with:\n  attributes_level = 0\n  expert_level = 0\n")
    assert "  reflections = q_consistency.refl\n  log = dials.q_consistency.log\n" in done.stdout
    assert ".help" not in done.stdout and ".help" in run_command("-c", "-a2", cwd=tmp_path).stdout
    done = run_command("-h", cwd=tmp_path)
    assert done.returncode == 0 and "q_bragg = S . R(axis, phi) . F . A . h" in done.stdout
    assert not (tmp_path / "dials.q_consistency.log").exists()


@pytest.mark.parametrize("words, levels", [
    (["-a", "2"], (2, 0)), (["-a2"], (2, 0)), (["-e1"], (0, 1)), (["-e", "1", "-a1"], (1, 1)),
    (["--attributes-level=3"], (3, 0)), (["--expert-level", "2"], (0, 2)), (["-a=2", "-e=1"], (2, 1)),
])
def test_level_options_as_dials_parser_takes_them(words, levels):
    """-a/-e take their number joined or apart, as argparse does in DIALS."""
    from dials_qconsistency.command_line.program import parse_arguments
    from dials_qconsistency.command_line.q_consistency import phil_scope
    arguments = parse_arguments(["-c", *words], phil_scope)
    assert (arguments.levels["attributes_level"], arguments.levels["expert_level"]) == levels


@pytest.mark.parametrize("words, message", [
    (["-a"], "option -a needs a whole number"), (["-ax"], "option -a needs a whole number"),
    (["--expert-level=two"], "option --expert-level needs a whole number"), (["-x"], "unknown option '-x'"),
])
def test_level_options_refused(words, message):
    from dials_qconsistency.command_line.program import parse_arguments
    from dials_qconsistency.command_line.q_consistency import phil_scope
    from dials_qconsistency.errors import QConsistencyError
    with pytest.raises(QConsistencyError, match=message):
        parse_arguments(words, phil_scope)


@pytest.mark.parametrize("backend", BACKENDS)
def test_help_twice_shows_the_configuration_as_dials_does(tmp_path, backend):
    """-hh: the help, then the configuration (expert level 1, as DIALS' parser
    shows it for -hh); was refused as an unknown option."""
    done = run_command("-hh", cwd=tmp_path, backend=backend)
    assert done.returncode == 0, done.stderr
    assert "q_bragg = S . R(axis, phi) . F . A . h" in done.stdout
    assert "Showing configuration parameters with:\n  attributes_level = 0\n  expert_level = 1\n" in done.stdout
    assert "model_state = *auto refinement integrate" in done.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_phil_file_given_with_the_phil_option(tmp_path, backend):
    """DIALS' --phil FILE (and --phil=FILE) reads a PHIL file as a bare one is;
    was refused as an unknown option. A missing one is named."""
    (tmp_path / "choices.txt").write_text("output.json = from_phil.json\nq_pixel.source = observed\n")
    pair = os.path.join(EXAMPLES, "stills.expt"), os.path.join(EXAMPLES, "stills.refl")
    for words in (["--phil", "choices.txt"], ["--phil=choices.txt"]):
        done = run_command(*pair, *words, "output.reflections=None", cwd=tmp_path, backend=backend)
        assert done.returncode == 0, done.stderr
        assert "q_pixel from observed positions" in done.stdout and (tmp_path / "from_phil.json").exists()
        (tmp_path / "from_phil.json").unlink()
    done = run_command(*pair, "--phil", "missing.phil", cwd=tmp_path, backend=backend)
    assert done.returncode == 1 and done.stderr == "dials.q_consistency: error: missing.phil: file not found\n"
    # standard input, as DIALS' -h says: read once (the command line is parsed twice), given to DIALS' parser too
    for words in (["--phil", "-"], ["--phil=-"]):
        done = run_command(*pair, *words, "output.reflections=None", cwd=tmp_path, backend=backend,
                           stdin=open(tmp_path / "choices.txt").read())
        assert done.returncode == 0, done.stderr
        assert "q_pixel from observed positions" in done.stdout and (tmp_path / "from_phil.json").exists()
        (tmp_path / "from_phil.json").unlink()
    done = run_command(*pair, "--phil", "-", cwd=tmp_path, backend=backend, stdin="output { nosuch=1 }\n")
    assert done.returncode == 1 and done.stderr == ("dials.q_consistency: error: standard input: line 1: there is no "
                                                    "parameter 'output.nosuch' (-c -e1 lists them all)\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_from_command_line(tmp_path, backend):
    out = tmp_path / "custom.refl"
    done = run_command(
        os.path.join(EXAMPLES, "stills.expt"), os.path.join(EXAMPLES, "stills.refl"),
        f"output.reflections={out}", "q_pixel.source=observed", cwd=tmp_path, backend=backend,
    )
    assert done.returncode == 0, done.stderr
    assert out.exists() and "q_pixel from observed positions" in done.stdout


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_every_input_column_survives_unchanged(shared, tmp_path):
    """The writer copies every input column byte for byte, and the table's
    version (both backends: test_native_backend)."""
    pairs = [
        ("quartz_processed", "refined"), ("quartz_processed", "integrated"),
        ("ssx_CuNiR_test_data", "indexed"), ("ssx_CuNiR_test_data", "integrated"),
        ("centroid_test_data", "indexed"), ("dials_current", "centroid_refined"),
        ("dials_current", "cspad_stills_refined"),
    ]
    pairs = [(shared(f, n + ".expt"), shared(f, n + ".refl")) for f, n in pairs]
    pairs += [
        (shared("centroid_test_data", "experiments.json"), shared("centroid_test_data", "integrated.refl")),
        (shared("ssx_CuNiR_test_data", "imported_with_ref_5.expt"), shared("ssx_CuNiR_test_data", "strong_5.refl")),
    ]
    for expt, refl in pairs:
        before = sha(refl)
        out = tmp_path / "out.refl"
        done = run_command(expt, refl, f"output.reflections={out}", cwd=tmp_path)
        assert done.returncode == 0, (refl, done.stderr)
        source, written = ReflectionTable.from_file(refl), ReflectionTable.from_file(str(out))
        assert written.version == source.version and written.identifiers == source.identifiers
        for name in source.keys():
            assert written.column_type(name) == source.column_type(name)
            assert written.column_blob(name) == source.column_blob(name), (refl, name)
        assert sha(refl) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_format_and_unindexed_tables_say_what_they_could_not_compute(shared, tmp_path, backend):
    done = run_command(shared("centroid_test_data", "experiments.json"), shared("centroid_test_data", "integrated.refl"),
                       cwd=tmp_path, backend=backend)
    assert done.returncode == 0
    assert "parallax correction requested but mu/thickness are not set" in done.stdout
    assert "not the ones the table was made with" in done.stdout
    done = run_command(shared("ssx_CuNiR_test_data", "imported_with_ref_5.expt"), shared("ssx_CuNiR_test_data", "strong_5.refl"),
                       cwd=tmp_path, backend=backend)
    assert done.returncode == 0
    assert "no Miller index (the table is not indexed)" in done.stdout and done.stdout.count("Nothing to compare") == 1
    assert "Diagnosis" not in done.stdout and "rotation angle" not in done.stdout  # 5 stills, nothing diagnosed
    assert "Saved 759 rows with the q columns, NaN in every row (nothing to compare) to q_consistency.refl" in done.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_model_state_is_said_only_where_a_model_varies_along_its_scan(shared, tmp_path, backend):
    static = run_command(shared("dials_current", "centroid_refined.expt"), shared("dials_current", "centroid_refined.refl"),
                         "output.reflections=None", "output.html=None", cwd=tmp_path, backend=backend)
    assert "q_pixel from calculated positions; q_bragg at the calculated rotation angle\n" in static.stdout
    varying = run_command(shared("quartz_processed", "refined.expt"), shared("quartz_processed", "refined.refl"),
                          "output.reflections=None", "output.html=None", cwd=tmp_path, backend=backend)
    assert "q_bragg at the calculated rotation angle; scan-varying model state: refinement" in varying.stdout


def test_centroid_indexed_is_not_a_false_failure(shared, tmp_path):
    done = run_command(shared("centroid_test_data", "indexed.expt"), shared("centroid_test_data", "indexed.refl"), cwd=tmp_path)
    assert done.returncode == 0
    assert "s1: observed centroid" in done.stdout and "not a failure" in done.stdout


def test_no_cctbx_extension_is_imported_after_matplotlib(tmp_path):
    """The cctbx-base wheel segfaults if an extension loads after matplotlib: a real
    run of both commands (figures drawn) must map no cctbx, scitbx or boost library."""
    example = os.path.join(EXAMPLES, "rotation")
    code = (
        "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot\n"
        "from dials_qconsistency.command_line import q_consistency, q_map\n"
        f"q_consistency.run([{example + '.expt'!r}, {example + '.refl'!r}, 'backend=standalone', 'output.plots=q_consistency_'])\n"
        f"q_map.run([{example + '.expt'!r}, 'subsample=8', 'backend=standalone'])\n"
        "maps = open('/proc/self/maps').read().split()\n"
        "bad = sorted({p for p in maps if '.so' in p and 'libstdc++' not in p\n"
        "              and any(k in p for k in ('cctbx', 'scitbx', 'iotbx', 'boost'))})\n"
        "print(repr(bad))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "q_consistency_detector_norm.png" in os.listdir(tmp_path) and "q_map.h5" in os.listdir(tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_help_names_every_column_the_output_table_gains():
    """-h says what the output table holds: all 13 new columns by name (an
    earlier -h listed 5 of them)."""
    import re

    from dials_qconsistency.command_line.q_consistency import help_message
    from dials_qconsistency.report.columns import OUTPUT_COLUMNS

    words = set(re.findall(r"[\w.]*\w", help_message))  # dotted names, without a full stop after them
    assert len(OUTPUT_COLUMNS) == 13 and "13 columns" in help_message
    assert [name for name in OUTPUT_COLUMNS if name not in words] == []


@pytest.mark.parametrize("command", ["q_consistency", "q_map"])
def test_the_installed_command_ends_with_mains_status_and_its_objects_frozen(tmp_path, command):
    """console() is main() then end_process: main's status (0 for -c, 1 for a
    missing file), and the objects frozen before the interpreter's last
    collection (atexit handlers still run, and see it)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for args, status in ((["-c"], 0), (["missing.expt", "missing.refl"], 1)):
        code = ("import atexit, gc, sys; atexit.register(lambda: print('frozen:', gc.get_freeze_count() > 1000)); "
                f"sys.argv = ['dials.{command}', *{args!r}]; "
                f"from dials_qconsistency.command_line.{command} import console; console()")
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == status, done.stderr
        assert done.stdout.rstrip().endswith("frozen: True")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args", [["-c", "-a2"], [os.path.join(EXAMPLES, "stills.expt"), os.path.join(EXAMPLES, "stills.refl")]])
def test_a_closed_stdout_ends_the_console_quietly_and_the_run_goes_on(tmp_path, backend, args):
    """``dials.q_consistency ... | head -2``: once the reader has gone, nothing
    more is shown (no BrokenPipeError traceback per message), the run still
    writes its outputs and a complete log, and it ends with its own status."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "dials_qconsistency.command_line.q_consistency", *args, f"backend={backend}"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the program has printed anything: its first write meets a closed pipe
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr
    assert stderr == ""
    if "-c" not in args:
        log = (tmp_path / "dials.q_consistency.log").read_text()
        rows = ReflectionTable.from_file(os.path.join(EXAMPLES, "stills.refl")).nrows  # the input's, read here
        assert f"Saved {rows} rows with q_bragg" in log
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "dials.q_consistency.html", "dials.q_consistency.log", "q_consistency.refl"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_command_runs_blas_on_one_thread_and_gives_its_threads_back(tmp_path, monkeypatch, backend):
    """numpy's BLAS works on the calling thread while the command runs (its
    threads would compete with the program's own), and has its threads again
    after. (Inside DIALS, importing DIALS loads scipy's BLAS too: not numpy's.)"""
    from threadpoolctl import threadpool_info, threadpool_limits

    from dials_qconsistency.command_line import q_consistency

    blas_threads = lambda: {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}  # noqa: E731
    seen, check_pair = [], q_consistency.check_pair
    monkeypatch.setattr(q_consistency, "check_pair", lambda *a, **k: seen.append(blas_threads()) or check_pair(*a, **k))
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        q_consistency.run([os.path.join(EXAMPLES, "rotation.expt"), os.path.join(EXAMPLES, "rotation.refl"),
                           f"output.reflections={tmp_path / 'out.refl'}", f"output.log={tmp_path / 'out.log'}",
                           "output.html=None", f"backend={backend}"])
        after = blas_threads()
    numpys = [path for path in before if "openblas" in os.path.basename(path)]
    assert numpys and all(before[path] == after[path] == 2 for path in before)
    assert len(seen) == 1 and all(seen[0][path] == 1 for path in before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_of_flight_parts_an_earlier_run_left_are_removed_not_kept_stale(tmp_path, backend):
    """A table carrying the time-of-flight parts of an earlier run (on
    polychromatic data), run on monochromatic data: the output has no such
    columns (these data give none), and the note says they were removed."""
    from dials_qconsistency.report.columns import OUTPUT_TYPES

    table = ReflectionTable.from_file(os.path.join(EXAMPLES, "rotation.refl"))
    for name in ("delta_q.wavelength_rel", "delta_q.tof.us"):
        table.set_column(name, "double", np.full(table.nrows, 7.0))
    table.write(str(tmp_path / "stale.refl"))
    done = run_command(os.path.join(EXAMPLES, "rotation.expt"), tmp_path / "stale.refl", cwd=tmp_path, backend=backend)
    assert done.returncode == 0, done.stderr
    assert ("Note: the input already had delta_q.wavelength_rel, delta_q.tof.us: removed (no polychromatic rows, "
            "so no time-of-flight parts)") in done.stdout
    output = ReflectionTable.from_file(str(tmp_path / "q_consistency.refl"))
    stale = {"delta_q.wavelength_rel", "delta_q.tof.us"}
    assert set(output.keys()) == (set(table.keys()) - stale) | set(OUTPUT_TYPES)
    assert output.nrows == table.nrows
