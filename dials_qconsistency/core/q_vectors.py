"""The numpy core: q_bragg, q_pixel and q_pred for every usable reflection.

Input is backend-neutral: a :class:`model.experiment.ExperimentList` and a mapping of
column name -> numpy array (plus the table's identifiers map). All vectors are
lab frame, Å⁻¹, no 2π. Loops run over experiments and panels, never over
reflections.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core.blocks import for_each_block, release_block, rows_by_group
from dials_qconsistency.core.panels import panel_pixel_to_millimetre, panel_q
from dials_qconsistency.core.row_statistics import direction_distance_rows, largest_distance
from dials_qconsistency.core.table_checks import (
    PHI_COLUMNS,
    POSITION_COLUMNS,
    LAUE_COLUMNS,
    REQUIRED_COLUMNS,
    check_columns,
    check_experiment,
    check_values,
    check_wavelengths,
    experiment_index,
    row_count,
)
from dials_qconsistency.core.time_of_flight import laue_setting, polychromatic_rows
from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.core.scan_varying import choose_model_state, integrate_setting, refinement_scan_point, scan_varying_states

#: Why a row was not used; index = code stored per row (0 = used).
REASONS = (
    "used",
    "not indexed (id < 0)",
    "Miller index is (0, 0, 0)",
    "not predicted (xyzcal.mm x = y = 0, as DIALS marks it)",
    "not observed (xyzobs x = y = 0)",
    "no Miller index (the table is not indexed)",
    "indexed, not used in refinement",
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
    q_pred: np.ndarray | None  # None once pipeline.check_pair has written and decomposed it
    reason: np.ndarray  # int8 code into REASONS
    experiment: np.ndarray  # experiment index per row, -1 if none
    q_pixel_calculated: np.ndarray  # q from xyzcal.mm (self-test of s1)
    #: |q_pixel at xyzobs.mm.value − q_pred| per row (self-test of s1), if the table has xyzobs.mm.value
    #: (None too once pipeline.check_pair has self-tested s1, as the next one)
    observed_to_pred: np.ndarray | None
    outside_scan: np.ndarray  # rows whose model state was clamped to the scan
    s0: np.ndarray  # (N, 3) incident beam vector used for each row
    rotation_axis: np.ndarray  # (N, 3) lab-frame rotation axis S·e (NaN for stills)
    position_mm: np.ndarray  # (N, 2) panel mm position behind q_pixel
    panel: np.ndarray  # (N,) panel index
    phi: np.ndarray  # (N,) rotation angle (rad) used for q_bragg (NaN for stills)
    notes: list[str] = field(default_factory=list)
    #: (N,) µs: the time of flight of the position behind q_pixel (its z), for
    #: the rows of time-of-flight experiments (NaN elsewhere); None without any.
    tof: np.ndarray | None = None
    #: The same as a direction, row_statistics.direction_distance_rows, for
    #: polychromatic rows (|s1| is a wavelength); None without any or without xyzobs.mm.value.
    observed_direction_to_pred: np.ndarray | None = None
    #: Still experiments whose rows' rotation angles vary: index -> (what the
    #: models lack, lowest and highest angle in degrees): rotation tables.
    turning_stills: dict = field(default_factory=dict)

    @classmethod
    def blank(cls, reason, experiment, panel, notes, observed=False, laue=False) -> "QResult":
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
            observed_to_pred=nan() if observed else None,
            outside_scan=np.zeros(n, dtype=bool),
            s0=nan(3),
            rotation_axis=nan(3),
            position_mm=nan(2),
            panel=panel,
            phi=nan(),
            notes=list(notes),
            observed_direction_to_pred=nan() if observed and laue else None,
        )

    @property
    def used(self) -> np.ndarray:
        return self.reason == USED

    def used_rows_by_experiment(self, count: int) -> list[np.ndarray]:
        """The used rows of each experiment 0..count-1 (:func:`rows_by_group`).
        Found anew at each call, not kept: at 10M rows they are 80 MB."""
        return rows_by_group(self.experiment, count, self.used)

    @property
    def delta_q(self) -> np.ndarray:
        return self.q_bragg - self.q_pixel


#: |q_pixel - q_pred| below this (Å⁻¹) means s1 ends at that position.
S1_MATCH_TOLERANCE = 1e-7


def s1_is_prediction(result, rows) -> bool:
    """Does the table's s1 end at xyzcal.mm for every row selected (a prediction)?"""
    d = largest_distance(result.q_pixel_calculated, result.q_pred, rows)
    return d is not None and d <= S1_MATCH_TOLERANCE


