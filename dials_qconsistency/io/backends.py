"""Where the arrays come from and how the table goes back to disk.

Two backends feed the same numpy core (:mod:`dials_qconsistency.core`); they
differ only in reading:

- ``standalone``: this package's readers for ``.expt`` JSON and ``.refl``
  msgpack, and its own writer. Needs nothing of cctbx but ``libtbx.phil``.
- ``native``: inside a DIALS environment, DIALS' option parser, the dxtbx
  models and ``flex.reflection_table`` (:mod:`dials_qconsistency.io.native`);
  msgpack tables are written by the standalone writer, the rest by ``as_file``.

``backend=auto`` takes the native one when both ``dials`` and ``dxtbx`` can be
imported. Whether they can is decided without importing them: importing a
cctbx extension module after matplotlib can crash a process that has the
``cctbx-base`` wheel, so nothing of cctbx is imported unless it is used.

Both implement :class:`Backend`, and their tables :class:`Table` (a test
checks that they do, in full).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Protocol, runtime_checkable

from dials_qconsistency.errors import QConsistencyError

CHOICES = ("auto", "native", "standalone")


@runtime_checkable
class TableWrite(Protocol):
    """A table being written into a staged file (:meth:`Table.begin_write`)."""

    def put(self, name: str, type_name: str, values) -> None:
        """Hand over a new column: an array or a ``refl_writer.ColumnBlocks``."""

    def close(self) -> None:
        """No more columns: what is left may be written in the background."""

    def failed(self) -> bool:
        """Has writing already failed (the error is raised by :meth:`finish`)?"""

    def finish(self) -> None:
        """Close, and wait until everything is written; one-line
        QConsistencyError naming the file on failure."""


@runtime_checkable
class Table(Protocol):
    """A reflection table as the program uses it."""

    nrows: int
    identifiers: dict  # table id -> experiment identifier (may be empty: old tables)
    notes: list  # what the reader had to say about the file, for the log

    def __contains__(self, name: str) -> bool: ...

    def columns(self) -> dict:
        """Column name -> numpy array, for the columns the core reads."""

    def release_memory(self) -> None:
        """Let the input's pages go once the columns were read."""

    def release_rows(self, start: int, stop: int) -> None:
        """The same for the pages of rows ``start`` to ``stop`` only."""

    def set_column(self, name: str, type_name: str, values) -> None: ...

    def remove_column(self, name: str) -> None:
        """Leave a column out of the table and of what it writes."""

    def begin_write(self, outputs, path: str, new_columns: dict) -> TableWrite:
        """Start writing the table with ``new_columns`` (name -> DIALS type) as
        one of ``outputs``' (a ``staged.StagedOutputs``) files."""


@runtime_checkable
class Backend(Protocol):
    """Where the models and the table come from."""

    name: str

    def read_experiments(self, path: str):
        """``model.experiment.ExperimentList`` of an ``.expt``; QConsistencyError naming it."""

    def read_table(self, path: str) -> Table:
        """The table of a ``.refl``; QConsistencyError naming it."""


def dials_importable() -> bool:
    """Are DIALS and dxtbx installed (found, not imported)?"""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("dials", "dxtbx"))
    except (ImportError, ValueError):
        return False


def resolve(choice: str) -> str:
    """The backend a ``backend=`` choice means here: native or standalone.

    (libtbx.phil extracts the choice ``auto`` as its ``Auto`` object, whose
    string is "Auto".)
    """
    choice = str(choice).lower()
    if choice not in CHOICES:
        raise QConsistencyError(f"unknown backend {choice!r} (choose from {', '.join(CHOICES)})")
    if choice == "auto":
        return "native" if dials_importable() else "standalone"
    if choice == "native" and not dials_importable():
        raise QConsistencyError(
            "backend=native needs DIALS and dxtbx, which cannot be imported here "
            "(they come from conda-forge); use backend=standalone or auto"
        )
    return choice


class Standalone:
    """This package's own readers and writer (a :class:`Backend`)."""

    name = "standalone"

    @staticmethod
    def read_experiments(path):
        from dials_qconsistency.io.expt import read_experiments

        return read_experiments(path)

    @staticmethod
    def read_table(path):
        from dials_qconsistency.io.refl import ReflectionTable

        return ReflectionTable.from_file(path)


def read_pair(backend: Backend, experiments_path, reflections_path):
    """(model.experiment.ExperimentList, table) of one pair; what the table's reader had
    to say about the file joins the experiments' notes."""
    experiments = backend.read_experiments(experiments_path)
    table = backend.read_table(reflections_path)
    experiments.notes = list(experiments.notes) + list(table.notes)
    return experiments, table


def get(name: str) -> Backend:
    """The backend object of a resolved name."""
    if name == "native":
        from dials_qconsistency.io import native

        return native.Native
    return Standalone


@functools.lru_cache(maxsize=1)
def standard_input() -> str:
    """Standard input, read once (``--phil -``): the command line is parsed
    twice, once to choose the backend and once by it, and a second read would
    find it empty."""
    return sys.stdin.read()
