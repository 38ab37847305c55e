"""dials.q_consistency: is the refined model self-consistent in reciprocal space?"""

from __future__ import annotations

import logging
import os
import sys

import libtbx.phil

from dials_qconsistency import __version__
from dials_qconsistency.batch.campaign import FileOutcome, describe
from dials_qconsistency.batch.parallel import threads_per_process
from dials_qconsistency.core.pipeline import PairSettings, check_pair, load_pair
from dials_qconsistency.core.q_vectors import Options
from dials_qconsistency.core.verdict import gate_failure
from dials_qconsistency.errors import GateFailed
from dials_qconsistency.io.pairing import expand, is_pattern, pair_files
from dials_qconsistency.io.staged import StagedOutputs
from dials_qconsistency.report import html as html_report
from dials_qconsistency.report.charts import charts
from dials_qconsistency.report.columns import existing_columns_note
from dials_qconsistency.report.residual_tables import residual_tables
from dials_qconsistency.report.figures import FIGURE_NAMES, plot_path, render_plots
from dials_qconsistency.report.points import point_sample
from dials_qconsistency.report.text import (
    diagnosis_lines,
    diagnosis_text,
    json_bytes,
    json_report,
    per_file_csv,
    per_image_csv,
    residuals_text,
    summary_text,
    verdict_text,
)

from .many import run_many
from .program import (
    blas_on_one_thread,
    check_output_paths,
    log_header,
    logged_run,
    parse_command_line,
    run_console,
    run_program,
)

logger = logging.getLogger("dials.q_consistency")

help_message = """
Compare, for every indexed reflection, the reciprocal lattice vector of the
crystal model with the scattering vector measured at the spot on the detector.

In the DIALS laboratory frame and in 1/Angstrom (no 2pi):
  q_bragg = S . R(axis, phi) . F . A . h   (rotation data, phi = xyzcal.mm[2];
                                            scan-varying A, S, s0 as DIALS used)
  q_bragg = A . h                           (stills)
  q_pixel = k_out - k_in at the spot position on its panel
  q_pred  = s1 - s0 from the table
  delta_q = q_bragg - q_pixel

The output table is the input table plus 13 columns (NaN in rows that could
not be computed): q_bragg, q_pixel, q_pred, delta_q (vec3), delta_q.norm,
delta_q.along_q (|q_bragg| - |q_pixel|), delta_q.delphi.rad or
delta_q.delpsi.rad (the rotation onto the Ewald sphere), delta_q.xy.mm,
delta_q.radial.mm, delta_q.transverse.mm (the in-detector-plane residual) and
delta_q.radial, delta_q.transverse (the same in 1/Angstrom). The log and
dials.q_consistency.html start with the verdict: consistent, or not and why.

Examples::

  dials.q_consistency refined.expt refined.refl

  dials.q_consistency integrated.expt integrated.refl

  dials.q_consistency refined.expt refined.refl q_pixel.source=observed phi=observed

  dials.q_consistency refined.expt refined.refl fail_if.inconsistent=True output.plots=figures/

With q_pixel.source=observed (spot centroids) delta_q measures how well the
refined model fits the data. It is split into the rotation onto the Ewald
sphere (delta phi or delta psi), the error in |q|, and the in-detector-plane
residual (radial and transverse about the beam centre, mm and 1/Angstrom).
A diagnosis fits the best rotation, mirror, isotropic scale and detector
planes and names the classic mistakes: a missing or extra goniometer setting
or fixed rotation, a constant 90/180 degree lab rotation, a sign flip, 2pi
units, a wrong wavelength, a detector distance error, a beam-centre shift, a
tilted panel, or Miller indices in another symmetry-equivalent setting.
"""

