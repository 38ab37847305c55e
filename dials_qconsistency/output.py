"""New reflection-table columns from a :class:`compute.QResult`.

Columns (lab frame, Å⁻¹, no 2π; NaN in rows not used): ``q_bragg``,
``q_pixel``, ``q_pred``, ``delta_q`` = q_bragg - q_pixel (vec3<double>) and
``delta_q.norm`` (double). Input columns are never touched.
"""

from __future__ import annotations

import numpy as np

OUTPUT_COLUMNS = ("q_bragg", "q_pixel", "q_pred", "delta_q", "delta_q.norm")


def output_columns(result) -> dict[str, tuple[str, np.ndarray]]:
    """Column name -> (DIALS type name, values)."""
    delta = result.delta_q
    return {
        "q_bragg": ("vec3<double>", result.q_bragg),
        "q_pixel": ("vec3<double>", result.q_pixel),
        "q_pred": ("vec3<double>", result.q_pred),
        "delta_q": ("vec3<double>", delta),
        "delta_q.norm": ("double", np.linalg.norm(delta, axis=1)),
    }


def add_columns(table, result) -> list[str]:
    """Add the output columns to a standalone table; return replaced names."""
    replaced = [name for name in OUTPUT_COLUMNS if name in table]
    for name, (type_name, values) in output_columns(result).items():
        table.set_column(name, type_name, values)
    return replaced
