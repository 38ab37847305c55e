"""The reflections the charts and figures of points show: at most
``max_points`` used rows, every k-th in table order (as dials.refine samples
reflections), taken once for both and copied out of the table, so that the
input's pages may go before anything is drawn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dials_qconsistency.core.row_statistics import sample_rows, take_rows


@dataclass
class PointSample:
    total: int  # used rows
    shown: int  # rows in the sample
    max_points: int | None  # the sample's limit (None or 0: every used row)
    points: object  # q_vectors.QResult of the rows shown
    parts: object  # decomposition.Decomposition of the same rows
    miller_index: np.ndarray | None  # (shown, 3), if asked for

    @property
    def sampled(self) -> bool:
        return self.shown < self.total


def point_sample(result, parts, max_points: int | None, miller_index=None) -> PointSample | None:
    """The :class:`PointSample` of ``result`` and its decomposition ``parts``
    (None when no row was used); ``miller_index``: the table's column, if the
    sample's indices are wanted."""
    if not result.used.any():
        return None
    shown = sample_rows(result.used, max_points)
    total = int(np.count_nonzero(result.used))
    n = len(result.reason)
    return PointSample(total, shown.size, max_points, take_rows(result, shown, n), take_rows(parts, shown, n),
                       None if miller_index is None else np.asarray(miller_index)[shown])
