"""The numpy core: q_bragg, q_pixel and q_pred for every usable reflection.

Input is backend-neutral: a :class:`models.ExperimentList` and a mapping of
column name -> numpy array (plus the table's identifiers map). All vectors are
lab frame, Å⁻¹, no 2π. Loops run over experiments and panels, never over
reflections.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.model.scan_varying import choose_model_state, integrate_setting, refinement_scan_point, scan_varying_states
from dials_qconsistency.model.experiment import MAX_MAGNITUDE

#: Why a row was not used; index = code stored per row (0 = used).
REASONS = (
    "used",
    "not indexed (id < 0)",
    "Miller index is (0, 0, 0)",
    "not predicted (xyzcal.mm x = y = 0, as DIALS marks it)",
    "not observed (xyzobs x = y = 0)",
    "no Miller index (the table is not indexed)",
    "indexed, not used in refinement (outlier)",
)
USED, NOT_INDEXED, ZERO_HKL, NOT_PREDICTED, NOT_OBSERVED, NO_INDEXING, NOT_REFINED = range(len(REASONS))
#: DIALS' reflection flag used_in_refinement (flex.reflection_table.flags).
USED_IN_REFINEMENT = 1 << 3


def rows_used_in_refinement(result, flags, choice="used_in_refinement"):
    """(the result the statistics are about, the row numbers left out as outliers).

    With ``choice`` used_in_refinement and a table whose flags mark some used
    row used_in_refinement (what dials.refine leaves), the other used rows get
    the reason NOT_REFINED in a copy of ``reason`` (every array else shared):
    statistics, verdict, diagnosis and charts are then over the rows
    refinement used, as its RMSDs are. Otherwise (``indexed``, no flags
    column, or no row flagged) every used row stays, and no row is left out.
    """
    if choice != "used_in_refinement" or flags is None:
        return result, None
    used = result.used
    in_refinement = (np.asarray(flags) & USED_IN_REFINEMENT) != 0
    if not np.any(in_refinement & used):
        return result, None
    outliers = used & ~in_refinement
    reason = result.reason.copy()
    reason[outliers] = NOT_REFINED
    return replace(result, reason=reason), np.flatnonzero(outliers)

POSITION_COLUMNS = {
    "calculated": "xyzcal.mm",
    "observed": "xyzobs.mm.value",
    "observed_px": "xyzobs.px.value",
}
PHI_COLUMNS = {"calculated": "xyzcal.mm", "observed": "xyzobs.mm.value"}
REQUIRED_COLUMNS = ("id", "miller_index", "panel", "s1", "xyzcal.mm")
#: Per-row shape each column the core reads must have.
COLUMN_SHAPES = {
    "id": (),
    "panel": (),
    "miller_index": (3,),
    "s1": (3,),
    "xyzcal.mm": (3,),
    "xyzobs.mm.value": (3,),
    "xyzobs.px.value": (3,),
}


@dataclass
class Options:
    """Computation choices (mirrors the PHIL parameters of the command)."""

    q_pixel_source: str = "calculated"  # calculated | observed | observed_px
    model_state: str = "refinement"  # refinement | integrate | auto (see with_model_state)
    model_state_auto: bool = False  # the state was chosen from the table (model_state=auto)
    block_width: float = 1.0  # degrees, as dials.refine's block_width
    phi: str = "calculated"  # rotation angle for q_bragg: calculated (xyzcal.mm) | observed (xyzobs.mm.value)
    threads: int = 1  # blocks of rows computed at once (the results do not depend on it)


def with_model_state(options: Options, columns) -> Options:
    """``options`` with ``model_state=auto`` resolved for a table's columns."""
    state, auto = choose_model_state(options.model_state, columns.get("flags"))
    return replace(options, model_state=state, model_state_auto=auto)


