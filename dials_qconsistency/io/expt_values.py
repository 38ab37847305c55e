"""The numbers of an .expt checked as they are read: finite, of plausible size,
of the right count; a unit direction; one line (:class:`ModelProblem`) naming
what is wrong, which the reader prefixes with the model it is in.
"""

from __future__ import annotations

import math

import numpy as np

from dials_qconsistency.model.experiment import MAX_MAGNITUDE

class ModelProblem(Exception):
    """Internal: a problem inside one model, re-raised with the file name."""


def as_vector(values, n=3) -> np.ndarray:
    if type(values) is list and len(values) == n and all(type(v) is float or type(v) is int for v in values):
        # the usual case, checked in Python: a detector hierarchy has hundreds of these
        if all(math.isfinite(v) and abs(v) <= MAX_MAGNITUDE for v in values):
            return np.array(values, dtype=float)
    array = np.asarray(values, dtype=float)
    if array.shape != (n,):
        raise ModelProblem(f"expected {n} numbers, got {values!r:.60}")
    if not np.all(np.isfinite(array)):
        raise ModelProblem(f"holds a number that is not finite: {values!r:.60}")
    if np.any(np.abs(array) > MAX_MAGNITUDE):
        raise ModelProblem(f"holds a number too large for a model: {values!r:.60}")
    return array


def as_direction(values) -> np.ndarray:
    """A unit vector from three model numbers; a zero vector has no direction."""
    vector = as_vector(values)
    length = math.sqrt(vector.dot(vector))  # np.linalg.norm's own sum, without its overhead
    if not length > 1e-12:
        raise ModelProblem(f"has a direction of zero length: {values!r:.60}")
    return vector / length


def as_number(value) -> float:
    """One finite model number of plausible size."""
    return float(as_vector([value], 1)[0])


def as_scan_points(values, shape) -> np.ndarray | None:
    """A model's per-scan-point values (finite), or None when absent."""
    if not values:
        return None
    array = np.asarray(values, dtype=float).reshape((-1,) + shape)
    if not np.all(np.isfinite(array)) or np.any(np.abs(array) > MAX_MAGNITUDE):
        raise ModelProblem("has scan-point values that are not finite or too large")
    return array


def as_matrix(values) -> np.ndarray:
    return as_vector(values, 9).reshape(3, 3)

