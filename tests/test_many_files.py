"""Runs over many pairs: pairing, exact merged statistics, per-file tables, CSV,
parallel processes and MPI ranks giving the serial result exactly."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from conftest import REAL_PAIRS, REPO_ROOT, run_core
from dials_qconsistency.core.row_statistics import norm_statistics
from dials_qconsistency.batch.campaign import FileJob, process_file
from dials_qconsistency.command_line.q_consistency import main
from dials_qconsistency.core.pipeline import PairSettings
from dials_qconsistency.core.q_vectors import Options, REASONS
from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.io.pairing import output_table_names, pair_files
from dials_qconsistency.batch.progress import Progress

REAL = REAL_PAIRS


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def real_inputs(shared, tmp_path):
    """The real pairs linked into one folder as pair_<k>.expt/.refl (names that pair)."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    pairs = []
    for k, (sub, name) in enumerate(REAL):
        for ext in (".expt", ".refl"):
            os.symlink(shared(sub, name + ext), folder / f"pair_{k}{ext}")
        pairs.append((str(folder / f"pair_{k}.expt"), str(folder / f"pair_{k}.refl")))
    return pairs


# --- pairing and names ----------------------------------------------------------------------


def test_pairing_by_name_by_order_and_the_errors():
    expts = ["a/x.expt", "a/y.expt"]
    assert pair_files(expts, ["a/y.refl", "a/x.refl"]) == [("a/y.expt", "a/y.refl"), ("a/x.expt", "a/x.refl")]
    # names that do not match: auto falls back to the order given, name refuses
    assert pair_files(["r.expt", "s.expt"], ["i.refl", "j.refl"]) == [("r.expt", "i.refl"), ("s.expt", "j.refl")]
    with pytest.raises(QConsistencyError, match="i.refl: has no experiment list of the same name"):
        pair_files(["r.expt", "s.expt"], ["i.refl", "j.refl"], "name")
    assert pair_files(expts, ["a/y.refl", "a/x.refl"], "order") == [("a/x.expt", "a/y.refl"), ("a/y.expt", "a/x.refl")]
    with pytest.raises(QConsistencyError, match="cannot pair 2 experiment lists with 3 reflection tables"):
        pair_files(expts, ["1.refl", "2.refl", "3.refl"])


def test_output_names_keep_run_folders_apart():
    names = output_table_names(["/d/run1/indexed.refl", "/d/run2/indexed.refl", "/d/run2/sub/x.refl"], "out/qc.refl")
    assert names == ["out/run1_indexed_qc.refl", "out/run2_indexed_qc.refl", "out/run2_sub_x_qc.refl"]


# --- exact merge on the real files ---------------------------------------------------------------