@dataclass
class QResult:
    """Per-row results; rows not used hold NaN vectors."""

    q_bragg: np.ndarray
    q_pixel: np.ndarray
    q_pred: np.ndarray
    reason: np.ndarray  # int8 code into REASONS
    experiment: np.ndarray  # experiment index per row, -1 if none
    q_pixel_calculated: np.ndarray  # q from xyzcal.mm (self-test of s1)
    q_pixel_observed: np.ndarray | None  # q from xyzobs.mm.value, if present
    outside_scan: np.ndarray  # rows whose model state was clamped to the scan
    s0: np.ndarray  # (N, 3) incident beam vector used for each row
    rotation_axis: np.ndarray  # (N, 3) lab-frame rotation axis S·e (NaN for stills)
    position_mm: np.ndarray  # (N, 2) panel mm position behind q_pixel
    panel: np.ndarray  # (N,) panel index
    phi: np.ndarray  # (N,) rotation angle (rad) used for q_bragg (NaN for stills)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def blank(cls, reason, experiment, panel, notes, observed=False) -> "QResult":
        """Every vector NaN where a row will not be used; used rows are filled in
        as they are computed (so they are not written twice)."""
        n = len(reason)
        unused = np.asarray(reason) != USED

        def nan(*shape):
            values = np.empty((n,) + shape)
            values[unused] = np.nan
            return values

        return cls(
            q_bragg=nan(3),
            q_pixel=nan(3),
            q_pred=nan(3),
            reason=reason,
            experiment=experiment,
            q_pixel_calculated=nan(3),
            q_pixel_observed=nan(3) if observed else None,
            outside_scan=np.zeros(n, dtype=bool),
            s0=nan(3),
            rotation_axis=nan(3),
            position_mm=nan(2),
            panel=panel,
            phi=nan(),
            notes=list(notes),
        )

    @property
    def used(self) -> np.ndarray:
        return self.reason == USED

    @property
    def delta_q(self) -> np.ndarray:
        return self.q_bragg - self.q_pixel


#: |q_pixel - q_pred| below this (Å⁻¹) means s1 ends at that position.
S1_MATCH_TOLERANCE = 1e-7


def s1_is_prediction(result, rows) -> bool:
    """Does the table's s1 end at xyzcal.mm for every row selected (a prediction)?"""
    d = np.linalg.norm(result.q_pixel_calculated[rows] - result.q_pred[rows], axis=1)
    d = d[np.isfinite(d)]
    return bool(d.size) and float(d.max()) <= S1_MATCH_TOLERANCE


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
    position = {identifier: i for i, identifier in enumerate(experiments.identifiers())}
    lookup = {}
    for table_id, identifier in identifiers.items():
        if identifier in position:
            lookup[table_id] = position[identifier]
    used_ids = np.unique(ids[indexed])
    missing = [int(i) for i in used_ids if int(i) not in lookup]
    if missing:
        first = missing[0]
        if first in identifiers:
            problem = f"identifier {identifiers[first]!r} of id {first} is not in the experiment list"
        else:
            problem = f"id {first} has no entry in the table's identifiers map"
        raise QConsistencyError(f"{problem}: experiments and reflections do not match", path)
    table_ids = np.array(sorted(lookup), dtype=np.int64)  # every id of an indexed row is among them
    positions = np.array([lookup[i] for i in table_ids.tolist()], dtype=np.int64)
    rows = np.flatnonzero(indexed)
    result[rows] = positions[np.searchsorted(table_ids, ids[rows])]
    return result


