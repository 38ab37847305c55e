"""Many pairs in one run: process each file alone, merge the statistics exactly.

A file is read, computed, written (to a staged temporary file) and reduced to
what the merge needs — its counts, its |Δq| statistics, per-image statistics
and the |Δq| of every used reflection (8 bytes each) — before the next file is
read, so memory is the largest single table plus those 8 bytes a reflection.
The merged statistics are those of the concatenation of every file's |Δq| in
file order: exact (numpy's median and linear 95th percentile of all values, no
sketch or approximation), and bit-identical whether the files were processed
one after another, by ``nproc`` processes or by MPI ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from dials_qconsistency.core.pipeline import PairSettings, check_pair, load_pair
from dials_qconsistency.core.q_vectors import REASONS
from dials_qconsistency.core.row_statistics import grouped_statistics, norm_statistics, row_distances
from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.io.staged import StagedOutputs

STATISTICS = ("n", "mean", "median", "rms", "p95", "max")


@dataclass
class FileJob:
    index: int
    experiments: str
    reflections: str
    output: str | None  # the output table, or None for none
    options: object  # q_vectors.Options
    temporary_prefix: str  # staged files of this run start with it
    backend: str = "standalone"  # resolved: native | standalone
    settings: PairSettings = field(default_factory=lambda: PairSettings(diagnose=False))


@dataclass
class FileOutcome:
    index: int
    experiments: str
    reflections: str
    output: str | None
    staged: str | None = None  # the temporary file that becomes ``output``
    n_rows: int = 0
    counts: dict = field(default_factory=dict)
    delta_q: dict = field(default_factory=dict)
    verdict: str = ""
    reason: str = ""  # why inconsistent: the file's first reason (its self-tests)
    rotation: bool = False  # has rotation data (a rotation angle is used)
    scan_varying: bool = False  # has a model varying along its scan
    s1: list = field(default_factory=list)
    norms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    images: list = field(default_factory=list)
    error: str | None = None  # a one-line error: the run fails, nothing is written


def image_keys(experiments, result, rows, release_input=None):
    """(experiment index, image number or -1 for stills) of each row.

    The image of a rotation reflection is the one its φ (the angle q_bragg
    used) falls in, clamped to the scan; a still is its experiment.
    ``release_input()`` (if given) is told once the angles have been read
    (``result.phi`` is a view of the table's column when every row is used).
    """
    experiment = result.experiment[rows].astype(np.int64)
    image = np.full(rows.size, -1, dtype=np.int64)
    present = np.flatnonzero(np.bincount(experiment, minlength=len(experiments)))
    sweeps = [int(index) for index in present if experiments[int(index)].is_rotation]
    phi = result.phi[rows] if sweeps else None  # stills keep image -1: only the few sweeps read their angles
    if release_input is not None:
        release_input()
    for index in sweeps:
        mine = experiment == index
        if mine.all():  # one sweep: no row gathered twice
            image = experiments[index].scan.image_numbers(phi)
        else:
            image[mine] = experiments[index].scan.image_numbers(phi[mine])
    return experiment, image


def per_image_statistics(experiments, result, norms, release_input=None) -> list[dict]:
    """|Δq| statistics per (experiment, image), without a loop over images;
    ``norms``: |Δq| of the used rows, in row order; ``release_input()`` (if
    given) once the rows' angles have been read (:func:`image_keys`)."""
    rows = np.flatnonzero(result.used)
    if rows.size == 0:
        return []
    experiment, image = image_keys(experiments, result, rows, release_input)
    span = int(image.max()) + 2
    experiment *= span
    experiment += image + 1  # the (experiment, image) key, in place: no more arrays of every row than needed
    del image
    keys, stats = grouped_statistics(experiment, norms)
    out = []
    for i, key in enumerate(keys):
        index, image_number = divmod(int(key), span)
        entry = {"experiment": index, "identifier": experiments[index].identifier,
                 "image": image_number - 1 if image_number > 0 else None}
        entry.update({name: (int(stats[name][i]) if name == "n" else float(stats[name][i])) for name in STATISTICS})
        out.append(entry)
    return out


def process_file(job: FileJob) -> FileOutcome:
    """Read, compute and stage one pair; reduce it to what the merge needs.

    Errors come back in ``error`` (and nothing of this file stays on disk), so
    that parallel workers and MPI ranks always report.
    """
    outcome = FileOutcome(job.index, job.experiments, job.reflections, job.output)
    staged = StagedOutputs(prefix=job.temporary_prefix)
    try:
        pair = load_pair(job.backend, job.experiments, job.reflections, job.options, job.settings.rows, staged,
                         job.output)
        checked = check_pair(pair, staged, job.output, job.settings)  # the precision checks; no diagnosis per file
        describe(outcome, pair.experiments, pair.table, pair.about, checked.summary, checked.verdict)
        if job.output:
            ((outcome.staged, _),) = staged.detach()
    except QConsistencyError as error:
        staged.abort()
        outcome.error = str(error)
    except BaseException:
        staged.abort()  # stops the table's writer and removes its file
        raise
    return outcome


def describe(outcome: FileOutcome, experiments, table, result, summary, verdict=None) -> None:
    """Fill in what the merge, the JSON and the CSV files need of one file."""
    outcome.n_rows = table.nrows
    outcome.counts = summary.counts
    outcome.delta_q = summary.delta_q
    outcome.verdict = summary.verdict
    outcome.reason = verdict.reasons[0] if verdict is not None and verdict.reasons else ""
    outcome.rotation = any(e.is_rotation for e in experiments)
    outcome.scan_varying = any(e.is_rotation and e.is_scan_varying for e in experiments)
    outcome.s1 = sorted({e.s1_kind for e in summary.experiments})
    outcome.norms = row_distances(result.q_bragg, result.q_pixel, np.flatnonzero(result.used))  # a block at a time
    outcome.images = per_image_statistics(experiments, result, outcome.norms, table.release_memory)


@dataclass
class Merged:
    """Counts and |Δq| statistics of every file together."""

    n_files: int
    n_rows: int
    counts: dict
    delta_q: dict
    verdict: str


def merge(outcomes: list[FileOutcome]) -> Merged:
    """Exact merged statistics: of all used |Δq| concatenated in file order."""
    outcomes = sorted(outcomes, key=lambda o: o.index)
    counts = {reason: sum(o.counts.get(reason, 0) for o in outcomes) for reason in REASONS}
    norms = np.concatenate([o.norms for o in outcomes]) if outcomes else np.zeros(0)
    delta_q = norm_statistics(norms)
    inconsistent = sum(o.verdict == "inconsistent" for o in outcomes)
    verdict = ("nothing to compare" if not delta_q["n"] else
               f"inconsistent in {inconsistent} of {len(outcomes)} files" if inconsistent else "consistent")
    return Merged(len(outcomes), sum(o.n_rows for o in outcomes), counts, delta_q, verdict)


def file_record(outcome: FileOutcome) -> dict:
    """One file's summary, as the JSON report and the per-file CSV give it."""
    return {
        "index": outcome.index,
        "experiments": outcome.experiments,
        "reflections": outcome.reflections,
        "output": outcome.output,
        "rows": outcome.n_rows,
        "counts": outcome.counts,
        "delta_q": outcome.delta_q,
        "verdict": outcome.verdict,
        "reason": outcome.reason,
        "s1": outcome.s1,
    }


def temporary_prefix() -> str:
    """Staged files of this run (and its workers) start with this: after a hard
    stop the run can find and remove whatever a killed worker left."""
    return f".tmp-q_consistency-{os.getpid()}-"
