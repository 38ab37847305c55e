"""Choosing the backend, in any environment.

The native backend itself is tested against the real DIALS in
tests/test_native_backend.py. Here: how ``backend=`` resolves with DIALS
present or not (find_spec faked), how the command line is read before any
file is, and mapping pixels through a per-panel callable, as the native
backend's panels do with dxtbx's mapping.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from dials_qconsistency.io import backends
from dials_qconsistency.core.panels import panel_pixel_to_millimetre
from dials_qconsistency.core.q_vectors import Options, compute_q
from dials_qconsistency.core.geometry import pixel_to_millimetre
from conftest import EXAMPLES, REPO_ROOT, load


def fake_find_spec(present):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name in ("dials", "dxtbx"):
            return object() if present else None
        return real(name, *args)

    return find_spec


@pytest.mark.parametrize("present, expected", [(True, "native"), (False, "standalone")])
def test_auto_takes_native_exactly_when_dials_and_dxtbx_are_found(monkeypatch, present, expected):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(present))
    assert backends.resolve("auto") == expected
    assert backends.resolve("standalone") == "standalone"


def test_native_without_dials_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(False))
    with pytest.raises(Exception) as error:
        backends.resolve("native")
    assert "backend=native needs DIALS and dxtbx" in str(error.value)


def test_backend_choice_is_read_from_words_and_phil_files(tmp_path):
    from dials_qconsistency.command_line.program import peek_backend
    from dials_qconsistency.command_line.q_consistency import phil_scope

    phil = tmp_path / "choice.phil"
    phil.write_text("backend = standalone\n")
    def choice(args):
        backend, _, error = peek_backend(args, phil_scope)
        return str(backend).lower(), None if error is None else str(error)

    assert choice(["backend=native", "-v"]) == ("native", None)
    assert choice(["-c", "-e", "1", "backend=native"]) == ("native", None)  # DIALS' -e N
    assert choice([str(phil)]) == ("standalone", None)
    assert choice(["missing.txt"]) == ("auto", "missing.txt: file not found")
    assert choice(["nproc=0"])[1].startswith("bad parameter")
    # libtbx says "Unknown command line parameter definition: param = 3", the last part of the name only
    assert choice(["nosuch.param=3"])[1] == ("bad parameter 'nosuch.param=3': there is no parameter 'nosuch.param' "
                                             "(-c -e1 lists them all)")
    assert choice(["nosuch.param = 3"])[1].endswith("there is no parameter 'nosuch.param' (-c -e1 lists them all)")
    assert choice(["output { nosuch=3 }"])[1] == ("bad parameter 'output { nosuch=3 }': Unknown command line "
                                                  "parameter definition: nosuch = 3")  # libtbx's own words
    assert choice(["-e", "x"]) == ("auto", "option -e needs a whole number")
    assert choice([]) == ("auto", None)  # libtbx.phil's Auto
    _, arguments, _ = peek_backend(["a.expt", "b.refl", "-a", "2", "-vv"], phil_scope)
    assert (arguments.experiments, arguments.reflections) == (["a.expt"], ["b.refl"])
    assert arguments.levels == {"attributes_level": 2, "expert_level": 0} and arguments.verbosity == 2


def test_command_refuses_native_without_dials_and_writes_nothing(tmp_path):
    """In a process where DIALS cannot be found (find_spec hides it, in either environment)."""
    example = os.path.join(EXAMPLES, "stills")
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name in ('dials', 'dxtbx') else real(name, *a)\n"
        "from dials_qconsistency.command_line.q_consistency import main\n"
        f"sys.exit(main([{example + '.expt'!r}, {example + '.refl'!r}, 'backend=native']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "backend=native needs DIALS and dxtbx" in done.stderr
    assert os.listdir(tmp_path) == []


def test_log_names_the_backend(tmp_path):
    from dials_qconsistency.command_line.q_consistency import run

    example = os.path.join(EXAMPLES, "rotation")
    os.chdir(tmp_path)
    run([example + ".expt", example + ".refl", "backend=standalone", "output.plots=None"])
    assert "(standalone backend)" in (tmp_path / "dials.q_consistency.log").read_text().splitlines()[0]


# -- the per-panel pixel mapping the native backend plugs in -----------------------


def test_per_panel_pixel_mapping_callables_are_used_row_by_panel(shared):
    """The native path maps px -> mm by each panel's own callable (dxtbx's
    panel.pixel_to_millimeter); on 64 CSPAD panels, rows must reach their own
    panel's mapping and come back in place."""
    experiments, table, columns = load(
        shared("dials_current", "cspad_stills_refined.expt"), shared("dials_current", "cspad_stills_refined.refl")
    )
    detector = experiments[0].detector
    rows = table.get("panel").astype(np.int64)
    xy_px = table.get("xyzobs.px.value")[:, :2]
    expected = panel_pixel_to_millimetre(detector, rows, xy_px)
    calls = []

    def mapping_of(panel, index):
        def mapping(xy):
            calls.append(index)
            return pixel_to_millimetre(xy, panel.pixel_size, panel.origin, panel.fast, panel.slow,
                                       panel.mu, panel.thickness, panel.parallax)
        return mapping

    for index, panel in enumerate(detector.panels):
        panel.pixel_to_millimetre = mapping_of(panel, index)
    np.testing.assert_array_equal(panel_pixel_to_millimetre(detector, rows, xy_px), expected)
    assert sorted(calls) == sorted(set(rows.tolist())) and len(set(rows.tolist())) > 32
    result = compute_q(experiments, columns, table.identifiers, Options(q_pixel_source="observed_px"))
    at_mm = compute_q(experiments, columns, table.identifiers, Options(q_pixel_source="observed"))  # xyzobs.mm.value
    assert np.nanmax(np.linalg.norm(result.q_pixel - at_mm.q_pixel, axis=1)) < 1e-12




