"""Shared fixtures: the real DIALS files in ../shared/data and the bundled example."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from dials_qconsistency.io.backends import dials_importable
from dials_qconsistency.core.q_vectors import Options, compute_q, with_model_state
from dials_qconsistency.io.expt import read_experiments
from dials_qconsistency.io.refl import ReflectionTable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)  # the simulation package: test data, not shipped with the program
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
EXAMPLES = os.path.join(REPO_ROOT, "examples")


#: Is DIALS (with dxtbx) importable here: is this the DIALS environment?
DIALS_HERE = dials_importable()

#: Both backends, for tests that hold for each: the native one needs DIALS.
BACKENDS = ["standalone", pytest.param("native", marks=pytest.mark.dials)]


#: What a test run may add below the repository root (caches, the venvs).
IGNORED_IN_TREE = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".venv", ".venv-dials", "build", "dist"}


def _tree():
    found = set()
    for root, folders, files in os.walk(REPO_ROOT):
        folders[:] = [f for f in folders if f not in IGNORED_IN_TREE and not f.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(root, name), REPO_ROOT) for name in files)
    return found


@pytest.fixture(scope="session", autouse=True)
def _working_tree_stays_clean():
    """No test writes into the repository: a file that appears there during the
    run fails it (tests write below tmp_path)."""
    before = _tree()
    yield
    added = sorted(_tree() - before)
    if added:
        pytest.fail(f"the tests wrote into the repository: {', '.join(added[:10])}", pytrace=False)


@pytest.fixture(autouse=True)
def _needs_dials(request):
    """A test marked ``dials`` needs DIALS: outside a DIALS environment it is
    skipped with that reason, or fails under CI=true (CI runs these tests
    inside DIALS; the plain run deselects them with -m "not dials")."""
    if DIALS_HERE or request.node.get_closest_marker("dials") is None:
        return
    reason = "needs DIALS and dxtbx (the native backend): run the suite inside DIALS (README.rst)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test inside DIALS: it {reason}")
    pytest.skip(reason)


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
    """compute_q on a pair, with the command's default model_state=auto."""
    experiments, table, columns = load(expt_path, refl_path)
    options = with_model_state(Options(**{"model_state": "auto", **options}), columns)
    result = compute_q(experiments, columns, table.identifiers, options)
    return experiments, table, columns, result


def max_norm(a, b):
    return float(np.max(np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1)))