def test_merged_statistics_are_those_of_every_file_concatenated(real_inputs, tmp_path, monkeypatch):
    """Every number of the merged summary, per file and per image, recomputed from
    single-pair runs of the core (independent of the multi-file code)."""
    monkeypatch.chdir(tmp_path)
    args = [f"{tmp_path}/inputs/pair_*.expt", f"{tmp_path}/inputs/pair_*.refl"]
    assert main(args + ["output.json=all.json", "output.per_image_csv=images.csv", "output.per_file_csv=files.csv",
                        "output.plots=None", "backend=standalone",  # run_core reads as the standalone backend
                        "rows=indexed"]) == 0  # every indexed row, as run_core gives them
    report = json.load(open("all.json"))
    log = open("dials.q_consistency.log").read()
    assert "largest mean |delta_q| (every file: the log, the HTML report, the JSON, the CSV):" in log
    assert main(args + ["output.plots=None", "output.html=None", "output.log=bare.log", "output.reflections=None",
                        "backend=standalone"]) == 0  # no CSV asked for: none named (it said "the log and the CSV")
    assert "largest mean |delta_q| (every file: the log):" in open("bare.log").read()
    norms, counts = [], dict.fromkeys(REASONS, 0)
    expected_images = []
    for k, (expt, refl) in enumerate(real_inputs):
        experiments, table, columns, result = run_core(expt, refl)
        used = np.linalg.norm(result.delta_q, axis=1)[result.used]
        norms.append(used)
        record = report["files"][k]
        assert record["reflections"] == refl and record["rows"] == table.nrows
        assert record["delta_q"] == norm_statistics(used)
        for code, reason in enumerate(REASONS):
            counts[reason] += int(np.sum(result.reason == code))
        # per image: the image φ falls in (rotation) or the experiment (stills), by a loop here
        for index in np.unique(result.experiment[result.used]):
            model = experiments[int(index)]
            rows = result.used & (result.experiment == index)
            if model.is_rotation:
                start, width = model.scan.oscillation
                image = model.scan.image_range[0] + np.clip(
                    np.floor((result.phi[rows] - start) / width), 0, model.scan.num_images - 1).astype(int)
            else:
                image = np.full(int(rows.sum()), -1)
            values = np.linalg.norm(result.delta_q[rows], axis=1)
            for number in np.unique(image):
                expected_images.append((k, int(index), None if number < 0 else int(number),
                                        norm_statistics(values[image == number])))
    merged = np.concatenate(norms)
    assert report["merged"]["delta_q"] == norm_statistics(merged)  # exact: same floats
    assert report["merged"]["counts"] == counts and report["merged"]["files"] == len(REAL)
    assert report["merged"]["delta_q"]["n"] == sum(n.size for n in norms) > 9000

    images = report["images"]
    assert len(images) == len(expected_images)
    for got, (k, index, number, stats) in zip(images, expected_images):
        assert (got["file"], got["experiment"], got["image"]) == (k, index, number)
        for name in ("n", "median", "p95", "max"):
            assert got[name] == stats[name], (got, stats)
        for name in ("mean", "rms"):
            assert got[name] == pytest.approx(stats[name], rel=1e-14)
    rows = list(csv.DictReader(open("images.csv")))
    assert len(rows) == len(images) and float(rows[3]["delta_q_p95"]) == images[3]["p95"]
    files = list(csv.DictReader(open("files.csv")))
    assert [int(r["rows"]) for r in files] == [f["rows"] for f in report["files"]]
    assert float(files[5]["delta_q_median"]) == report["files"][5]["delta_q"]["median"]

    # one table per input, byte-identical to the table of a single-pair run
    for k, (expt, refl) in enumerate(real_inputs):
        single = tmp_path / f"single_{k}.refl"
        assert main([expt, refl, f"output.reflections={single}", "output.plots=None", "output.log=None",
                     "backend=standalone", "rows=indexed"]) == 0
        assert sha(single) == sha(tmp_path / f"pair_{k}_q_consistency.refl")


def run_console(args, cwd, mpi_ranks=None):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    command = [sys.executable, "-m", "dials_qconsistency.command_line.q_consistency", *map(str, args), "backend=standalone"]
    if mpi_ranks:
        command = [shutil.which("mpirun"), "-n", str(mpi_ranks)] + command
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


OUTPUTS = ["report.json", "files.csv", "images.csv"] + [f"pair_{k}_q_consistency.refl" for k in range(len(REAL))]
SUMMARY_ARGS = ["output.json=report.json", "output.per_file_csv=files.csv", "output.per_image_csv=images.csv"]


def same_outputs(a, b):
    for name in OUTPUTS:
        assert sha(os.path.join(a, name)) == sha(os.path.join(b, name)), name


def test_two_processes_give_the_serial_result_exactly(real_inputs, tmp_path):
    inputs = [p for pair in real_inputs for p in pair]
    for name, extra in (("serial", []), ("nproc2", ["nproc=2"])):
        os.mkdir(tmp_path / name)
        done = run_console(inputs + SUMMARY_ARGS + extra, tmp_path / name)
        assert done.returncode == 0, done.stderr
    same_outputs(tmp_path / "serial", tmp_path / "nproc2")
    assert "7 pairs of files, 2 process(es)" in (tmp_path / "nproc2" / "dials.q_consistency.log").read_text()


def _mpi_missing():
    if not shutil.which("mpirun"):
        return "no mpirun (apt install openmpi-bin; .ci/run installs it)"
    try:
        import mpi4py.MPI  # noqa: F401
    except Exception as error:  # ImportError, or no MPI library behind the wheel
        return f"mpi4py cannot start MPI here ({error})"
    return None


def test_two_mpi_ranks_give_the_serial_result_exactly(real_inputs, tmp_path):
    reason = _mpi_missing()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the MPI test: {reason}")
    if reason:
        pytest.skip(reason)
    inputs = [p for pair in real_inputs for p in pair]
    os.mkdir(tmp_path / "serial")
    os.mkdir(tmp_path / "mpi")
    assert run_console(inputs + SUMMARY_ARGS, tmp_path / "serial").returncode == 0
    done = run_console(inputs + SUMMARY_ARGS + ["mp.method=mpi"], tmp_path / "mpi", mpi_ranks=2)
    assert done.returncode == 0, done.stderr + done.stdout
    same_outputs(tmp_path / "serial", tmp_path / "mpi")
    log = (tmp_path / "mpi" / "dials.q_consistency.log").read_text()
    assert "7 pairs of files, 2 MPI ranks" in log and log.count("Files: 7;") == 1  # rank 0 alone writes
    assert done.stdout.count("Files: 7;") == 1