def compute_q(
    experiments, columns, identifiers, options: Options = None, path: str = None, experiments_path: str = None
) -> QResult:
    """Compute q_bragg, q_pixel and q_pred for all rows of a table.

    Raises :class:`QConsistencyError` when the table cannot be used, naming
    ``path``: no rows, a missing or misshapen column, ids or panels that the
    experiment list does not have, or indexed rows whose numbers are corrupt
    (not finite, or s1 = 0 beside a calculated position); or naming
    ``experiments_path`` when an experiment lacks a model its rows need.
    """
    options = options or Options()
    if options.q_pixel_source not in POSITION_COLUMNS:
        raise QConsistencyError(f"unknown q_pixel source {options.q_pixel_source!r}")
    if options.phi not in PHI_COLUMNS:
        raise QConsistencyError(f"unknown phi choice {options.phi!r}")
    n = _row_count(columns, path)
    notes = getattr(experiments, "notes", [])
    if not any(name in columns for name in ("miller_index", "s1", "xyzcal.mm")):
        notes = list(notes) + ["the table has no miller_index, s1 or xyzcal.mm (spot-finding output?): nothing is indexed"]
        reason = np.full(n, NO_INDEXING, dtype=np.int8)
        return QResult.blank(reason, np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64), notes)
    position_column = POSITION_COLUMNS[options.q_pixel_source]
    phi_column = PHI_COLUMNS[options.phi]
    optional = ("xyzobs.mm.value",) if "xyzobs.mm.value" in columns else ()
    needed = list(dict.fromkeys(REQUIRED_COLUMNS + (position_column, phi_column) + optional))
    _check_columns(columns, needed, n, path)

    ids = np.asarray(columns["id"])
    hkl = np.asarray(columns["miller_index"])
    s1 = np.asarray(columns["s1"], dtype=float)
    panel = np.asarray(columns["panel"]).astype(np.int64)
    xyzcal = np.asarray(columns["xyzcal.mm"], dtype=float)
    position = np.asarray(columns[position_column], dtype=float)
    xyzobs = columns.get("xyzobs.mm.value")
    xyzobs = None if xyzobs is None else np.asarray(xyzobs, dtype=float)
    phi_all = np.asarray(columns[phi_column], dtype=float)[:, 2]

    exp_of_row = experiment_index(ids, identifiers, experiments, path)
    reason = np.full(n, USED, dtype=np.int8)
    if options.q_pixel_source != "calculated":
        reason[(position[:, 0] == 0) & (position[:, 1] == 0)] = NOT_OBSERVED
    reason[(xyzcal[:, 0] == 0) & (xyzcal[:, 1] == 0)] = NOT_PREDICTED
    reason[~np.any(hkl != 0, axis=1)] = ZERO_HKL
    reason[exp_of_row < 0] = NOT_INDEXED
    indexed = (exp_of_row >= 0) & np.any(hkl != 0, axis=1)
    _check_values(columns, [name for name in needed if name not in ("id", "miller_index", "panel")], indexed, reason,
                  path, options.threads)

    result = QResult.blank(reason, exp_of_row, panel, notes, observed=xyzobs is not None)
    for index, (experiment, rows) in enumerate(zip(experiments, rows_by_group(exp_of_row, len(experiments), reason == USED))):
        if rows.size == 0:
            continue
        _check_experiment(experiment, index, panel[rows], phi_all[rows], path, experiments_path or path)
        _compute_experiment(experiment, rows, hkl, s1, panel, xyzcal, xyzobs, position, phi_all, options, result)
    return result


def _row_count(columns, path) -> int:
    """The number of rows; an empty table is an error (nothing can be checked)."""
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise QConsistencyError(f"columns have different lengths {sorted(lengths)}", path)
    n = lengths.pop() if lengths else 0
    if n == 0:
        raise QConsistencyError("has no reflections (an empty table): nothing to check", path)
    return n


def _check_columns(columns, names, n, path):
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


def _check_values(columns, names, indexed, reason, path, threads=1):
    """Indexed rows must carry finite numbers, and s1 = 0 only where DIALS marks no prediction."""
    arrays = [np.asarray(columns[name], dtype=float) for name in names]
    bad = np.zeros((len(names), len(indexed)), dtype=bool)

    def work(block):  # rows of every column at once, a block at a time
        for values, out in zip(arrays, bad):
            with np.errstate(invalid="ignore"):
                out[block] = ~np.all(np.abs(values[block]) <= MAX_MAGNITUDE, axis=1)  # True for NaN too

    for_each_block(len(indexed), work, threads)
    for name, rows in zip(names, bad):
        _reject_rows(indexed & rows, f"column {name!r} is NaN, infinite or beyond {MAX_MAGNITUDE:g}",
                     "the table is corrupt", path)
    s1 = np.asarray(columns["s1"], dtype=float)
    bad = indexed & (reason != NOT_PREDICTED) & ~np.any(s1 != 0, axis=1)
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


