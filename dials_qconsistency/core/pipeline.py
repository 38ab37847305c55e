"""The one-pair pipeline, written once: the single-pair command, the worker
processes of a run over many files and the MPI ranks all call it.

Two steps, so that bad input is refused before any output file exists (the
output table may be begun, staged, and is then removed):

* :func:`load_pair` reads the ``.expt`` and the ``.refl`` (with the backend
  chosen), computes q_bragg, q_pixel and q_pred for every row and picks the
  rows the statistics are about. Given where, it starts writing the output
  table (a thread copying the input's columns) while the q vectors are
  computed, when the new columns are known before them.
* :func:`check_pair` decomposes Δq, writes the output table (staged, by a
  thread while the rest computes), summarises, diagnoses and judges.

All vectors are lab frame, Å⁻¹, no 2π.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dials_qconsistency.core.decomposition import decompose, laue_rows
from dials_qconsistency.core.diagnosis import MAX_REFLECTIONS, Observed, diagnose
from dials_qconsistency.core.q_vectors import Options, compute_q, rows_used_in_refinement, with_model_state
from dials_qconsistency.core.statistics import s1_self_tests, stills_psi_tests, summarise
from dials_qconsistency.core.row_statistics import norm_statistics, row_distances
from dials_qconsistency.core.verdict import centroid_sigmas, judge, normalised_residual, time_sigma_us
from dials_qconsistency.io import backends
from dials_qconsistency.report.columns import (
    output_types,
    decomposition_columns,
    existing_output_columns,
    put_columns,
    q_columns,
    stale_output_columns,
)


@dataclass
class PairSettings:
    """What a pair is checked for (mirrors the command's PHIL parameters)."""

    rows: str = "used_in_refinement"  # the rows the statistics are about: used_in_refinement | indexed
    resolution_shells: int = 10
    panel_group_depth: int = 1
    diagnose: bool = True  # fit and name mistakes (a run over many files does not, per file)
    max_reflections: int = MAX_REFLECTIONS  # the diagnosis' sample per scope (0: all)


@dataclass
class LoadedPair:
    """A pair read and its q vectors computed; nothing written yet."""

    experiments_path: str
    reflections_path: str
    experiments: object  # model.experiment.ExperimentList
    table: object  # the backend's table (columns, identifiers, begin_write)
    columns: dict  # column name -> numpy array
    options: Options  # model_state=auto resolved for this table
    result: object  # q_vectors.QResult of every row
    about: object  # the QResult the statistics are about (outliers marked not used)
    outliers: object  # row numbers left out as refinement outliers, or None
    writer: object = None  # the output table's write, if begun already (backends.TableWrite)
    replaced: list = field(default_factory=list)  # q columns the input already had (replaced or removed in the output)


@dataclass
class CheckedPair:
    """Everything the reports need of one pair."""

    loaded: LoadedPair
    parts: object  # decomposition.Decomposition
    summary: object  # statistics.Summary, its verdict set
    diagnoses: list  # diagnosis.Diagnosis per scope ([] without the diagnosis)
    verdict: object  # verdict.Verdict
    replaced: list  # q columns the input already had (replaced or removed in the output table)


def load_pair(backend_name: str, experiments_path: str, reflections_path: str, options: Options,
              rows: str = "used_in_refinement", staged=None, output_table: str | None = None) -> LoadedPair:
    """Read a pair and compute its q vectors; raises QConsistencyError naming
    the file on bad input. The input table's pages are released afterwards.

    With ``staged`` (a ``staged.StagedOutputs``) and ``output_table``, the
    output table is begun before the q vectors are computed when no
    experiment is polychromatic (else its columns depend on them): its input
    columns are copied meanwhile. Pass the same to :func:`check_pair`."""
    backend = backends.get(backend_name)
    experiments, table = backends.read_pair(backend, experiments_path, reflections_path)
    columns = table.columns()
    options = with_model_state(options, columns)
    writer, replaced = None, []
    if staged is not None and output_table and not any(e.is_laue for e in experiments):
        writer, replaced = _begin_table(table, staged, output_table, time_parts=False)
    result = compute_q(experiments, columns, table.identifiers, options, path=reflections_path,
                       experiments_path=experiments_path, release_input=table.release_rows)
    about, outliers = rows_used_in_refinement(result, columns.get("flags"), rows)
    table.release_memory()  # the input's columns were read: the results take their place
    return LoadedPair(experiments_path, reflections_path, experiments, table, columns, options, result, about,
                      outliers, writer, replaced)


def _begin_table(table, staged, output_table: str, time_parts: bool):
    """(the write of the output table begun in ``staged``, the q columns the
    input already had); ``time_parts``: with the wavelength and time parts."""
    replaced = existing_output_columns(table)  # before the new columns are reserved in it
    new_columns = output_types(time_parts)
    for name in stale_output_columns(table, new_columns):
        table.remove_column(name)
    return table.begin_write(staged, output_table, new_columns), replaced


def check_pair(pair: LoadedPair, staged, output_table: str | None, settings: PairSettings) -> CheckedPair:
    """Decompose, write ``output_table`` into ``staged`` (None: no table),
    summarise, diagnose and judge one loaded pair. The table's writer may
    still be busy: ``staged`` waits for it before its files are committed.
    Once per pair: q_pred is let go here."""
    experiments, result, about, options = pair.experiments, pair.result, pair.about, pair.options
    writer, replaced = pair.writer, pair.replaced
    if output_table and writer is None:
        writer, replaced = _begin_table(pair.table, staged, output_table, laue_rows(experiments, result) is not None)
    if writer:
        # Written by a thread while the rest computes: the input's own columns
        # and the q vectors while Δq is decomposed, then its parts.
        put_columns(writer, q_columns(result))
    variance = pair.columns.get("xyzobs.mm.variance")
    sigmas = None
    if settings.diagnose:  # on a sample of the variances, before the decomposition's parts take memory
        sigmas = centroid_sigmas(experiments, about, variance)
        pair.table.release_memory()  # the sample's positions, panels and variances
    parts = decompose(experiments, result, options.threads, pair.table.release_rows)
    pair.table.release_memory()  # the positions read again by the decomposition
    s1_tests = s1_self_tests(about, experiments)
    # Written (by the writer, which holds them until then), decomposed and
    # self-tested: read no more (320 MB at 10M rows).
    _let_go((result, about), "q_pred", "observed_to_pred", "observed_direction_to_pred")
    if writer:
        put_columns(writer, decomposition_columns(parts))
        writer.close()  # the rest is written and synced while the statistics and reports are made
        staged.finish_later(writer)
    summary = summarise(about, experiments, parts, settings.resolution_shells, settings.panel_group_depth,
                        options.threads, s1_tests,
                        stills_psi_tests(about, experiments, parts, pair.columns.get("delpsical.rad")))
    if pair.outliers is not None:
        summary.outliers = norm_statistics(row_distances(result.q_bragg, result.q_pixel, pair.outliers), overwrite=True)
    diagnoses, normalised = [], None
    if settings.diagnose:
        diagnoses = diagnose(experiments, about, parts, settings.max_reflections, options.threads,
                             Observed(positions=options.q_pixel_source == "observed", phi=options.phi == "observed"))
        if options.q_pixel_source != "calculated":
            normalised = normalised_residual(parts, about, variance)
            pair.table.release_memory()  # the variances read again
    verdict = judge(summary, options, diagnoses if settings.diagnose else None,
                    None if sigmas is None else sigmas.median(), normalised,
                    scan_varying=any(e.is_scan_varying for e in experiments),
                    sigma_t=time_sigma_us(experiments, about, pair.columns),
                    sigma_q_of=None if sigmas is None else sigmas.median)
    summary.verdict = verdict.short
    return CheckedPair(pair, parts, summary, diagnoses, verdict, replaced)


def _let_go(results, *names) -> None:
    """Set the per-row fields ``names`` of the QResults ``results`` (which
    share their arrays) to None, so that the arrays' memory may go."""
    for result in results:
        for name in names:
            setattr(result, name, None)
