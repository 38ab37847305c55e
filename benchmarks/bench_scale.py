"""Benchmark dials.q_consistency at scale: 1M and 10M reflections, 8 files over MPI.

    pip install ".[benchmark]"        # mpi4py; and apt install openmpi-bin for MPI
    python benchmarks/bench_scale.py [--sizes 1e6 1e7] [--folder /tmp/qc-bench] [--json out.json]

Synthetic tables (``synthetic_data.py``: a simulated sweep's exact predictions
repeated, with the ~30 columns of an integrated table) are written once into
``--folder``. Every measurement then runs in a fresh process, so its peak
resident memory (``VmHWM``) is its own; the page cache is warm (the files
were just written), as when a pipeline reads what the step before it wrote.

* ``I/O floor``      read the table and write it back, computing nothing
* ``I/O floor of the output``: the same with the command's 13 new columns
  (zeros): the bytes the command must write, without computing them
* ``read``, ``compute``, ``write``: the stages of one run, timed inside it
  (compute = the q vectors, their decomposition, the statistics, the new columns)
* ``end-to-end``     the whole command (``output.plots=None``), process start to exit;
  the floors and the command are run ``--repeat`` times, alternating, and the
  best of each is shown
* ``end-to-end, detector 2 mm off``: the same table against a copy of its
  ``.expt`` whose detector is moved 2 mm across the beam (once): the diagnosis
  fits its candidates (on at most ``diagnosis.max_reflections`` rows)
* ``per-reflection loop``: the same formulas one reflection at a time through the
  models, as ad-hoc scripts do; timed on a subset and scaled to the table
* ``same formulas, vectorised``: q_bragg, q_pixel and |Δq| through the functions
  compute_q uses, without its checks and self-tests; the first of three calls
  (which also pays for fresh memory pages) and the best (the throughput)
* ``stills batch``   one pair of 10,000 stills experiments (``synthetic_data.py --stills``),
  end to end: the cost of thousands of experiments in one table
* ``MPI``            8 files with 1 and with 2 ranks (``mpirun``), end to end; with
  ``mp.nthreads=Auto`` and
  with ``mp.nthreads=1`` (OpenMPI binds each rank to one core either way)

* ``300 stills``    one pair of 300 refined CSPAD stills (the real 10-still pair 30 times),
  end to end with its PNG figures and the HTML report
* ``campaign``      500 small pairs (links to the real 64-panel CSPAD stills pair), ``nproc=2``,
  and where one file's time goes

The command's processes end as the installed command does (``program.end_process``:
its objects frozen, no last garbage collection over them all, 0.3 s once DIALS'
modules are imported); the floors' processes end as any Python script's, DIALS'
own from_file + as_file included. ``in the work itself`` (native rows) is the
command's own time inside the process, imports of DIALS included.

Targets (issue 19): end-to-end <= 1.5 x the I/O floor of the output at 1M rows and
<= 1.3 x at 10M; 10M peak RSS <= 2 GB; >= 100 x the loop; the 500 small pairs in
half of 10.9 s. Inside DIALS (issue 16): the native backend <= 1.3 x the DIALS
floor's time and <= 1.25 x its peak. The MPI speed-up (2 ranks against 1) is
printed beside the 1.7 x of issue 7.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def _peak_mb():
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux keeps
    that high-water mark across exec, so a child would inherit its parent's."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- measurements, each run in its own process -------------------------------------------------


def io_floor(expt, refl, out):
    from dials_qconsistency.io.refl import ReflectionTable

    start = time.perf_counter()
    table = ReflectionTable.from_file(refl)
    table.write(out)
    return {"seconds": time.perf_counter() - start, "rows": table.nrows}


def io_floor_output(expt, refl, out):
    """The I/O floor of the output: read the table and write it back with the
    command's new columns (zeros, nothing computed), so the same bytes."""
    from dials_qconsistency.report.columns import OUTPUT_TYPES
    from dials_qconsistency.io.refl import ReflectionTable
    from dials_qconsistency.io.refl_format import row_bytes

    start = time.perf_counter()
    table = ReflectionTable.from_file(refl)
    for name, type_name in OUTPUT_TYPES.items():
        width = row_bytes(type_name) // 8
        table.set_column(name, type_name, np.zeros((table.nrows, width) if width > 1 else table.nrows))
    table.write(out)
    return {"seconds": time.perf_counter() - start, "rows": table.nrows, "bytes": os.path.getsize(out)}