def _check_experiment(experiment, index, panels, phi, path, experiments_path):
    """The models an experiment's used rows need are there and agree with the table."""
    if experiment.crystal is None:
        raise QConsistencyError(f"experiment {index} has no crystal model, but {path} has indexed reflections for it", experiments_path)
    if experiment.beam is None or experiment.detector is None:
        raise QConsistencyError(f"experiment {index} has no beam or no detector model", experiments_path)
    n_panels = len(experiment.detector.panels)
    beyond = (panels < 0) | (panels >= n_panels)
    if beyond.any():
        raise QConsistencyError(
            f"panel {np.asarray(panels[beyond]).astype(np.uint64).max()} is beyond the {n_panels} panel(s) "
            f"of experiment {index}'s detector",
            path,
        )
    if experiment.goniometer is not None and experiment.scan is None and np.any(phi != 0):
        raise QConsistencyError(
            f"experiment {index} has a goniometer but no scan, yet its reflections in {path} have rotation "
            "angles (the scan is missing from the experiment list)",
            experiments_path,
        )


def _panel_arrays(detector, panel_rows):
    """Per-row origin, fast, slow, pixel size, mu, thickness and parallax flag."""
    panels = detector.panels
    stack = lambda attr: np.array([getattr(p, attr) for p in panels], dtype=float)
    take = lambda array: array[panel_rows]
    return {
        "origin": take(stack("origin")),
        "fast": take(stack("fast")),
        "slow": take(stack("slow")),
        "pixel_size": take(stack("pixel_size")),
        "mu": take(stack("mu")),
        "thickness": take(stack("thickness")),
        "parallax": take(np.array([p.parallax for p in panels], dtype=bool)),
    }


def panel_groups(panel_rows):
    """(panel, row positions) for each panel in ``panel_rows``; one group with
    ``slice(None)`` when every row is on the same panel (no gathering then)."""
    panel_rows = np.asarray(panel_rows)
    if panel_rows.size and np.all(panel_rows == panel_rows[0]):
        return [(int(panel_rows[0]), slice(None))]
    order = np.argsort(panel_rows, kind="stable")
    panels, starts = np.unique(panel_rows[order], return_index=True)
    return [(int(p), rows) for p, rows in zip(panels, np.split(order, starts[1:]))]


def panel_millimetres(detector, panel_rows, xy_px):
    """Panel px (sub-pixel) -> panel mm (N, 2) with each row's panel mapping (parallax included).

    Panels read by the native backend map with dxtbx's own PxMmStrategy, one
    call per panel over all its rows.
    """
    if detector.panels[0].pixel_to_millimetre is not None:
        xy_px = np.asarray(xy_px, dtype=float)
        xy_mm = np.empty(xy_px.shape)
        for index, rows in panel_groups(panel_rows):
            xy_mm[rows] = detector.panels[index].pixel_to_millimetre(xy_px[rows])
        return xy_mm
    p = _panel_arrays(detector, panel_rows)
    return geometry.pixel_to_millimetre(
        xy_px, p["pixel_size"], p["origin"], p["fast"], p["slow"], p["mu"], p["thickness"], p["parallax"]
    )


def per_row_components(table, index) -> tuple:
    """The columns of ``table`` (one row per panel) for each row's ``index``:
    per-row arrays taken component by component (``np.take``: no sorting, no
    scattering), or the scalars of one table row when every row has the same."""
    index = np.asarray(index)
    if index.size and np.all(index == index[0]):
        return tuple(table[int(index[0])])
    return tuple(np.take(table[:, k], index) for k in range(table.shape[1]))