def compute_q(
    experiments, columns, identifiers, options: Options = None, path: str = None, experiments_path: str = None,
    release_input: Callable[[int, int], None] | None = None,
) -> QResult:
    """Compute q_bragg, q_pixel and q_pred for all rows of a table.

    ``release_input(start, stop)``, if given, is told when the rows start..stop
    have been read (a large block at a time), so that the table may let go of
    the pages holding them (``Table.release_rows``).

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
    n = row_count(columns, path)
    notes = getattr(experiments, "notes", [])
    if not any(name in columns for name in ("miller_index", "s1", "xyzcal.mm")):
        notes = list(notes) + ["the table has no miller_index, s1 or xyzcal.mm (spot-finding output?): nothing is indexed"]
        reason = np.full(n, NO_INDEXING, dtype=np.int8)
        return QResult.blank(reason, np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64), notes)
    position_column = POSITION_COLUMNS[options.q_pixel_source]
    phi_column = PHI_COLUMNS[options.phi]
    optional = ("xyzobs.mm.value",) if "xyzobs.mm.value" in columns else ()
    laue = LAUE_COLUMNS if any(e.is_laue for e in experiments) else ()
    for name in laue:
        if name not in columns:
            index = next(i for i, e in enumerate(experiments) if e.is_laue)
            raise QConsistencyError(f"has no {name!r} column, which the polychromatic beam of experiment {index} needs "
                                    "(each reflection's wavelength, as DIALS' Laue predictor writes it)", path)
    needed = list(dict.fromkeys(REQUIRED_COLUMNS + (position_column, phi_column) + optional + laue))
    check_columns(columns, needed, n, path)

    ids = np.asarray(columns["id"])
    xyzobs = columns.get("xyzobs.mm.value")
    table = TableColumns(
        hkl=np.asarray(columns["miller_index"]),
        s1=np.asarray(columns["s1"], dtype=float),
        panel=_as_int64(columns["panel"]),
        xyzcal=np.asarray(columns["xyzcal.mm"], dtype=float),
        xyzobs=None if xyzobs is None else np.asarray(xyzobs, dtype=float),
        position=np.asarray(columns[position_column], dtype=float),
        phi=np.asarray(columns[phi_column], dtype=float)[:, 2],
        wavelength=np.asarray(columns["wavelength_cal"], dtype=float) if laue else None,
        release=release_input,
    )
    hkl, panel, xyzcal, position = table.hkl, table.panel, table.xyzcal, table.position

    exp_of_row = experiment_index(ids, identifiers, experiments, path)
    reason = np.full(n, USED, dtype=np.int8)
    if options.q_pixel_source != "calculated":
        reason[(position[:, 0] == 0) & (position[:, 1] == 0)] = NOT_OBSERVED
    reason[(xyzcal[:, 0] == 0) & (xyzcal[:, 1] == 0)] = NOT_PREDICTED
    has_hkl = geometry.nonzero_rows(hkl)
    reason[~has_hkl] = ZERO_HKL
    reason[exp_of_row < 0] = NOT_INDEXED
    indexed = (exp_of_row >= 0) & has_hkl
    check_values(columns, [name for name in needed if name not in ("id", "miller_index", "panel")], indexed,
                 reason != NOT_PREDICTED, path, options.threads)

    result = QResult.blank(reason, exp_of_row, panel, notes, observed=table.xyzobs is not None, laue=bool(laue))
    for index, (experiment, rows) in enumerate(zip(experiments, rows_by_group(exp_of_row, len(experiments), reason == USED))):
        if rows.size == 0:
            continue
        check_experiment(experiment, index, panel, table.phi, rows, path, experiments_path or path)
        if experiment.is_laue:
            check_wavelengths(experiment, index, table.wavelength[rows], rows, path)
        if experiment.kind == "still":
            turning = _rotation_angles(table.phi[rows], experiment)
            if turning:
                result.turning_stills[index] = turning
        _compute_experiment(experiment, rows, table, options, result)
        if experiment.kind == "tof" and experiment.beam.sample_to_source_distance > 0:
            if result.tof is None:
                result.tof = np.full(n, np.nan)
            time = table.position[rows, 2]
            if options.q_pixel_source == "observed_px":  # a frame number: DIALS' frame -> time of flight
                times = experiment.scan.time_of_flight
                time = np.interp(time, np.arange(times.size), times)
            result.tof[rows] = time
    if laue and "s0_cal" in columns:
        result.notes.append(_s0_cal_note(np.asarray(columns["s0_cal"], dtype=float), result,
                                         polychromatic_rows(experiments, result.experiment)))
    return result


def _rotation_angles(phi, experiment) -> tuple[str, float, float] | None:
    """(what the models lack, lowest and highest angle in degrees) when the
    rows of a still ``experiment`` (no goniometer, no scan, or a scan that
    does not turn) have rotation angles (``phi``, radians) that vary: a
    rotation table; else None."""
    low, high = (float(np.degrees(v)) for v in (phi.min(), phi.max()))
    if low == high:
        return None
    lacks = [name for name, model in (("goniometer", experiment.goniometer), ("scan", experiment.scan)) if model is None]
    return (f"no {' and no '.join(lacks)}" if lacks else "a scan that does not turn"), low, high


def _s0_cal_note(s0_cal, result, laue) -> str:
    """How far the table's s0_cal is from the s0 used (−unit(direction)/wavelength_cal)
    on the polychromatic rows (``laue``, per row)."""
    used = np.flatnonzero(result.used & laue & geometry.finite_rows(result.s0))
    worst = float(np.max(np.linalg.norm(s0_cal[used] - result.s0[used], axis=1))) if used.size else 0.0
    verdict = "as it should" if worst <= S1_MATCH_TOLERANCE else "so the table's s0_cal is not this beam's: check the models"
    return (f"polychromatic beam: s0 of each row is -unit(direction)/wavelength_cal; the table's s0_cal agrees to "
            f"{worst:.2g} 1/Angstrom ({verdict})")


def _put(result, name, rows, values):
    """result.<name>[rows] = values, ``rows`` an index array or a slice; when
    ``rows`` is every row the computed array (or a read-only broadcast of one
    value) becomes the field, with no copy; values computed into the field
    (:func:`_field_view`) are left as they are."""
    target = getattr(result, name)
    if isinstance(rows, slice) and isinstance(values, np.ndarray) and values.base is target:
        return
    if isinstance(rows, np.ndarray) and rows.size == len(target):
        values = np.asarray(values, dtype=target.dtype)
        setattr(result, name, values if values.shape == target.shape else np.broadcast_to(values, target.shape))
    else:
        target[rows] = values


def _as_int64(values) -> np.ndarray:
    """An integer column as int64: DIALS' size_t (uint64) viewed, not copied
    (a value beyond 2**63 reads negative, and is refused as a panel either way)."""
    values = np.asarray(values)
    return values.view(np.int64) if values.dtype == np.uint64 else values.astype(np.int64)


def _field_view(result, name, rows):
    """result.<name>[rows] to compute into, when ``rows`` is a slice (a view);
    else None (the values are computed, then put in place)."""
    return getattr(result, name)[rows] if isinstance(rows, slice) else None


@dataclass
class TableColumns:
    """The columns compute_q reads, as float/int arrays (N rows)."""

    hkl: np.ndarray  # (N, 3) Miller indices
    s1: np.ndarray  # (N, 3) Å⁻¹
    panel: np.ndarray  # (N,) int64
    xyzcal: np.ndarray  # (N, 3) calculated position: mm, mm, rad
    xyzobs: np.ndarray | None  # (N, 3) observed position, if the table has it
    position: np.ndarray  # (N, 3) the position behind q_pixel (the q_pixel.source column)
    phi: np.ndarray  # (N,) rotation angle (rad) for q_bragg (the phi choice's column)
    wavelength: np.ndarray | None = None  # (N,) Å: wavelength_cal, for polychromatic experiments
    #: release(start, stop): rows start..stop were read, the input's pages holding them may go (None: keep them)
    release: Callable[[int, int], None] | None = None


def _compute_experiment(experiment, rows, table: TableColumns, options, result):
    """Every used row of one experiment, in blocks of :data:`BLOCK_ROWS` (on
    ``options.threads`` threads).

    What is the same for all its rows (a static model's s0 and rotation axis)
    is set once, as a broadcast when the experiment has every row; with
    ``q_pixel.source=calculated`` q_pixel_calculated is then q_pixel itself.
    """
    every = rows.size == len(table.hkl)  # one experiment, every row used: blocks are slices, no gathering
    varying = scan_varying_states(experiment) if experiment.is_rotation else None
    if not experiment.is_rotation:
        _put(result, "rotation_axis", rows, np.nan)  # stills: no axis, no φ
        _put(result, "phi", rows, np.nan)
    elif not varying:
        gonio = experiment.goniometer
        _put(result, "rotation_axis", rows, geometry.matvec(gonio.setting_rotation, gonio.axis))
    if not varying and not experiment.is_laue:  # polychromatic: s0 of each row's wavelength, in the blocks
        _put(result, "s0", rows, experiment.beam.s0)
    # Columns used as they are: views of the table's own columns when every row is used.
    views = set()
    if every and experiment.is_rotation:
        _put(result, "phi", rows, table.phi)
        views.add("phi")
    if every and options.q_pixel_source != "observed_px":
        _put(result, "position_mm", rows, table.position[:, :2])
        views.add("position_mm")
    alias = every and options.q_pixel_source == "calculated"
    def work(block):
        chosen = block if every else rows[block]
        _compute_block(experiment, varying, chosen, table, options, result, alias, views)
        release_block(table.release, chosen)

    for_each_block(rows.size, work, options.threads)
    if alias:
        result.q_pixel_calculated = result.q_pixel


def _compute_block(experiment, varying, rows, table: TableColumns, options, result, alias, views):
    """q_bragg, q_pixel, q_pred and the rest for ``rows`` (a slice or indices) of
    one experiment; the fields in ``views`` are already set for every row."""
    crystal, beam, detector = experiment.crystal, experiment.beam, experiment.detector
    take = lambda values: values[rows]
    h = take(table.hkl).astype(float)
    phi = take(table.phi)
    n = len(h)
    if experiment.is_laue:
        # DIALS' Laue predictor: q = S·F·A·h (the goniometer static), and s0_i = unit_s0 / λ_i
        s0 = beam.unit_s0 / take(table.wavelength)[:, None]
        _put(result, "s0", rows, s0)
        q_bragg = geometry.q_bragg_still(laue_setting(experiment), h)
    elif not experiment.is_rotation:
        s0 = np.broadcast_to(beam.s0, (n, 3))
        q_bragg = geometry.q_bragg_still(crystal.A, h)
    else:
        s0 = np.broadcast_to(beam.s0, (n, 3))
        gonio, scan = experiment.goniometer, experiment.scan
        if not varying:
            q_bragg = geometry.q_bragg_rotation(
                gonio.setting_rotation, gonio.axis, phi, gonio.fixed_rotation, crystal.A, h,
                out=_field_view(result, "q_bragg", rows),  # None: computed, then put in place
            )
        else:
            if options.model_state == "integrate":
                M, s0, S, outside = integrate_setting(experiment, varying, phi)
                q_bragg = geometry.matvec(M, h)
            else:
                phi_blocks = take(table.xyzobs[:, 2]) if table.xyzobs is not None else phi
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

    rows_panel = take(table.panel)
    position_mm = take(table.position[:, :2])
    if options.q_pixel_source == "observed_px":
        position_mm = panel_pixel_to_millimetre(detector, rows_panel, position_mm)
    q_pixel = panel_q(detector, rows_panel, position_mm, s0, out=_field_view(result, "q_pixel", rows))
    if "position_mm" not in views:
        _put(result, "position_mm", rows, position_mm)
    _put(result, "q_bragg", rows, q_bragg)
    _put(result, "q_pixel", rows, q_pixel)
    _put(result, "q_pred", rows, np.subtract(take(table.s1), s0, out=_field_view(result, "q_pred", rows)))
    if options.q_pixel_source == "calculated":
        if not alias:
            _put(result, "q_pixel_calculated", rows, q_pixel)
    else:
        _put(result, "q_pixel_calculated", rows, panel_q(detector, rows_panel, take(table.xyzcal[:, :2]), s0))
    if table.xyzobs is not None:
        observed = take(table.xyzobs[:, :2])
        finite = geometry.finite_rows(observed)
        if options.q_pixel_source == "observed":  # q_pixel is q at xyzobs.mm.value already
            q_obs = q_pixel
        elif finite.all():
            q_obs = panel_q(detector, rows_panel, observed, s0)
        else:
            q_obs = np.full((n, 3), np.nan)
            if finite.any():
                q_obs[finite] = panel_q(detector, rows_panel[finite], observed[finite], s0[finite])
        q_pred = result.q_pred[rows]  # only the distances are kept: 8 bytes a row, not the vectors' 24
        _put(result, "observed_to_pred", rows, geometry.norms(q_obs - q_pred))
        if experiment.is_laue:
            _put(result, "observed_direction_to_pred", rows, direction_distance_rows(q_obs, q_pred, s0))
