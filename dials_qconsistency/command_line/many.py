"""dials.q_consistency over many pairs: per-file tables, merged statistics, CSV.

Used when several pairs are given (or ``mp.method=mpi``). Each file is read,
computed and staged on its own (one process per file with ``nproc``, the
files split between ranks with MPI); the merge, the log, the JSON and the CSV
files come from the one process (rank 0) that has every file's outcome. Table
outputs are committed together with the summary, or not at all.
"""

from __future__ import annotations

import dataclasses
import os

from dials_qconsistency import __version__
from dials_qconsistency.batch.campaign import FileJob, file_record, merge, temporary_prefix
from dials_qconsistency.core.pipeline import PairSettings
from dials_qconsistency.report import html as html_report
from dials_qconsistency.core.verdict import campaign_verdict, gate_failure
from dials_qconsistency.errors import GateFailed, QConsistencyError
from dials_qconsistency.io.staged import StagedOutputs, remove_leftovers
from dials_qconsistency.io.pairing import output_table_names, partner_note
from dials_qconsistency.batch.parallel import (
    SKIPPED,
    mpi_world,
    ranks_on_this_machine,
    run_mpi,
    run_pool,
    run_serial,
    threads_per_process,
)
from dials_qconsistency.batch.progress import Progress
from dials_qconsistency.report.text import (
    json_bytes,
    verdict_text,
    campaign_text,
    file_line,
    per_file_csv,
    per_image_csv,
)

from .program import (
    Terminated,
    check_output_paths,
    close_logging,
    interruption_line,
    log_header,
    log_to_file_only,
    setup_logging,
)


def table_outputs(params, pairs) -> list:
    """The output table of each pair (None when tables are switched off)."""
    if not params.output.reflections:
        return [None] * len(pairs)
    if len(pairs) == 1:
        return [params.output.reflections]
    return output_table_names([refl for _, refl in pairs], params.output.reflections)


def summary_outputs(params) -> dict:
    return {
        f"output.{name}": getattr(params.output, name)
        for name in ("html", "json", "per_file_csv", "per_image_csv", "log")
        if getattr(params.output, name)
    }


def run_many(params, arguments, pairs, options, logger) -> int:
    """Process every pair; returns the exit status (MPI ranks other than 0 return
    rank 0's status without printing)."""
    comm = mpi_world() if params.mp.method == "mpi" else None
    root = comm is None or comm.Get_rank() == 0
    processes = ranks_on_this_machine(comm) if comm is not None else min(params.nproc, len(pairs))
    options = dataclasses.replace(options, threads=threads_per_process(params.mp.nthreads, processes))
    tables = table_outputs(params, pairs)
    outputs = {f"output.reflections (file {i}, {refl})": table
               for i, ((_, refl), table) in enumerate(zip(pairs, tables)) if table}
    outputs.update(summary_outputs(params))
    try:
        check_output_paths(outputs, [path for pair in pairs for path in pair])
    except QConsistencyError:
        if root:
            raise
        return 1

    settings = PairSettings(params.rows, params.statistics.resolution_shells, params.statistics.panel_group_depth,
                            diagnose=False)  # the precision checks only: no diagnosis per file
    prefix = temporary_prefix() if comm is None else comm.bcast(temporary_prefix(), root=0)
    jobs = [
        FileJob(i, expt, refl, table, options, prefix, arguments.backend, settings)
        for i, ((expt, refl), table) in enumerate(zip(pairs, tables))
    ]
    if root:
        setup_logging(logger, params.output.log, arguments)
    status = 0
    staged = StagedOutputs()
    try:
        if root:
            log_header(logger, "dials.q_consistency", __version__, arguments)
            workers = f"{comm.Get_size()} MPI ranks" if comm else f"{params.nproc} process(es)"
            logger.info(f"{len(pairs)} pairs of files, {workers}")
        status = _process_and_write(params, jobs, comm, options, logger, staged)
    except QConsistencyError as error:
        if root:
            log_to_file_only(logger, f"\nError: {error}")
        status = error
    except (KeyboardInterrupt, Terminated) as interruption:
        if root:
            log_to_file_only(logger, interruption_line(interruption, staged))
        raise
    except GateFailed as failure:
        status = failure
    finally:
        if root:  # only rank 0 commits, so only it may clear what a stopped worker left
            close_logging(logger)
            remove_leftovers({os.path.dirname(os.path.abspath(t)) for t in tables if t}, prefix)
    if comm is not None:
        code = comm.bcast(_code(status) if root else None, root=0)
        if not root:
            return code
    if isinstance(status, BaseException):
        raise status
    return status


