"""Shared fixtures: the real DIALS files in ../shared/data and the bundled example."""

from __future__ import annotations

import json
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


MODEL_LISTS = ("beam", "detector", "goniometer", "scan", "crystal", "imageset", "profile", "scaling_model")


def joined_pairs(tmp_path, pairs, change=None, unique_identifiers=False):
    """One .expt and .refl of several pairs' experiments, in order (the models'
    lists and the table's ids offset, the columns every table has, identifiers
    kept, or made unique: ``x0``, ``x1``, ... for a pair given twice);
    ``change(document, offsets)`` edits the joined document."""
    joined = {"__id__": "ExperimentList", "experiment": [], **{key: [] for key in MODEL_LISTS}}
    tables, offsets = [], []
    for expt, refl in pairs:
        document = json.load(open(expt))
        offsets.append(len(joined["experiment"]))
        starts = {key: len(joined[key]) for key in MODEL_LISTS}
        for key in MODEL_LISTS:
            joined[key] += document.get(key, [])
        for experiment in document["experiment"]:
            joined["experiment"].append({k: v + starts[k] if k in starts and isinstance(v, int) else v
                                         for k, v in experiment.items()})
        tables.append(ReflectionTable.from_file(refl))
    if change:
        change(joined, offsets)
    if unique_identifiers:
        for index, experiment in enumerate(joined["experiment"]):
            experiment["identifier"] = f"x{index}"
    names = [n for n in tables[0].keys() if all(n in t for t in tables[1:]) and n != "id"]
    identifiers = {i + offset: name for t, offset in zip(tables, offsets) for i, name in t.identifiers.items()}
    if unique_identifiers:
        identifiers = {i: f"x{i}" for i in identifiers}
    table = ReflectionTable(sum(t.nrows for t in tables), identifiers)
    ids = [np.where(t.get("id") >= 0, t.get("id") + offset, t.get("id")) for t, offset in zip(tables, offsets)]
    table.set_column("id", "int", np.concatenate(ids))
    for name in names:
        try:
            values = [t.get(name) for t in tables]
        except TypeError:  # shoeboxes: not needed here
            continue
        table.set_column(name, tables[0].column_type(name), np.concatenate(values))
    (tmp_path / "joined.expt").write_text(json.dumps(joined))
    table.write(str(tmp_path / "joined.refl"))
    return str(tmp_path / "joined.expt"), str(tmp_path / "joined.refl")