phil_scope = libtbx.phil.parse(
    """
q_pixel {
  source = *calculated observed observed_px
    .type = choice
    .help = "Spot position for q_pixel: calculated (xyzcal.mm), observed"
            "(xyzobs.mm.value) or observed_px (xyzobs.px.value mapped to mm"
            "with the refined panel, parallax included)."
}
rows = *used_in_refinement indexed
  .type = choice
  .help = "The rows the statistics, verdict, diagnosis and charts are about:"
          "used_in_refinement (when the table has DIALS' flag on some row) the"
          "rows refinement used, as its RMSDs are, with the other indexed rows"
          "counted and summarised as outliers; indexed: every indexed row. The"
          "output table has the q columns of every indexed row either way."
phi = *calculated observed
  .type = choice
  .help = "Rotation angle at which q_bragg is evaluated (rotation data):"
          "calculated (xyzcal.mm) or observed (xyzobs.mm.value)."
scan_varying {
  model_state = *auto refinement integrate
    .type = choice
    .help = "For scan-varying models, the state used for each reflection:"
            "refinement reproduces dials.refine (one state per block of"
            "observed phi); integrate reproduces dials.integrate's prediction"
            "(linear interpolation between image boundaries); auto is"
            "integrate for a table with rows DIALS flagged integrated_sum or"
            "integrated_prf (dials.integrate's output), else refinement."
  block_width = 1.0
    .type = float(value_min=0.001, allow_none=False)
    .help = "Block width in degrees, as dials.refine's"
            "refinement.parameterisation.block_width (at least 0.001)."
}
output {
  reflections = q_consistency.refl
    .type = path
    .help = "The output reflection table: the input plus the q columns. With"
            "several inputs, one table per input named <input>_<this name>."
  log = dials.q_consistency.log
    .type = path
  html = dials.q_consistency.html
    .type = path
    .help = "The report: one self-contained HTML page (verdict, diagnosis,"
            "detector and trend charts, tables). None switches it off."
  external_dependencies = remote local *embed
    .type = choice
    .help = "How the HTML page gets plotly.js: embed it (opens with no"
            "network), link the CDN (remote) or the installed plotly package"
            "(local), as dials.report offers."
  json = None
    .type = path
    .help = "Machine-readable report: every statistic and the diagnosis"
            "(schema in README.rst)."
  plots = None
    .type = str
    .help = "PNG figures (for papers and scripts): a file-name prefix, or a"
            "directory (existing, or ending in /). None: no PNG files."
  max_plot_points = 20000
    .type = int(value_min=0)
    .help = "Charts and figures of points draw at most this many reflections,"
            "1 in k of the used rows in table order (said on each chart); the"
            "histogram and the tables count all of them. 0: every reflection."
            "The HTML page is about 4.8 MB (plotly.js) + 230 bytes a point."
  per_file_csv = None
    .type = path
    .help = "One CSV row per input file: counts and |delta_q| statistics."
  per_image_csv = None
    .type = path
    .help = "One CSV row per image (rotation) or still: |delta_q| statistics."
}
statistics {
  resolution_shells = 10
    .type = int(value_min=0)
    .help = "Number of resolution shells (equal volume in 1/d^3), and of"
            "wavelength bands (equal width) for polychromatic data; 0: none."
  panel_group_depth = 1
    .type = int(value_min=1)
    .help = "Depth in the detector hierarchy of the panel groups reported."
}
diagnosis {
  max_reflections = 250000
    .type = int(value_min=0)
    .help = "The diagnosis fits each scope (pooled, each experiment) on at most"
            "this many used reflections, an even sample in table order, as"
            "dials.refine samples reflections; 0: all of them."
}
fail_if {
  inconsistent = False
    .type = bool
    .help = "Exit with status 2 unless the verdict is consistent (see the log:"
            "s1 from these models, the model's own predictions reproduced, no"
            "named mistake large against the centroids' uncertainty)."
  mean_delta_q = None
    .type = float(value_min=0)
    .help = "Exit with status 2 if the mean |delta_q| (1/Angstrom) exceeds this."
  median_delta_q = None
    .type = float(value_min=0)
  max_delta_q = None
    .type = float(value_min=0)
}
input {
  pairing = *auto name order
    .type = choice
    .help = "With several inputs: pair each .refl with the .expt of the same"
            "name (path without extension), in the order given, or auto (by"
            "name when every file has its partner, else by order)."
}
nproc = 1
  .type = int(value_min=1)
  .help = "With several inputs: worker processes, one file at a time each."
mp {
  method = *multiprocessing mpi
    .type = choice
    .help = "mpi: run under mpirun with mpi4py; the ranks split the files and"
            "rank 0 merges the statistics and writes the summary."
  nthreads = Auto
    .type = int(value_min=1)
    .help = "Threads computing one table, a block of 65536 rows each (the"
            "results are the same bits whatever the number). Auto: the CPUs"
            "this process may use, shared among the nproc worker processes or"
            "the MPI ranks on this machine."
}
backend = *auto native standalone
  .type = choice
  .help = "native: DIALS' option parser, dxtbx models and flex.reflection_table;"
          "standalone: this package's own .expt and .refl readers. Both write"
          "msgpack tables with this package's writer (as_file only what DIALS"
          "alone reads); auto: native when DIALS and dxtbx can be imported."
          "Both give the same numbers."
debug = False
  .type = bool
  .help = "Show a traceback for unexpected errors."
"""
)