def stages(expt, refl, out):
    """Read, compute and write timed separately, the way the command does them."""
    from dials_qconsistency.core.statistics import summarise
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.io.expt import read_experiments
    from dials_qconsistency.report.columns import output_columns
    from dials_qconsistency.io.refl import ReflectionTable

    t0 = time.perf_counter()
    experiments = read_experiments(expt)
    table = ReflectionTable.from_file(refl)
    t1 = time.perf_counter()
    result = compute_q(experiments, table.columns(), table.identifiers, Options())
    parts = decompose(experiments, result)
    summarise(result, experiments, parts)
    for name, (type_name, values) in output_columns(result, parts).items():
        table.set_column(name, type_name, values)
    t2 = time.perf_counter()
    table.write(out)
    t3 = time.perf_counter()
    return {"read": t1 - t0, "compute": t2 - t1, "write": t3 - t2, "rows": table.nrows}


def end_to_end(expt, refl, out):
    from dials_qconsistency.command_line.q_consistency import run

    start = time.perf_counter()
    run([expt, refl, f"output.reflections={out}", "output.plots=None", f"output.log={out}.log", f"output.html={out}.html",
         "backend=standalone"])
    return {"seconds": time.perf_counter() - start}


def per_reflection_loop(expt, refl, subset):
    """One reflection at a time through the models (the ad-hoc script way)."""
    from dials_qconsistency.io.expt import read_experiments
    from dials_qconsistency.core.geometry import rotation_matrix
    from dials_qconsistency.io.refl import ReflectionTable

    experiments = read_experiments(expt)
    table = ReflectionTable.from_file(refl)
    hkl, ids, panels = table.get("miller_index"), table.get("id"), table.get("panel")
    xyz = table.get("xyzcal.mm")
    n = min(subset, table.nrows)
    start = time.perf_counter()
    out = []
    for i in range(n):
        experiment = experiments[int(ids[i])]
        gonio, crystal, beam = experiment.goniometer, experiment.crystal, experiment.beam
        panel = experiment.detector.panels[int(panels[i])]
        R = rotation_matrix(gonio.axis, float(xyz[i, 2]))
        q_bragg = gonio.setting_rotation @ R @ gonio.fixed_rotation @ crystal.A @ hkl[i].astype(float)
        lab = panel.origin + xyz[i, 0] * panel.fast + xyz[i, 1] * panel.slow
        s1 = lab / np.linalg.norm(lab) * np.linalg.norm(beam.s0)
        q_pixel = s1 - beam.s0
        out.append(np.linalg.norm(q_bragg - q_pixel))
    seconds = time.perf_counter() - start
    return {"seconds_subset": seconds, "subset": n, "seconds": seconds * table.nrows / n, "rows": table.nrows,
            "max_delta_q": float(max(out))}


def core_formulas(expt, refl, out):
    """The loop's formulas vectorised, like for like: q_bragg, q_pixel and |Δq| only
    (no checks, no q_pred, no self-tests), through the functions compute_q uses,
    in its blocks of BLOCK_ROWS rows."""
    from dials_qconsistency.core.blocks import BLOCK_ROWS
    from dials_qconsistency.core.panels import panel_q
    from dials_qconsistency.io.expt import read_experiments
    from dials_qconsistency.core.geometry import norms, q_bragg_rotation
    from dials_qconsistency.io.refl import ReflectionTable

    experiment = read_experiments(expt)[0]
    table = ReflectionTable.from_file(refl)
    hkl, panels, xyz = table.get("miller_index"), table.get("panel"), table.get("xyzcal.mm")
    gonio, crystal, beam = experiment.goniometer, experiment.crystal, experiment.beam
    np.asarray(xyz).sum(), np.asarray(hkl).sum(), np.asarray(panels).sum()  # page the columns in first
    delta = np.empty(table.nrows)
    times = []
    for _ in range(3):  # the first call also pays for fresh memory pages; the best is the throughput
        start = time.perf_counter()
        for first in range(0, table.nrows, BLOCK_ROWS):
            rows = slice(first, first + BLOCK_ROWS)
            q_bragg = q_bragg_rotation(
                gonio.setting_rotation, gonio.axis, xyz[rows, 2], gonio.fixed_rotation, crystal.A, hkl[rows]
            )
            q_pixel = panel_q(experiment.detector, panels[rows], xyz[rows, :2], beam.s0)
            delta[rows] = norms(q_bragg - q_pixel)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "seconds_first": times[0], "max_delta_q": float(delta.max())}