# --- failures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["nproc=2"]])
def test_one_bad_file_fails_the_run_and_leaves_nothing(real_inputs, tmp_path, extra):
    bad = tmp_path / "inputs" / "pair_3.refl"
    os.unlink(bad)
    bad.write_bytes(b"\x93\x01")  # a truncated table
    run = tmp_path / "run"
    run.mkdir()
    done = run_console([p for pair in real_inputs for p in pair] + SUMMARY_ARGS + extra, run)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert str(bad) in done.stderr and "Traceback" not in done.stderr
    assert os.listdir(run) == ["dials.q_consistency.log"]  # no table, no summary, no temporary file


def test_ctrl_c_before_the_merge_leaves_the_log_saying_so(real_inputs, tmp_path, monkeypatch, capsys):
    """Interrupted after every file was computed: no table, no summary, and the
    log's last line says none of the outputs was written."""
    from dials_qconsistency.command_line import many

    def interrupted(outcomes):
        raise KeyboardInterrupt

    monkeypatch.setattr(many, "merge", interrupted)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    assert main([p for pair in real_inputs for p in pair] + SUMMARY_ARGS) == 130
    assert capsys.readouterr().err.endswith("dials.q_consistency: interrupted (outputs are all written or none)\n")
    assert os.listdir(run) == ["dials.q_consistency.log"]  # no table, no summary, no temporary file
    assert (run / "dials.q_consistency.log").read_text().endswith(
        "\nInterrupted by Ctrl-C (SIGINT): none of the outputs was written (files of their names are an earlier "
        "run's, not this log's)\n")


def test_a_pattern_that_matches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["nothing_*.expt", "nothing_*.refl", "backend=standalone"]) == 1
    assert "nothing_*.expt: no file matches this pattern" in capsys.readouterr().err


# --- memory: one table at a time ----------------------------------------------------------------------


def test_memory_is_that_of_one_file_not_all_of_them(shared, tmp_path):
    """numpy's buffers are traced: processing eight files one after another peaks
    where one file does, because only the |Δq| values (8 bytes a row) are kept."""
    expt, refl = shared("ssx_CuNiR_test_data", "integrated.expt"), shared("ssx_CuNiR_test_data", "integrated.refl")
    options = Options()

    def peak(n_files):
        tracemalloc.start()
        try:
            kept = [process_file(FileJob(i, expt, refl, str(tmp_path / f"o{i}.refl"), options, ".tmp-test-",
                                         settings=PairSettings("indexed", diagnose=False))) for i in range(n_files)]
            for outcome in kept:
                os.unlink(outcome.staged)
            return tracemalloc.get_traced_memory()[1], kept
        finally:
            tracemalloc.stop()

    one, _ = peak(1)
    eight, kept = peak(8)
    assert eight < one * 1.15 + 8 * 5203 * 8, (one, eight)
    assert all(o.norms.size == 5203 for o in kept)


# --- the progress bar ---------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_bar_only_on_a_terminal_and_only_after_two_seconds():
    now = [0.0]
    terminal = FakeTerminal(True)
    bar = Progress(4, stream=terminal, clock=lambda: now[0])
    bar.update(1, 1000)  # at 0 s: too early to show
    assert terminal.getvalue() == ""
    now[0] = 2.5
    bar.update(1, 1000)
    assert "\r[###############...............] 2/4 files, 0.00 M reflections, 2s elapsed, 2s left" in terminal.getvalue()
    bar.close()
    assert terminal.getvalue().endswith("\r\033[K")

    pipe = FakeTerminal(False)
    quiet = Progress(4, stream=pipe, clock=lambda: now[0])
    now[0] = 100.0
    quiet.update(4, 10)
    quiet.close()
    assert pipe.getvalue() == ""


def test_the_same_table_given_twice_is_refused_before_anything_is_written(real_inputs, tmp_path, capsys, monkeypatch):
    """Two inputs that would write one output table: a one-line error, nothing written."""
    monkeypatch.chdir(tmp_path)
    expt, refl = real_inputs[0]
    assert main([expt, refl, expt, refl, "input.pairing=order", "backend=standalone"]) == 1
    err = capsys.readouterr().err
    assert "name the same file" in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["inputs"]