usage = (
    "dials.q_consistency [options] refined.expt refined.refl [key=value ...]\n"
    "       dials.q_consistency [options] 'run*/indexed_*.expt' 'run*/indexed_*.refl' [nproc=N] [key=value ...]"
)


def output_paths(params) -> dict[str, str]:
    """Every file a run may write, by the parameter that names it."""
    outputs = {}
    for name in ("reflections", "html", "json", "per_file_csv", "per_image_csv", "log"):
        path = getattr(params.output, name)
        if path:
            outputs[f"output.{name}"] = path
    target = params.output.plots
    if target and target != "None":
        for name in FIGURE_NAMES:
            outputs[f"output.plots ({name})"] = plot_path(target, name)
    return outputs


@blas_on_one_thread
def run(args=None, phil=phil_scope):
    """Run the program; return 0 on success. Raises QConsistencyError on bad input.

    Inputs are read and checked before any output file appears: the table may
    be begun as a hidden temporary file while the q vectors (and the checks of
    their values) are computed, and is removed if a check fails. The outputs
    (table, JSON, figures) are written all together or not at all. The log file
    is the one file a run that fails while writing leaves behind: it says why.
    """
    args = sys.argv[1:] if args is None else list(args)
    arguments = parse_command_line(args, phil, usage, help_message)
    if arguments is None:
        return 0
    params = arguments.params
    experiments_paths = [p for arg in arguments.experiments for p in (expand(arg) if is_pattern(arg) else [arg])]
    reflections_paths = [p for arg in arguments.reflections for p in (expand(arg) if is_pattern(arg) else [arg])]
    pairs = pair_files(experiments_paths, reflections_paths, params.input.pairing)
    options = Options(
        q_pixel_source=params.q_pixel.source,
        model_state=str(params.scan_varying.model_state).lower(),  # PHIL gives choice auto as libtbx.Auto
        block_width=params.scan_varying.block_width,
        phi=params.phi,
        threads=threads_per_process(params.mp.nthreads),
    )
    if len(pairs) > 1 or params.mp.method == "mpi":
        return run_many(params, arguments, pairs, options, logger)
    ((expt_path, refl_path),) = pairs
    check_output_paths(output_paths(params), [expt_path, refl_path])
    if params.output.html:
        html_report.prepare_in_background()

    settings = PairSettings(params.rows, params.statistics.resolution_shells, params.statistics.panel_group_depth,
                            diagnose=True, max_reflections=params.diagnosis.max_reflections)

    with StagedOutputs() as outputs:  # a refused pair removes the table begun while its q vectors are computed
        pair = load_pair(arguments.backend, expt_path, refl_path, options, params.rows, outputs,
                         params.output.reflections)
        with logged_run(logger, params.output.log, arguments, outputs):
            log_header(logger, "dials.q_consistency", __version__, arguments)
            logger.info(f"Read {len(pair.experiments)} experiment(s) from {expt_path}, {pair.table.nrows} rows from {refl_path}")
            checked = check_pair(pair, outputs, params.output.reflections, settings)
            logger.info(verdict_text(checked.verdict) + "\n")
            for text in (summary_text(checked.summary, pair.options), residuals_text(checked.summary),
                         diagnosis_text(checked.diagnoses)):
                if text:
                    logger.info(text)
            if checked.replaced:
                logger.info(existing_columns_note(checked.replaced, checked.parts.wavelength_rel is not None))
            figures = stage_reports(params, checked, outputs)
            outputs.commit()
            log_saved(params, figures, pair.table.nrows, checked.summary.delta_q["n"])
            gate = gate_failure(checked.summary.delta_q, params.fail_if, checked.verdict)
            if gate:
                logger.info(f"\nfail_if: {gate}")
                raise GateFailed(gate)
    return 0


