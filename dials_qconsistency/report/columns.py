"""New reflection-table columns from a :class:`q_vectors.QResult` and its decomposition.

All lab frame, Å⁻¹ without 2π unless the name gives mm or rad; NaN in rows
not used. Input columns are never touched.

=========================  ==============  =============================================
column                     type            meaning
=========================  ==============  =============================================
q_bragg                    vec3<double>    S·R(φ)·F·A·h (rotation), A·h (stills) or
                                           S·F·A·h (polychromatic)
q_pixel                    vec3<double>    k_out - k_in at the spot position used
q_pred                     vec3<double>    s1 - s0 from the table
delta_q                    vec3<double>    q_bragg - q_pixel
delta_q.norm               double          |delta_q|
delta_q.along_q            double          |q_bragg| - |q_pixel| (an error in |q|)
delta_q.delphi.rad         double          rotation onto the Ewald sphere about S·e
                                           (rotation data; NaN for stills)
delta_q.delpsi.rad         double          Δψ onto the sphere, DIALS' delpsical.rad
                                           convention (stills; NaN for rotation data)
delta_q.xy.mm              vec2<double>    model spot - q_pixel spot on the panel
                                           (fast, slow), = xyzcal.mm - xyzobs.mm for a
                                           consistent model and observed positions
delta_q.radial.mm          double          that residual along the radial direction about
                                           the beam centre (DIALS' r_resid)
delta_q.transverse.mm      double          and across it (DIALS' t_resid)
delta_q.radial             double          model spot - q_pixel along increasing 2θ
delta_q.transverse         double          ... along unit(ŝ1 × ŝ0)
=========================  ==============  =============================================

Tables with polychromatic (Laue, time-of-flight) experiments gain two more
(NaN in the other rows):

=========================  ==============  =============================================
delta_q.wavelength_rel     double          (λ_b − λ)/λ: λ_b the wavelength at which
                                           q_bragg diffracts, λ that of the position's
                                           time of flight
delta_q.tof.us             double          t(λ_b) − the position's time of flight (µs)
=========================  ==============  =============================================
"""

from __future__ import annotations

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.io.refl_writer import ColumnBlocks

#: Column name -> DIALS type name, in the order of the table above.
OUTPUT_TYPES = {
    "q_bragg": "vec3<double>",
    "q_pixel": "vec3<double>",
    "q_pred": "vec3<double>",
    "delta_q": "vec3<double>",
    "delta_q.norm": "double",
    "delta_q.along_q": "double",
    "delta_q.delphi.rad": "double",
    "delta_q.delpsi.rad": "double",
    "delta_q.xy.mm": "vec2<double>",
    "delta_q.radial.mm": "double",
    "delta_q.transverse.mm": "double",
    "delta_q.radial": "double",
    "delta_q.transverse": "double",
}
OUTPUT_COLUMNS = tuple(OUTPUT_TYPES)

#: The columns only tables with polychromatic experiments gain.
LAUE_OUTPUT_TYPES = {
    "delta_q.wavelength_rel": "double",
    "delta_q.tof.us": "double",
}


def output_types(time_parts: bool) -> dict[str, str]:
    """The new columns of a table: name -> DIALS type; ``time_parts``: with the
    wavelength and time-of-flight parts (:func:`decomposition.laue_rows`)."""
    return {**OUTPUT_TYPES, **(LAUE_OUTPUT_TYPES if time_parts else {})}



def q_columns(result) -> dict[str, tuple[str, object]]:
    """The columns known once the q vectors are: name -> (DIALS type name,
    values). The q vectors are compute_q's own arrays; Δq and |Δq| are made a
    block of rows at a time (:class:`ColumnBlocks`), never held whole."""
    q_bragg, q_pixel = result.q_bragg, result.q_pixel
    values = {
        "q_bragg": q_bragg,
        "q_pixel": q_pixel,
        "q_pred": result.q_pred,
        "delta_q": ColumnBlocks(lambda rows: q_bragg[rows] - q_pixel[rows]),
        "delta_q.norm": ColumnBlocks(lambda rows: geometry.norms(q_bragg[rows] - q_pixel[rows])),
    }
    return {name: (OUTPUT_TYPES[name], column) for name, column in values.items()}


def decomposition_columns(parts) -> dict[str, tuple[str, object]]:
    """The columns of the decomposition of Δq, the same way: its own arrays,
    and Δφ/Δψ (NaN for the other kind of data) by blocks where not the angle itself."""
    rotation, angle = parts.rotation, parts.angle

    def only(where):
        return ColumnBlocks(lambda rows: np.where(where[rows], angle[rows], np.nan))

    if rotation.all():  # rotation data only: Δφ is the angle itself
        delphi, delpsi = angle, only(~rotation)
    elif not rotation.any():
        delphi, delpsi = only(rotation), angle
    else:
        delphi, delpsi = only(rotation), only(~rotation)
    values = {
        "delta_q.along_q": parts.along_q,
        "delta_q.delphi.rad": delphi,
        "delta_q.delpsi.rad": delpsi,
        "delta_q.xy.mm": parts.delta_xy,
        "delta_q.radial.mm": parts.radial_mm,
        "delta_q.transverse.mm": parts.transverse_mm,
        "delta_q.radial": parts.radial,
        "delta_q.transverse": parts.transverse,
    }
    if parts.wavelength_rel is not None:
        values.update({"delta_q.wavelength_rel": parts.wavelength_rel, "delta_q.tof.us": parts.tof_us})
    types = output_types(parts.wavelength_rel is not None)
    return {name: (types[name], column) for name, column in values.items()}


def output_columns(result, parts) -> dict[str, tuple[str, object]]:
    """Every output column: name -> (DIALS type name, values), in table order."""
    columns = {**q_columns(result), **decomposition_columns(parts)}
    return {name: columns[name] for name in output_types(parts.wavelength_rel is not None)}


def existing_output_columns(table) -> list[str]:
    """The output columns the input table already has (an earlier run's): each
    is replaced, or removed when this run does not write it (:func:`stale_output_columns`)."""
    return [name for name in (*OUTPUT_COLUMNS, *LAUE_OUTPUT_TYPES) if name in table]


def stale_output_columns(table, new_columns) -> list[str]:
    """The time-of-flight parts an earlier run on polychromatic data left in the
    table, which this run, writing ``new_columns``, does not: removed from the
    output rather than left with values these data did not give."""
    return [name for name in LAUE_OUTPUT_TYPES if name in table and name not in new_columns]


def existing_columns_note(existing, time_parts: bool) -> str:
    """What became of the output columns the input already had (``existing``),
    the output written with or without the time-of-flight parts."""
    written = output_types(time_parts)
    replaced, removed = [n for n in existing if n in written], [n for n in existing if n not in written]
    said = ([f"{', '.join(replaced)}: replaced"] if replaced else []) + (
        [f"{', '.join(removed)}: removed (no polychromatic rows, so no time-of-flight parts)"] if removed else [])
    return f"Note: the input already had {'; '.join(said)}"


def put_columns(writer, columns) -> None:
    """Hand ``columns`` (:func:`q_columns`, :func:`decomposition_columns`) to
    a table being written (``begin_write``)."""
    for name, (type_name, values) in columns.items():
        writer.put(name, type_name, values)