def dials_floor(expt, refl, out):
    """The DIALS floor: DIALS alone reading the table and writing it back."""
    from dials.array_family import flex

    start = time.perf_counter()
    table = flex.reflection_table.from_file(refl)
    table.as_file(out)
    return {"seconds": time.perf_counter() - start, "rows": len(table)}


def end_to_end_native(expt, refl, out):
    from dials_qconsistency.command_line.q_consistency import run

    start = time.perf_counter()
    run([expt, refl, f"output.reflections={out}", "output.plots=None", f"output.log={out}.log", f"output.html={out}.html",
         "backend=native"])
    return {"seconds": time.perf_counter() - start}


def end_to_end_figures(expt, refl, out):
    """The whole command with its PNG figures and the HTML report."""
    from dials_qconsistency.command_line.q_consistency import run

    start = time.perf_counter()
    run([expt, refl, f"output.reflections={out}", f"output.plots={out}_plots/", f"output.log={out}.log",
         f"output.html={out}.html", "backend=standalone"])
    return {"seconds": time.perf_counter() - start}


def stills_300(folder, source, copies=30):
    """One pair of 300 refined CSPAD stills: the shared 10-still pair (64
    panels, one shared detector) repeated 30 times, each copy's crystals and
    rows its own experiments (ids 10 j + i), the shoebox column left out."""
    from dials_qconsistency.io.refl import ReflectionTable
    from dials_qconsistency.io.refl_format import FIXED_TYPES

    expt, refl = os.path.join(folder, "stills300.expt"), os.path.join(folder, "stills300.refl")
    if os.path.exists(refl):
        return expt, refl
    os.makedirs(folder, exist_ok=True)
    with open(source + ".expt") as handle:
        document = json.load(handle)
    crystals, experiments = document["crystal"], document["experiment"]
    document["crystal"] = [crystal for _ in range(copies) for crystal in crystals]
    document["experiment"] = [dict(e, crystal=e["crystal"] + j * len(crystals)) for j in range(copies) for e in experiments]
    table = ReflectionTable.from_file(source + ".refl")
    assert not table.identifiers  # ids are experiment indices
    tiled = ReflectionTable(table.nrows * copies, version=table.version)
    for name in table.keys():
        if table.column_type(name) not in FIXED_TYPES:
            continue
        values = np.concatenate([table.get(name)] * copies)
        if name == "id":
            values = values + np.repeat(np.arange(copies) * len(experiments), table.nrows).astype(values.dtype)
        tiled.set_column(name, table.column_type(name), values)
    with open(expt, "w") as handle:
        json.dump(document, handle)
    tiled.write(refl)
    return expt, refl


def html_page(expt, refl, out):
    """The HTML report alone: its charts and page built after everything it shows
    is known (timed), and its size."""
    from dials_qconsistency.report import html as html_report
    from dials_qconsistency.report.charts import charts
    from dials_qconsistency.report.points import point_sample
    from dials_qconsistency.core.statistics import summarise
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.core.diagnosis import diagnose
    from dials_qconsistency.io.expt import read_experiments
    from dials_qconsistency.io.refl import ReflectionTable
    from dials_qconsistency.report.text import diagnosis_lines
    from dials_qconsistency.core.verdict import centroid_sigmas, judge

    experiments, table = read_experiments(expt), ReflectionTable.from_file(refl)
    columns = table.columns()
    options = Options()
    result = compute_q(experiments, columns, table.identifiers, options)
    parts = decompose(experiments, result)
    summary = summarise(result, experiments, parts)
    diagnoses = diagnose(experiments, result, parts)
    verdict = judge(summary, options, diagnoses, centroid_sigmas(experiments, result, columns.get("xyzobs.mm.variance")).median())
    start = time.perf_counter()
    page = html_report.render("dials.q_consistency", verdict,
                              html_report.sections(summary, diagnoses, verdict, options, (expt, refl), diagnosis_lines(diagnoses)),
                              charts(experiments, result, point_sample(result, parts, 20_000, columns["miller_index"])))
    return {"seconds": time.perf_counter() - start, "bytes": len(page)}