def stage_reports(params, checked, outputs) -> list:
    """Stage the HTML and JSON reports, the CSV files and the figures beside the
    table (about the rows the statistics are about); return the figures' paths."""
    pair, summary, diagnoses, verdict, parts = (checked.loaded, checked.summary, checked.diagnoses, checked.verdict,
                                                checked.parts)
    experiments, result, columns, options = pair.experiments, pair.about, pair.columns, pair.options
    inputs = (pair.experiments_path, pair.reflections_path)
    summaries = (params.output.json, params.output.per_file_csv, params.output.per_image_csv)
    if any(summaries):  # the per-file and per-image records of a run over many files
        outcome = FileOutcome(0, inputs[0], inputs[1], params.output.reflections)
        describe(outcome, experiments, pair.table, result, summary)
    if params.output.json:
        report = {"verdict": verdict.as_dict(),
                  **json_report(summary, diagnoses, options, {"experiments": inputs[0], "reflections": inputs[1]})}
        report["images"] = outcome.images
        outputs.add(params.output.json, json_bytes(report))
    if params.output.per_file_csv:
        outputs.add(params.output.per_file_csv, per_file_csv([outcome]))
    if params.output.per_image_csv:
        outputs.add(params.output.per_image_csv, per_image_csv([outcome]))
    target = params.output.plots
    plots = bool(target and target != "None")
    sample = None
    if plots or params.output.html:  # the reflections the figures and charts of points show
        sample = point_sample(result, parts, params.output.max_plot_points or None, columns.get("miller_index"))
        pair.table.release_memory()  # the sample's positions, panels and Miller indices
    rendered = render_plots(target, experiments, result, sample) if plots else {}
    for path, png in rendered.items():
        outputs.make_folder(os.path.dirname(path) or ".")  # a new plots folder, removed on failure
        outputs.add(path, png)
    if params.output.html:
        tables = residual_tables(experiments, result, parts, columns.get("xyzobs.mm.variance"),
                                 params.statistics.panel_group_depth, options.threads)
        pair.table.release_memory()  # the variances, read again for the residual tables
        outputs.add(params.output.html, html_report.render(
            "dials.q_consistency", verdict,
            html_report.sections(summary, diagnoses, verdict, options, inputs, diagnosis_lines(diagnoses), tables),
            charts(experiments, result, sample, summary),
            params.output.external_dependencies,
        ))
    return list(rendered)


def log_saved(params, figures, nrows, compared) -> None:
    """What was saved where (``compared``: the rows with |Δq|; none: the q columns are NaN)."""
    if params.output.html:
        logger.info(f"\nSaved the HTML report to {params.output.html}")
    if params.output.json:
        logger.info(f"\nSaved the report to {params.output.json}")
    for name in ("per_file_csv", "per_image_csv"):
        if getattr(params.output, name):
            logger.info(f"Saved {getattr(params.output, name)}")
    if figures:
        logger.info(f"Saved {len(figures)} figures: {', '.join(figures)}")
    if params.output.reflections:
        what = ("with q_bragg, q_pixel, q_pred, delta_q and its parts" if compared else
                "with the q columns, NaN in every row (nothing to compare)")
        logger.info(f"\nSaved {nrows} rows {what} to {params.output.reflections}")


def main(args=None):
    """Console entry point: one-line errors and exit status 1 on bad input."""
    return run_program("dials.q_consistency", run, sys.argv[1:] if args is None else list(args))


def console():
    """The installed command: :func:`main`, then the process ends (:func:`program.run_console`)."""
    run_console(main)


if __name__ == "__main__":
    console()
