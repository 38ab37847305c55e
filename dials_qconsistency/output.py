"""New reflection-table columns from a :class:`compute.QResult` and its decomposition.

All lab frame, Å⁻¹ without 2π unless the name gives mm or rad; NaN in rows
not used. Input columns are never touched.

=========================  ==============  =============================================
column                     type            meaning
=========================  ==============  =============================================
q_bragg                    vec3<double>    S·R(φ)·F·A·h (rotation) or A·h (stills)
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
"""

from __future__ import annotations

import numpy as np

from .analysis import row_distances

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


def output_columns(result, parts) -> dict[str, tuple[str, np.ndarray]]:
    """Column name -> (DIALS type name, values)."""
    delta = result.delta_q
    rotation = parts.rotation
    nan = np.full(len(rotation), np.nan)
    if rotation.all():  # rotation data only: Δφ is the angle itself, no copy
        delphi, delpsi = parts.angle, nan
    elif not rotation.any():
        delphi, delpsi = nan, parts.angle
    else:
        delphi, delpsi = np.where(rotation, parts.angle, np.nan), np.where(rotation, np.nan, parts.angle)
    values = {
        "q_bragg": result.q_bragg,
        "q_pixel": result.q_pixel,
        "q_pred": result.q_pred,
        "delta_q": delta,
        "delta_q.norm": row_distances(delta),
        "delta_q.along_q": parts.along_q,
        "delta_q.delphi.rad": delphi,
        "delta_q.delpsi.rad": delpsi,
        "delta_q.xy.mm": parts.delta_xy,
        "delta_q.radial.mm": parts.radial_mm,
        "delta_q.transverse.mm": parts.transverse_mm,
        "delta_q.radial": parts.radial,
        "delta_q.transverse": parts.transverse,
    }
    return {name: (OUTPUT_TYPES[name], values[name]) for name in OUTPUT_TYPES}


def existing_output_columns(table) -> list[str]:
    """The output columns the input table already has (they are replaced)."""
    return [name for name in OUTPUT_COLUMNS if name in table]


def add_columns(table, result, parts) -> None:
    """Add (or replace) the output columns of a table."""
    for name, (type_name, values) in output_columns(result, parts).items():
        table.set_column(name, type_name, values)