def campaign_phases(expt, refl, out, files=100):
    """Where the time of one small pair goes (ms per file, one process, the
    pair read ``files`` times): the .expt JSON, the models built and checked
    from it, the .refl, the computation (q vectors, decomposition, statistics,
    the per-file record of the merge) and the table written and committed."""
    import json as json_module
    from dials_qconsistency.batch.campaign import FileOutcome, describe
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.core.q_vectors import Options, compute_q, rows_used_in_refinement, with_model_state
    from dials_qconsistency.core.statistics import summarise
    from dials_qconsistency.io.expt import experiments_from_dict
    from dials_qconsistency.io.refl import ReflectionTable
    from dials_qconsistency.io.staged import StagedOutputs
    from dials_qconsistency.report.columns import decomposition_columns, output_types, put_columns, q_columns

    phases = dict.fromkeys(("expt_json", "models", "refl", "compute", "write"), 0.0)
    for _ in range(files):
        t0 = time.perf_counter()
        with open(expt, "rb") as handle:
            document = json_module.loads(handle.read().decode("utf-8"))
        t1 = time.perf_counter()
        experiments = experiments_from_dict(document)
        t2 = time.perf_counter()
        table = ReflectionTable.from_file(refl)
        t3 = time.perf_counter()
        columns = table.columns()
        options = with_model_state(Options(), columns)
        result = compute_q(experiments, columns, table.identifiers, options)
        about, _ = rows_used_in_refinement(result, columns.get("flags"))
        parts = decompose(experiments, result)
        summary = summarise(about, experiments, parts)
        describe(FileOutcome(0, expt, refl, out), experiments, table, about, summary)
        t4 = time.perf_counter()
        with StagedOutputs() as outputs:
            writer = table.begin_write(outputs, out, output_types(parts.wavelength_rel is not None))
            put_columns(writer, q_columns(result))
            put_columns(writer, decomposition_columns(parts))
            writer.close()
            outputs.finish_later(writer)
            outputs.commit()
        t5 = time.perf_counter()
        for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            phases[name] += seconds
    return {name: 1000 * seconds / files for name, seconds in phases.items()}


MEASUREMENTS = {"campaign_phases": campaign_phases, "end_to_end_figures": end_to_end_figures, "html_page": html_page, "dials_floor": dials_floor, "end_to_end_native": end_to_end_native, "io_floor": io_floor, "io_floor_output": io_floor_output, "stages": stages, "end_to_end": end_to_end, "formulas": core_formulas}


#: The measurements of the command itself: their processes end as the installed
#: command's (``program.end_process``: no last garbage collection of every
#: object); the floors' processes end as any Python script's.
COMMAND_MEASUREMENTS = ("end_to_end", "end_to_end_native", "end_to_end_figures")


def _child_output(name, pair, out_folder=None):
    """The output table a measurement's child writes (its log, HTML page and
    plots beside it)."""
    return os.path.join(out_folder or os.path.dirname(pair[1]), f"out_{name}.refl")


def _remove_outputs(out):
    """Nothing is left in the working folder."""
    for path in (out, out + ".log", out + ".html"):
        if os.path.exists(path):
            os.unlink(path)
    shutil.rmtree(out + "_plots", ignore_errors=True)


def child(args):
    expt, refl = args.pair
    out = _child_output(args.child, args.pair, args.out_folder)
    if args.child == "loop":
        result = per_reflection_loop(expt, refl, args.subset)
    else:
        result = MEASUREMENTS[args.child](expt, refl, out)
    result["peak_rss_mb"] = _peak_mb()
    print(json.dumps(result))
    if args.child in COMMAND_MEASUREMENTS:  # the process ends as the installed command's does
        from dials_qconsistency.command_line.program import end_process

        sys.stdout.flush()
        end_process(0)


