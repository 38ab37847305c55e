"""Running many files: one after another, in ``nproc`` processes, or on MPI ranks.

Every runner returns the :class:`campaign.FileOutcome` of every file in file
order (MPI: on rank 0; the other ranks get None), so the merge and everything
written after it are the same whichever ran the files. After the first file
that fails, the files not yet started are skipped.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

from dials_qconsistency.batch.campaign import FileJob, FileOutcome, process_file

SKIPPED = "skipped after an earlier error"

_abort = None  # a multiprocessing.Event in each worker


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as taskset and batch systems set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(requested, processes: int = 1) -> int:
    """``mp.nthreads``: the number asked for, or for Auto (or None) the CPUs
    shared among ``processes`` processes on this machine (at least one each)."""
    if isinstance(requested, int):
        return requested
    return max(1, available_cpus() // max(1, processes))


def ranks_on_this_machine(comm) -> int:
    """How many ranks of ``comm`` share this machine (collective: every rank calls it)."""
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()


def _init_worker(event):
    """Workers die quietly when the run stops them; the parent handles Ctrl-C and
    removes what they left (forked workers would inherit its handlers)."""
    global _abort
    _abort = event
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _process_unless_aborted(job: FileJob) -> FileOutcome:
    if _abort is not None and _abort.is_set():
        return FileOutcome(job.index, job.experiments, job.reflections, job.output, error=SKIPPED)
    outcome = process_file(job)
    if outcome.error and _abort is not None:
        _abort.set()
    return outcome


def run_serial(jobs, on_done=None) -> list[FileOutcome]:
    outcomes = []
    for job in jobs:
        outcome = process_file(job) if not any(o.error for o in outcomes) else FileOutcome(
            job.index, job.experiments, job.reflections, job.output, error=SKIPPED
        )
        outcomes.append(outcome)
        if on_done:
            on_done(outcome)
    return outcomes


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def run_pool(jobs, nproc: int, on_done=None) -> list[FileOutcome]:
    """``nproc`` worker processes, one file at a time each; results in file order."""
    context = _context()
    event = context.Event()
    outcomes = []
    with context.Pool(nproc, initializer=_init_worker, initargs=(event,)) as pool:
        for outcome in pool.imap(_process_unless_aborted, jobs, chunksize=1):
            outcomes.append(outcome)
            if on_done:
                on_done(outcome)
    return outcomes


def mpi_world():
    """MPI.COMM_WORLD (mpi4py), or a one-line error saying what is missing."""
    from dials_qconsistency.errors import QConsistencyError

    try:
        from mpi4py import MPI
    except ImportError as error:
        raise QConsistencyError(
            f"mp.method=mpi needs mpi4py and an MPI library ({error}); "
            "install them (pip install mpi4py; apt install openmpi-bin) and start the program with mpirun"
        ) from None
    return MPI.COMM_WORLD


def run_mpi(jobs, comm, on_done=None):
    """Rank r takes files r, r + size, ...; rank 0 gathers every outcome in file order."""
    mine = run_serial(jobs[comm.Get_rank()::comm.Get_size()], on_done)
    gathered = comm.gather(mine, root=0)
    if comm.Get_rank() != 0:
        return None
    return sorted((o for part in gathered for o in part), key=lambda o: o.index)