def panel_q(detector, panel_rows, xy_mm, s0):
    """q (N, 3) Å⁻¹ at panel positions (mm) on each row's panel, the same
    function dials.q_map evaluates at every pixel.

    Each row's panel vectors are looked up component by component (np.take on
    the few panels), so rows are neither sorted nor scattered; one panel's
    rows give the same bits as the map's scalar panel vectors.
    """
    xy_mm = np.asarray(xy_mm, dtype=float)
    table = np.array([[*p.origin, *p.fast, *p.slow] for p in detector.panels], dtype=float)
    vectors = per_row_components(table, panel_rows)
    lab = geometry.panel_points_to_lab(vectors[0:3], vectors[3:6], vectors[6:9], xy_mm[:, 0], xy_mm[:, 1])
    return np.stack(geometry.q_from_lab_components(*lab, s0), axis=-1)


def _put(result, name, rows, values):
    """result.<name>[rows] = values, ``rows`` an index array or a slice; when
    ``rows`` is every row the computed array (or a read-only broadcast of one
    value) becomes the field, with no copy."""
    target = getattr(result, name)
    if isinstance(rows, np.ndarray) and rows.size == len(target):
        values = np.asarray(values, dtype=target.dtype)
        setattr(result, name, values if values.shape == target.shape else np.broadcast_to(values, target.shape))
    else:
        target[rows] = values


#: Rows handled at a time by every per-row stage (compute_q, the decomposition,
#: the statistics' per-row values). A block's temporaries (1.5 MB for a vector
#: column) stay in the CPU's cache and reuse the heap memory the block before
#: freed; whole-table temporaries faulted in fresh pages on every operation,
#: which at 10M rows cost more than the arithmetic.
BLOCK_ROWS = 1 << 16


def rows_by_group(labels, count: int, select=None) -> list[np.ndarray]:
    """For each group 0..count-1, its row numbers (ascending) among the rows
    where ``select`` is True: one stable sort of the labels (none when they
    are already in order, as DIALS writes experiments), not a pass over the
    table per group, so that thousands of experiments cost no more than one."""
    rows = np.flatnonzero(select) if select is not None else np.arange(len(labels))
    label = np.asarray(labels)[rows]
    if count == 1:
        return [rows[label == 0]]
    inside = (label >= 0) & (label < count)
    if not inside.all():
        rows, label = rows[inside], label[inside]
    if label.size and np.any(label[1:] < label[:-1]):
        small = label.astype(np.int16 if count <= 2**15 else np.int32)  # 16-bit keys sort by radix: O(n)
        order = np.argsort(small, kind="stable")
        rows, label = rows[order], label[order]
    bounds = np.searchsorted(label, np.arange(count + 1))
    return [rows[bounds[i]:bounds[i + 1]] for i in range(count)]


def row_blocks(count: int) -> list[slice]:
    """Consecutive slices of at most :data:`BLOCK_ROWS` rows covering ``range(count)``."""
    return [slice(start, min(start + BLOCK_ROWS, count)) for start in range(0, count, BLOCK_ROWS)]


def for_each_block(count: int, work, threads: int = 1) -> None:
    """``work(block)`` for every slice of :func:`row_blocks`, on up to ``threads``
    threads (numpy releases the GIL in its loops). Each block must write only
    its own rows, so the results are the same bits whatever the thread count;
    an error in any block is raised here."""
    blocks = row_blocks(count)
    if threads <= 1 or len(blocks) <= 1:
        for block in blocks:
            work(block)
        return
    with ThreadPoolExecutor(min(threads, len(blocks))) as pool:
        for _ in pool.map(work, blocks):
            pass


