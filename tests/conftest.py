"""Shared fixtures: the real DIALS files in ../shared/data and the bundled example."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dials_qconsistency.compute import Options, compute_q
from dials_qconsistency.experiments import read_experiments
from dials_qconsistency.reflection_table import ReflectionTable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
EXAMPLES = os.path.join(REPO_ROOT, "examples")


#: Real pairs whose .expt and .refl share a name (so that pairing by name finds them).
REAL_PAIRS = [
    ("ssx_CuNiR_test_data", "indexed"),
    ("ssx_CuNiR_test_data", "integrated"),
    ("centroid_test_data", "indexed"),
    ("dials_current", "centroid_refined"),
    ("dials_current", "cspad_stills_refined"),
    ("quartz_processed", "refined"),
    ("quartz_processed", "integrated"),
]


@pytest.fixture
def shared():
    """Path builder for ../shared/data; skips when the folder is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real DIALS data folder {SHARED_DATA} is absent (CI always has it)")
    return lambda *parts: os.path.join(SHARED_DATA, *parts)


def load(expt_path, refl_path):
    experiments = read_experiments(expt_path)
    table = ReflectionTable.from_file(refl_path)
    return experiments, table, table.columns()


def run_core(expt_path, refl_path, **options):
    experiments, table, columns = load(expt_path, refl_path)
    result = compute_q(experiments, columns, table.identifiers, Options(**options))
    return experiments, table, columns, result


def max_norm(a, b):
    return float(np.max(np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1)))
