"""What the core needs of a reflection table, checked before it computes: the
columns and their shapes, finite numbers in the indexed rows, ids that map to
experiments, and panels and models that those experiments have. Every problem
is a one-line :class:`QConsistencyError` naming the file.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core.blocks import for_each_block
from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.model.experiment import MAX_MAGNITUDE


POSITION_COLUMNS = {
    "calculated": "xyzcal.mm",
    "observed": "xyzobs.mm.value",
    "observed_px": "xyzobs.px.value",
}


PHI_COLUMNS = {"calculated": "xyzcal.mm", "observed": "xyzobs.mm.value"}


REQUIRED_COLUMNS = ("id", "miller_index", "panel", "s1", "xyzcal.mm")

#: What a polychromatic (Laue, time-of-flight) experiment's rows need besides:
#: each reflection's own wavelength (Å), as DIALS' Laue predictor writes it.
LAUE_COLUMNS = ("wavelength_cal",)


#: Per-row shape each column the core reads must have.
COLUMN_SHAPES = {
    "id": (),
    "panel": (),
    "miller_index": (3,),
    "s1": (3,),
    "xyzcal.mm": (3,),
    "xyzobs.mm.value": (3,),
    "xyzobs.px.value": (3,),
    "wavelength_cal": (),
    "s0_cal": (3,),
}


def experiment_index(ids: np.ndarray, identifiers: dict, experiments, path: str = None) -> np.ndarray:
    """Map the table's ``id`` to positions in the experiment list.

    With an identifiers map, ids are matched through the identifier strings;
    with an empty map (old tables), ``id`` is the experiment index.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n_experiments = len(experiments)
    result = np.full(ids.shape, -1, dtype=np.int64)
    indexed = ids >= 0
    if not identifiers:
        beyond = indexed & (ids >= n_experiments)
        if beyond.any():
            raise QConsistencyError(
                f"id {int(ids[beyond].max())} is beyond the {n_experiments} experiment(s) "
                "in the experiment list",
                path,
            )
        result[indexed] = ids[indexed]
        return result
    names = list(experiments.identifiers())
    listed = Counter(names)
    position = {identifier: i for i, identifier in enumerate(names)}
    for table_id, identifier in sorted(identifiers.items()):
        if listed[identifier] > 1:  # the rows of all of them would go to the last
            raise QConsistencyError(
                f"identifier {identifier!r} of id {table_id} belongs to {listed[identifier]} experiments of the list: "
                "experiments and reflections cannot be matched", path)
    lookup = {table_id: position[identifier] for table_id, identifier in identifiers.items() if identifier in position}
    known = np.array(sorted(lookup), dtype=np.int64)  # table ids with an experiment, ascending
    positions = np.array([lookup[i] for i in known.tolist()], dtype=np.int64)
    largest = max(int(ids.max()), int(known[-1])) if known.size else -1
    if known.size and known[0] >= 0 and largest < 1 << 20:  # ids as DIALS numbers them (0, 1, ...): a lookup array
        table = np.full(largest + 1, -1, dtype=np.int64)
        table[known] = positions
        result = np.where(indexed, table[np.where(indexed, ids, 0)], -1)
    elif known.size:  # other ids: found by a search
        at = np.minimum(np.searchsorted(known, ids), known.size - 1)
        result = np.where(indexed & (known[at] == ids), positions[at], -1)
    missing = indexed & (result < 0)
    if missing.any():
        first = int(ids[missing].min())
        if first in identifiers:
            problem = f"identifier {identifiers[first]!r} of id {first} is not in the experiment list"
        else:
            problem = f"id {first} has no entry in the table's identifiers map"
        raise QConsistencyError(f"{problem}: experiments and reflections do not match", path)
    return result


def row_count(columns, path) -> int:
    """The number of rows; an empty table is an error (nothing can be checked)."""
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise QConsistencyError(f"columns have different lengths {sorted(lengths)}", path)
    n = lengths.pop() if lengths else 0
    if n == 0:
        raise QConsistencyError("has no reflections (an empty table): nothing to check", path)
    return n