def test_each_file_is_about_the_rows_its_refinement_used(shared, tmp_path, monkeypatch):
    """By default a file's statistics are over its rows flagged used_in_refinement
    (counted here from the flags), the other used rows are outliers."""
    from dials_qconsistency.io.refl import ReflectionTable

    pairs = [("ssx_CuNiR_test_data", "integrated"), ("dials_current", "centroid_refined")]
    inputs = [shared(f, n + ext) for f, n in pairs for ext in (".expt", ".refl")]
    monkeypatch.chdir(tmp_path)
    assert main(inputs + ["output.json=all.json", "output.reflections=None", "backend=standalone"]) == 0
    report = json.load(open("all.json"))
    for record, (folder, name) in zip(report["files"], pairs):
        table = ReflectionTable.from_file(shared(folder, name + ".refl"))
        flagged = (table.get("flags") & 8) != 0
        predicted = np.any(table.get("xyzcal.mm")[:, :2] != 0, axis=1)
        expected = int(np.count_nonzero(flagged & (table.get("id") >= 0) & predicted))
        assert record["delta_q"]["n"] == expected
        assert record["counts"]["indexed, not used in refinement"] > 0
    assert [r["delta_q"]["n"] for r in report["files"]] == [298, 408]


def test_a_file_marked_inconsistent_is_said_with_its_reason(real_inputs, tmp_path, monkeypatch):
    """One pair's detector moved 1 mm among the real pairs: the log's table of
    files and the HTML mark it, the log lists it with its first reason, and so
    do the CSV and the JSON (a column and a key); the CSV's not_used is the
    log's "indexed, not used in refinement", other the rest of the rows."""
    moved = tmp_path / "moved"
    moved.mkdir()
    document = json.load(open(real_inputs[0][0]))
    for detector in document["detector"]:
        node = detector.get("hierarchy") or detector["panels"][0]
        node["origin"][0] += 1.0
    (moved / "pair_0.expt").write_text(json.dumps(document))
    os.symlink(real_inputs[0][1], moved / "pair_0.refl")
    monkeypatch.chdir(tmp_path)
    status = main([str(moved / "pair_0.expt"), *[p[0] for p in real_inputs[1:]], str(moved / "pair_0.refl"),
                   *[p[1] for p in real_inputs[1:]], "output.reflections=None", "output.per_file_csv=files.csv",
                   "output.json=qc.json"])
    assert status == 0
    log = (tmp_path / "dials.q_consistency.log").read_text()
    rows = list(csv.DictReader(open(tmp_path / "files.csv")))
    files = json.load(open(tmp_path / "qc.json"))["files"]
    bad = [row for row in rows if row["verdict"] == "inconsistent"]
    assert [row["reflections"] for row in bad] == [str(moved / "pair_0.refl")]
    assert bad[0]["reason"].startswith("the table's s1 matches neither spot position") and files[0]["reason"] == bad[0]["reason"]
    assert f"  {moved / 'pair_0.refl'}: {bad[0]['reason']}" in log
    assert all(row["reason"] == "" for row in rows if row["verdict"] == "consistent")
    for row, record in zip(rows, files):
        assert int(row["not_used"]) == record["counts"][REASONS[-1]]
        assert int(row["used"]) + int(row["not_used"]) + int(row["other"]) == int(row["rows"])
    assert "<td>inconsistent</td>" in (tmp_path / "dials.q_consistency.html").read_text()


def test_a_file_paired_by_order_names_its_partner_in_the_error(shared, tmp_path, capsys, monkeypatch):
    """Names that do not pair are paired by the order given: a table read with
    the wrong experiment list says which one, and how it was chosen."""
    for name, target in (("a.expt", shared("ssx_CuNiR_test_data", "indexed.expt")),
                         ("b.expt", shared("dials_current", "cspad_stills_refined.expt")),
                         ("c.refl", shared("dials_current", "cspad_stills_refined.refl")),
                         ("d.refl", shared("ssx_CuNiR_test_data", "indexed.refl"))):
        os.symlink(target, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert main(["a.expt", "b.expt", "c.refl", "d.refl", "output.reflections=None"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "c.refl: id 9 is beyond the 5 experiment(s) in the experiment list (paired by the order given with a.expt)")


def test_a_run_over_stills_names_no_rotation_angle(shared, tmp_path, monkeypatch):
    """Stills only: the choices name the positions, not a rotation angle or a
    scan-varying model state (which apply to rotation data)."""
    for k in (1, 2):
        for ext in (".expt", ".refl"):
            os.symlink(shared("ssx_CuNiR_test_data", "indexed" + ext), tmp_path / f"p{k}{ext}")
    monkeypatch.chdir(tmp_path)
    assert main(["p1.expt", "p2.expt", "p1.refl", "p2.refl", "output.reflections=None"]) == 0
    log = (tmp_path / "dials.q_consistency.log").read_text()
    assert "\nq_pixel from calculated positions\n" in log and "rotation angle" not in log