def _code(status) -> int:
    if isinstance(status, GateFailed):
        return 2
    return 1 if isinstance(status, BaseException) else int(status)


def _process_and_write(params, jobs, comm, options, logger, staged) -> int:
    """Run the jobs and, on the root, write the merged outputs into ``staged``
    (a ``StagedOutputs``, committed here)."""
    root = comm is None or comm.Get_rank() == 0
    progress = Progress(len(jobs) if comm is None else len(jobs[comm.Get_rank()::comm.Get_size()])) if root else None

    def done(outcome):
        if root:
            if not outcome.error:
                log_to_file_only(logger, file_line(outcome))
            progress.update(1, outcome.n_rows)

    with staged:
        try:
            if comm is not None:
                outcomes = run_mpi(jobs, comm, done)
            elif params.nproc > 1:
                outcomes = run_pool(jobs, params.nproc, done)
            else:
                outcomes = run_serial(jobs, done)
        finally:
            if progress is not None:
                progress.close()
        if not root:
            return 0
        for outcome in outcomes:
            if outcome.staged:
                staged.adopt(outcome.staged, outcome.output)
        failed = [o for o in outcomes if o.error and o.error != SKIPPED]
        if failed:
            first = failed[0]
            raise QConsistencyError(first.error + ("" if first.error.startswith(first.experiments)
                                                   else partner_note(first.experiments, first.reflections)))
        merged = merge(outcomes)
        verdict = campaign_verdict(merged)
        logger.info(verdict_text(verdict) + "\n")
        every_file = ", ".join(["the log"] + [name for name, path in (("the HTML report", params.output.html),
                                                                          ("the JSON", params.output.json),
                                                                          ("the CSV", params.output.per_file_csv)) if path])
        logger.info(campaign_text(merged, outcomes, options, every_file=every_file))
        logger.info("\nFigures, the residual analysis and the diagnosis are made for one pair at a time.")
        if params.output.json:
            report = {
                "verdict": verdict.as_dict(),
                "program": "dials.q_consistency",
                "version": __version__,
                "merged": {"files": merged.n_files, "rows": merged.n_rows, "counts": merged.counts,
                           "delta_q": merged.delta_q, "verdict": merged.verdict},
                "files": [file_record(o) for o in outcomes],
                "images": [{"file": o.index, **image} for o in outcomes for image in o.images],
            }
            staged.add(params.output.json, json_bytes(report))
        if params.output.per_file_csv:
            staged.add(params.output.per_file_csv, per_file_csv(outcomes))
        if params.output.html:
            staged.add(params.output.html, html_report.campaign_page(merged, outcomes, verdict, options,
                                                                     params.output.external_dependencies))
        if params.output.per_image_csv:
            staged.add(params.output.per_image_csv, per_image_csv(outcomes))
        staged.commit()
    written = sum(1 for o in outcomes if o.output)
    if written:
        logger.info(f"\nSaved {written} tables with the q columns ({outcomes[0].output} ...)")
    for name in ("html", "json", "per_file_csv", "per_image_csv"):
        if getattr(params.output, name):
            logger.info(f"Saved {getattr(params.output, name)}")
    gate = gate_failure(merged.delta_q, params.fail_if, verdict)
    if gate:
        logger.info(f"\nfail_if: {gate}")
        raise GateFailed(gate)
    return 0