def _protocol_members(protocol) -> dict:
    """Name -> parameter names (None for a data attribute) of a Protocol's members."""
    import inspect

    members = {name: None for name in getattr(protocol, "__annotations__", {})}
    for name, value in vars(protocol).items():
        if callable(value) and (not name.startswith("_") or name == "__contains__"):
            members[name] = list(inspect.signature(value).parameters)
    return members


def _check_implements(obj, protocol):
    """Every member of ``protocol`` on ``obj``, methods with the same parameters."""
    import inspect

    owner = obj if isinstance(obj, type) else type(obj)  # a backend is a class of static methods
    assert isinstance(obj, protocol), f"{owner.__name__} is not a {protocol.__name__}"
    for name, parameters in _protocol_members(protocol).items():
        assert hasattr(obj, name), f"{owner.__name__} lacks {name}"
        if parameters is not None:
            implemented = list(inspect.signature(getattr(owner, name)).parameters)
            if isinstance(inspect.getattr_static(owner, name), staticmethod):
                implemented = ["self"] + implemented
            assert implemented == parameters, (owner.__name__, name, implemented, parameters)


@pytest.mark.parametrize("name", ["standalone", pytest.param("native", marks=pytest.mark.dials)])
def test_each_backend_implements_the_interface_in_full(name, tmp_path):
    """Backend, Table and TableWrite (io.backends) as typing.Protocols: the
    backend object, a table it reads and a write it starts have every member,
    methods with the same parameters; a member missing from a backend fails
    here, not in a user's run."""
    from dials_qconsistency.io.staged import StagedOutputs

    assert len(_protocol_members(backends.Table)) == 10 and len(_protocol_members(backends.Backend)) == 3
    backend = backends.get(name)
    _check_implements(backend, backends.Backend)
    experiments, table = backends.read_pair(backend, os.path.join(EXAMPLES, "rotation.expt"),
                                            os.path.join(EXAMPLES, "rotation.refl"))
    assert len(experiments) == 1 and table.nrows == 1432 and table.notes == []
    _check_implements(table, backends.Table)
    with StagedOutputs() as outputs:
        write = table.begin_write(outputs, str(tmp_path / "out.refl"), {"q_extra": "vec3<double>"})
        _check_implements(write, backends.TableWrite)
        write.put("q_extra", "vec3<double>", np.zeros((table.nrows, 3)))
        write.finish()
        outputs.commit()
    assert os.path.getsize(tmp_path / "out.refl") > os.path.getsize(os.path.join(EXAMPLES, "rotation.refl"))