def run_child(name, pair, subset=20000, out_folder=None):
    command = [sys.executable, __file__, "--child", name, "--pair", *pair, "--subset", str(subset)]
    if out_folder:
        command += ["--out-folder", out_folder]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    process_seconds = time.perf_counter() - start
    # Removed after the clock stops: deleting a 0.5 GB output takes 0.1 s,
    # which is neither the command's work nor the floor's.
    _remove_outputs(_child_output(name, pair, out_folder))
    if done.returncode:
        raise RuntimeError(done.stderr)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), process_seconds=process_seconds)


#: The mistaken model of the benchmark's diagnosis row: the detector moved
#: this far (mm) along lab x, across the beam, as a mis-refined beam centre.
DETECTOR_OFF_MM = 2.0


def detector_off(expt):
    """A copy of ``expt`` beside it with the detector's hierarchy root moved by
    :data:`DETECTOR_OFF_MM` along lab x: every spot moves, so the diagnosis
    fits its candidates on the table (at most ``diagnosis.max_reflections`` rows)."""
    out = expt.replace(".expt", f"_detector_{DETECTOR_OFF_MM:g}mm_off.expt")
    if not os.path.exists(out):
        with open(expt) as handle:
            document = json.load(handle)
        root = document["detector"][0]["hierarchy"]
        root["origin"] = [root["origin"][0] + DETECTOR_OFF_MM] + root["origin"][1:]
        with open(out, "w") as handle:
            json.dump(document, handle)
    return out


def generate(folder, n, files):
    """Write the synthetic pairs in another process (this one stays small)."""
    subprocess.run([sys.executable, os.path.join(HERE, "synthetic_data.py"), folder, str(n), str(files)],
                   check=True, capture_output=True)