def check_columns(columns, names, n, path):
    """Every column the core reads is present with N rows of its DIALS shape."""
    for name in names:
        if name not in columns:
            raise QConsistencyError(f"has no {name!r} column", path)
        shape = np.shape(columns[name])
        if shape != (n,) + COLUMN_SHAPES[name]:
            raise QConsistencyError(
                f"column {name!r} holds {_per_row(shape[1:])} per row, expected {_per_row(COLUMN_SHAPES[name])}", path
            )


def _per_row(shape) -> str:
    size = int(np.prod(shape, dtype=int))
    return "one number" if size == 1 and not shape else f"{size} numbers"


def check_values(columns, names, indexed, predicted, path, threads=1):
    """Indexed rows must carry finite numbers, and s1 = 0 only beside a
    ``predicted`` position (DIALS writes s1 = 0 only with xyzcal.mm = 0)."""
    arrays = [np.asarray(columns[name], dtype=float).reshape(len(indexed), -1) for name in names]
    bad = np.zeros((len(names), len(indexed)), dtype=bool)

    def work(block):  # rows of every column at once, a block at a time
        for values, out in zip(arrays, bad):
            with np.errstate(invalid="ignore"):  # NaN is not within the limit
                out[block] = ~geometry.rows_where_all(lambda v: np.abs(v) <= MAX_MAGNITUDE, values[block])

    for_each_block(len(indexed), work, threads)
    for name, rows in zip(names, bad):
        _reject_rows(indexed & rows, f"column {name!r} is NaN, infinite or beyond {MAX_MAGNITUDE:g}",
                     "the table is corrupt", path)
    s1 = np.asarray(columns["s1"], dtype=float)
    bad = indexed & predicted & ~geometry.nonzero_rows(s1)
    _reject_rows(
        bad,
        "column 's1' is (0, 0, 0) beside a calculated position",
        "DIALS writes s1 = 0 only beside xyzcal.mm = 0, so the table is corrupt",
        path,
    )


def _reject_rows(bad, problem, conclusion, path):
    """One line naming how many indexed rows are bad and the first of them."""
    if bad.any():
        rows = np.flatnonzero(bad)
        raise QConsistencyError(f"{problem} in {rows.size} indexed row(s) (first: row {rows[0]}); {conclusion}", path)


def check_wavelengths(experiment, index, wavelengths, rows, path):
    """A polychromatic experiment's indexed rows carry positive wavelengths."""
    bad = ~(np.asarray(wavelengths) > 0)
    if bad.any():
        first = int(np.asarray(rows)[np.flatnonzero(bad)[0]])
        raise QConsistencyError(
            f"column 'wavelength_cal' is zero or negative in {int(bad.sum())} indexed row(s) of experiment {index} "
            f"(first: row {first}); its polychromatic beam needs each reflection's wavelength", path)


def check_experiment(experiment, index, panel, phi, rows, path, experiments_path):
    """The models an experiment's used ``rows`` (row numbers) need are there and
    agree with the table's ``panel`` and ``phi`` columns (every row's)."""
    if experiment.crystal is None:
        raise QConsistencyError(f"experiment {index} has no crystal model, but {path} has indexed reflections for it", experiments_path)
    if experiment.beam is None or experiment.detector is None:
        raise QConsistencyError(f"experiment {index} has no beam or no detector model", experiments_path)
    n_panels = len(experiment.detector.panels)
    panels = panel if rows.size == len(panel) else panel[rows]  # every row: no gathering
    if panels.size and (panels.min() < 0 or panels.max() >= n_panels):
        beyond = (panels < 0) | (panels >= n_panels)
        raise QConsistencyError(
            f"panel {np.asarray(panels[beyond]).astype(np.uint64).max()} is beyond the {n_panels} panel(s) "
            f"of experiment {index}'s detector",
            path,
        )
    if experiment.goniometer is not None and experiment.scan is None and np.any(phi[rows] != 0):
        raise QConsistencyError(
            f"experiment {index} has a goniometer but no scan, yet its reflections in {path} have rotation "
            "angles (the scan is missing from the experiment list)",
            experiments_path,
        )