def _compute_experiment(experiment, rows, hkl, s1, panel, xyzcal, xyzobs, position, phi_all, options, result):
    """Every used row of one experiment, in blocks of :data:`BLOCK_ROWS` (on
    ``options.threads`` threads).

    What is the same for all its rows (a static model's s0 and rotation axis)
    is set once, as a broadcast when the experiment has every row; with
    ``q_pixel.source=calculated`` q_pixel_calculated is then q_pixel itself.
    """
    every = rows.size == len(hkl)  # one experiment, every row used: blocks are slices, no gathering
    varying = scan_varying_states(experiment) if experiment.is_rotation else None
    if not experiment.is_rotation:
        _put(result, "rotation_axis", rows, np.nan)  # stills: no axis, no φ
        _put(result, "phi", rows, np.nan)
    elif not varying:
        gonio = experiment.goniometer
        _put(result, "rotation_axis", rows, geometry.matvec(gonio.setting_rotation, gonio.axis))
    if not varying:
        _put(result, "s0", rows, experiment.beam.s0)
    # Columns used as they are: views of the table's own columns when every row is used.
    views = set()
    if every and experiment.is_rotation:
        _put(result, "phi", rows, phi_all)
        views.add("phi")
    if every and options.q_pixel_source != "observed_px":
        _put(result, "position_mm", rows, position[:, :2])
        views.add("position_mm")
    alias = every and options.q_pixel_source == "calculated"
    def work(block):
        _compute_block(
            experiment, varying, block if every else rows[block], hkl, s1, panel, xyzcal, xyzobs, position,
            phi_all, options, result, alias, views,
        )

    for_each_block(rows.size, work, options.threads)
    if alias:
        result.q_pixel_calculated = result.q_pixel


def _compute_block(experiment, varying, rows, hkl, s1, panel, xyzcal, xyzobs, position, phi_all, options, result,
                   alias, views):
    """q_bragg, q_pixel, q_pred and the rest for ``rows`` (a slice or indices) of
    one experiment; the fields in ``views`` are already set for every row."""
    crystal, beam, detector = experiment.crystal, experiment.beam, experiment.detector
    take = lambda values: values[rows]
    h = take(hkl).astype(float)
    phi = take(phi_all)
    n = len(h)
    s0 = np.broadcast_to(beam.s0, (n, 3))

    if not experiment.is_rotation:
        q_bragg = geometry.q_bragg_still(crystal.A, h)
    else:
        gonio, scan = experiment.goniometer, experiment.scan
        if not varying:
            q_bragg = geometry.q_bragg_rotation(
                gonio.setting_rotation, gonio.axis, phi, gonio.fixed_rotation, crystal.A, h
            )
        else:
            if options.model_state == "integrate":
                M, s0, S, outside = integrate_setting(experiment, varying, phi)
                q_bragg = geometry.matvec(M, h)
            else:
                phi_blocks = take(xyzobs[:, 2]) if xyzobs is not None else phi
                block_point, outside = refinement_scan_point(scan, phi_blocks, options.block_width)
                point = np.clip(block_point, 0, scan.num_images)
                outside = outside | (point != block_point)
                S = varying["S"][point]
                s0 = varying["s0"][point]
                q_bragg = geometry.q_bragg_rotation(S, gonio.axis, phi, gonio.fixed_rotation, varying["A"][point], h)
            _put(result, "outside_scan", rows, outside)
            _put(result, "rotation_axis", rows, geometry.matvec(S, gonio.axis))
            _put(result, "s0", rows, s0)
        if "phi" not in views:
            _put(result, "phi", rows, phi)

    rows_panel = take(panel)
    position_mm = take(position[:, :2])
    if options.q_pixel_source == "observed_px":
        position_mm = panel_millimetres(detector, rows_panel, position_mm)
    q_pixel = panel_q(detector, rows_panel, position_mm, s0)
    if "position_mm" not in views:
        _put(result, "position_mm", rows, position_mm)
    _put(result, "q_bragg", rows, q_bragg)
    _put(result, "q_pixel", rows, q_pixel)
    _put(result, "q_pred", rows, take(s1) - s0)
    if options.q_pixel_source == "calculated":
        if not alias:
            _put(result, "q_pixel_calculated", rows, q_pixel)
    else:
        _put(result, "q_pixel_calculated", rows, panel_q(detector, rows_panel, take(xyzcal[:, :2]), s0))
    if xyzobs is not None:
        observed = take(xyzobs[:, :2])
        finite = np.all(np.isfinite(observed), axis=1)
        if finite.all():
            q_obs = panel_q(detector, rows_panel, observed, s0)
        else:
            q_obs = np.full((n, 3), np.nan)
            if finite.any():
                q_obs[finite] = panel_q(detector, rows_panel[finite], observed[finite], s0[finite])
        _put(result, "q_pixel_observed", rows, q_obs)