def mpi_run(ranks, folder, threads="Auto"):
    """8 files end to end under mpirun with ``ranks`` ranks of ``threads``
    threads (Auto: the cores shared among the ranks); (seconds, merged statistics)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    work = os.path.join(folder, f"mpi_{ranks}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    command = [shutil.which("mpirun"), "-n", str(ranks), sys.executable, "-m",
               "dials_qconsistency.command_line.q_consistency", os.path.join(folder, "files8", "*.expt"),
               os.path.join(folder, "files8", "*.refl"), "mp.method=mpi", f"mp.nthreads={threads}", "output.json=report.json"]
    start = time.perf_counter()
    subprocess.run(command, cwd=work, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    merged = json.load(open(os.path.join(work, "report.json")))["merged"]
    shutil.rmtree(work)
    return seconds, merged


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7])
    parser.add_argument("--folder", default="/tmp/qc-bench")
    parser.add_argument("--mpi-rows", type=float, default=4e6, help="rows over the 8 MPI files")
    parser.add_argument("--json")
    parser.add_argument("--report-only", action="store_true", help="only the HTML report's time and size")
    parser.add_argument("--native-only", action="store_true",
                        help="inside DIALS: only the native backend against the DIALS floor")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the I/O floors and of the command, alternating; the best of each is shown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pair", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--subset", type=int, default=20000, help=argparse.SUPPRESS)
    parser.add_argument("--out-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
               f"Python {platform.python_version()}, numpy {np.__version__}")
    from dials_qconsistency.io.backends import dials_importable

    dials_here = dials_importable()
    if args.native_only and not dials_here:
        parser.error("--native-only needs DIALS (run with the DIALS environment's python)")
    print(f"machine: {machine}\n")
    results = {"machine": machine, "sizes": {}}
    header = f"{'rows':>6} {'what':34s} {'seconds':>8} {'M refl/s':>9} {'peak RSS MB':>12}"
    print(header)
    for size in args.sizes:
        n = int(size)
        label = f"{n / 1e6:g}M"
        folder = os.path.join(args.folder, label)
        pair = os.path.join(folder, "sweep_000.expt"), os.path.join(folder, "sweep_000.refl")
        if not os.path.exists(pair[1]):
            generate(folder, n, 1)
        mb = os.path.getsize(pair[1]) / 1e6
        if dials_here:
            native_run(label, n, pair, results, args.repeat)
        if args.native_only:
            continue
        page = run_child("html_page", pair)
        results["sizes"].setdefault(label, {})["html_page"] = page
        print(f"{label:>6} {'HTML report (charts + page)':34s} {page['seconds']:8.2f} {'':9s} {'':12s}"
              f"   ({page['bytes'] / 1e6:.1f} MB, of which plotly.js 4.8 MB)")
        if args.report_only:
            continue
        # The floors and the command alternate, best of --repeat each: the
        # disk-bound floors vary by up to 3x from run to run on a shared machine.
        runs = {name: [] for name in ("io_floor", "io_floor_output", "end_to_end")}
        for _ in range(args.repeat):
            for name in runs:
                runs[name].append(run_child(name, pair))
        floor, floor_output, whole = (min(runs[name], key=lambda r: r["seconds"]) for name in runs)
        staged = run_child("stages", pair)
        mistaken = run_child("end_to_end", (detector_off(pair[0]), pair[1]))  # the diagnosis's fits at work
        loop = run_child("loop", pair)
        formulas = run_child("formulas", pair)
        entry = {"table_mb": mb, "io_floor": floor, "io_floor_output": floor_output, "stages": staged, "end_to_end": whole, "loop": loop,
                 "formulas": formulas, "end_to_end_detector_off": mistaken}
        results["sizes"].setdefault(label, {}).update(entry)
        rows = [("I/O floor (read+write)", floor["seconds"], floor["peak_rss_mb"]),
                ("I/O floor of the output", floor_output["seconds"], floor_output["peak_rss_mb"]),
                ("read", staged["read"], None), ("compute", staged["compute"], None),
                ("write", staged["write"], staged["peak_rss_mb"]),
                ("end-to-end (command)", whole["seconds"], whole["peak_rss_mb"]),
                (f"end-to-end, detector {DETECTOR_OFF_MM:g} mm off", mistaken["seconds"], mistaken["peak_rss_mb"]),
                (f"loop ({loop['subset']} rows, scaled)", loop["seconds"], None),
                ("same formulas, vectorised, first", formulas["seconds_first"], None),
                ("same formulas, vectorised, best", formulas["seconds"], None)]
        for what, seconds, peak in rows:
            print(f"{label:>6} {what:34s} {seconds:8.2f} {n / seconds / 1e6:9.3f} "
                  f"{'' if peak is None else f'{peak:12.0f}'}")
        print(f"{label:>6} table {mb:.0f} MB, output {floor_output['bytes'] / 1e6:.0f} MB; "
              f"end-to-end / I/O floor = {whole['seconds'] / floor['seconds']:.2f}, "
              f"/ I/O floor of the output = {whole['seconds'] / floor_output['seconds']:.2f}; "
              f"loop / vectorised formulas = {loop['seconds'] / formulas['seconds']:.0f}x, "
              f"loop / compute stage = {loop['seconds'] / staged['compute']:.0f}x")

    if args.native_only or args.report_only:
        return report(results, args)
    # one serial-crystallography batch: thousands of experiments in one pair
    stills = os.path.join(args.folder, "stills10k")
    if not os.path.exists(os.path.join(stills, "stills.refl")):
        subprocess.run([sys.executable, os.path.join(HERE, "synthetic_data.py"), stills, "--stills", "1e4"],
                       check=True, capture_output=True)
    pair = os.path.join(stills, "stills.expt"), os.path.join(stills, "stills.refl")
    rows = json.loads(subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                      "from dials_qconsistency.io.refl import ReflectionTable; "
                                      "print(ReflectionTable.from_file(sys.argv[2]).nrows)", ROOT, pair[1]],
                                     check=True, capture_output=True, text=True).stdout)
    batch = run_child("end_to_end", pair)
    results["stills_batch"] = {"experiments": 10000, "rows": rows, **batch}
    print(f"\nstills, 10,000 experiments in one pair ({rows / 1e6:.1f}M rows): end to end {batch['seconds']:.2f} s, "
          f"peak RSS {batch['peak_rss_mb']:.0f} MiB")

    source = os.path.join(os.path.dirname(ROOT), "shared", "data", "dials_current", "cspad_stills_refined")
    if os.path.exists(source + ".expt"):
        pair = stills_300(os.path.join(args.folder, "stills300"), source)
        figures = min((run_child("end_to_end_figures", pair) for _ in range(args.repeat)), key=lambda r: r["seconds"])
        results["stills_300"] = figures
        print(f"\none pair of 300 refined CSPAD stills (the 10-still pair 30 times, 35,010 rows), end to end with "
              f"its PNG figures and the HTML report: {figures['seconds']:.2f} s (process: {figures['process_seconds']:.2f} s), "
              f"peak RSS {figures['peak_rss_mb']:.0f} MiB")

    campaign = campaign_run(args.folder)
    if campaign is not None:
        results["campaign"] = campaign
        print(f"\n{campaign['files']} pairs of the 64-panel CSPAD stills ({campaign['rows']} rows each), nproc=2, "
              f"tables and reports written: {campaign['seconds']:.1f} s, {campaign['files'] / campaign['seconds']:.0f} files/s")
        source = os.path.join(os.path.dirname(ROOT), "shared", "data", "dials_current", "cspad_stills_refined")
        phases = run_child("campaign_phases", (source + ".expt", source + ".refl"), out_folder=args.folder)
        campaign["phases_ms"] = {k: v for k, v in phases.items() if k not in ("peak_rss_mb", "process_seconds")}
        per_file = 1000 * 2 * campaign["seconds"] / campaign["files"]  # ms of one of the 2 processes per file
        known = sum(campaign["phases_ms"].values())
        print("  where the time of one file goes (ms, one process): "
              + ", ".join(f"{name} {ms:.1f}" for name, ms in campaign["phases_ms"].items())
              + f"; the rest (process start, imports, handing files between processes, the merge and its report) "
                f"{per_file - known:.1f} of {per_file:.1f}")

    if shutil.which("mpirun"):
        folder8 = os.path.join(args.folder, "files8")
        if not os.path.exists(os.path.join(folder8, "sweep_007.refl")):
            generate(folder8, int(args.mpi_rows), 8)
        results["mpi"] = {"rows": int(args.mpi_rows), "files": 8}
        for threads in ("Auto", 1):
            one, merged_one = mpi_run(1, args.folder, threads)
            two, merged_two = mpi_run(2, args.folder, threads)
            results["mpi"][f"nthreads={threads}"] = {"seconds_1_rank": one, "seconds_2_ranks": two,
                                                      "identical_statistics": merged_one == merged_two}
            print(f"\nMPI, 8 files, {args.mpi_rows / 1e6:g}M rows, mp.nthreads={threads}: 1 rank {one:.2f} s, "
                  f"2 ranks {two:.2f} s, speed-up {one / two:.2f}x; merged statistics identical: {merged_one == merged_two}")

    report(results, args)


def campaign_run(folder, files=500):
    """The shape dials.stills_process leaves: one small pair per image. 500
    links to the real 10-still CSPAD pair of ../shared/data, run with
    ``nproc=2`` as a whole command (process start included); None without the data."""
    source = os.path.join(os.path.dirname(ROOT), "shared", "data", "dials_current")
    if not os.path.isdir(source):
        return None
    pairs = os.path.join(folder, "campaign")
    shutil.rmtree(pairs, ignore_errors=True)
    os.makedirs(os.path.join(pairs, "out"))
    for i in range(files):
        for ext in (".expt", ".refl"):
            os.symlink(os.path.join(source, "cspad_stills_refined" + ext), os.path.join(pairs, f"shot_{i:04d}{ext}"))
    command = [sys.executable, "-m", "dials_qconsistency.command_line.q_consistency", os.path.join(pairs, "shot_*.expt"),
               os.path.join(pairs, "shot_*.refl"), "nproc=2", "output.reflections=out/qc.refl", "output.json=qc.json"]
    start = time.perf_counter()
    subprocess.run(command, cwd=pairs, env=dict(os.environ, PYTHONPATH=ROOT), check=True, capture_output=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(pairs)
    return {"files": files, "rows": 1167, "seconds": seconds}


def native_run(label, n, pair, results, repeat=3):
    """Inside DIALS: the native backend end to end beside the DIALS floor, each
    timed as a whole fresh process (start, imports, work, exit: what a user
    waits for), alternating, the best of ``repeat`` each (the machine is noisy)."""
    runs = {"dials_floor": [], "end_to_end_native": []}
    for _ in range(repeat):  # alternating, as the I/O floors and the command
        for name in runs:
            runs[name].append(run_child(name, pair))
    floor, native = (min(runs[name], key=lambda r: r["process_seconds"]) for name in runs)
    results["sizes"].setdefault(label, {}).update({"dials_floor": floor, "end_to_end_native": native})
    for what, entry in (("DIALS floor (from_file+as_file)", floor), ("end-to-end, native backend", native)):
        seconds = entry["process_seconds"]
        print(f"{label:>6} {what:34s} {seconds:8.2f} {n / seconds / 1e6:9.3f} {entry['peak_rss_mb']:12.0f}"
              f"   (of which in the work itself {entry['seconds']:.2f} s)")


def report(results, args):
    print("\ntargets:")
    for label, entry in results["sizes"].items():
        if "html_page" in entry:
            size = entry["html_page"]["bytes"] / 1e6
            print(f"  {label}: the HTML report is {size:.1f} MB ({'met' if size < 10 else 'NOT met'}: < 10 MB), "
                  f"built in {entry['html_page']['seconds']:.2f} s")
        if "dials_floor" in entry:
            time_ratio = entry["end_to_end_native"]["process_seconds"] / entry["dials_floor"]["process_seconds"]
            peak_ratio = entry["end_to_end_native"]["peak_rss_mb"] / entry["dials_floor"]["peak_rss_mb"]
            print(f"  {label}, native backend: end to end {time_ratio:.2f} x the DIALS floor's time "
                  f"({'met' if time_ratio <= 1.3 else 'NOT met'}: <= 1.3), peak {peak_ratio:.2f} x its peak "
                  f"({'met' if peak_ratio <= 1.25 else 'NOT met'}: <= 1.25)")
        if "io_floor" not in entry:
            continue
        # issue 19: against the I/O floor of the output (the bytes the command must write)
        ratio = entry["end_to_end"]["seconds"] / entry["io_floor_output"]["seconds"]
        target = 1.3 if label == "10M" else 1.5
        speed = entry["loop"]["seconds"] / entry["formulas"]["seconds"]
        print(f"  {label}: end-to-end {ratio:.2f} x the I/O floor of the output "
              f"({'met' if ratio <= target else 'NOT met'}: <= {target}); "
              f"the formulas {speed:.0f} x faster than the per-reflection loop "
              f"({'met' if speed >= 100 else 'NOT met'}: >= 100)")
        if label == "10M":
            peak = entry["end_to_end"]["peak_rss_mb"]
            print(f"  10M: peak RSS {peak:.0f} MiB = {peak * 2**20 / 1e9:.2f} GB "
                  f"({'met' if peak * 2**20 <= 2e9 else 'NOT met'}: <= 2 GB)")
    if "campaign" in results:
        run = results["campaign"]
        print(f"  {run['files']} small pairs (64-panel CSPAD stills), nproc=2: {run['seconds']:.1f} s, "
              f"{run['files'] / run['seconds']:.0f} files/s (issue 19: half of 10.9 s, "
              f"{'met' if run['seconds'] <= 5.45 else 'NOT met'}: <= 5.45 s)")
    for threads in ("Auto", 1):
        if "mpi" in results:
            run = results["mpi"][f"nthreads={threads}"]
            speed = run["seconds_1_rank"] / run["seconds_2_ranks"]
            print(f"  MPI, mp.nthreads={threads}: 2 ranks {speed:.2f} x faster than 1 "
                  f"({'met' if speed >= 1.7 else 'NOT met'}: >= 1.7)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return None


if __name__ == "__main__":
    main()
