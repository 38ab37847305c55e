"""A corpus of malformed and awkward inputs, made from the real DIALS files.

Every malformed case must end with exit status 1 and exactly one line on
stderr that names the offending file and the problem, with no traceback, no
file left in the working folder (not even the log: inputs are checked before
anything is written) and every input file unchanged (sha256). The awkward but
legitimate cases must give the right numbers.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys

import msgpack
import numpy as np
import pytest

from dials_qconsistency.report import figures as plots
from dials_qconsistency.command_line.q_consistency import main
from dials_qconsistency.core.q_vectors import NOT_INDEXED, NOT_PREDICTED, REASONS
from dials_qconsistency.io.refl import ReflectionTable
from conftest import BACKENDS, REPO_ROOT, SHARED_DATA, run_core
from test_command_line import run_command, sha

QUARTZ = ("quartz_processed", "refined")  # scan-varying rotation, one experiment
SSX = ("ssx_CuNiR_test_data", "indexed")  # five stills with shoeboxes


def shared_path(pair, ext):
    return os.path.join(SHARED_DATA, pair[0], pair[1] + ext)


def table_object(pair=QUARTZ):
    return msgpack.unpackb(open(shared_path(pair, ".refl"), "rb").read(), raw=False, strict_map_key=False)


#: numpy dtype and per-row shape of the columns the cases change
COLUMN_LAYOUT = {"s1": ("<f8", 3), "xyzcal.mm": ("<f8", 3), "xyzobs.mm.value": ("<f8", 3), "panel": ("<u8", 1), "id": ("<i4", 1)}


def column(obj, name):
    """A writable numpy copy of a fixed-size column of a decoded table."""
    dtype, width = COLUMN_LAYOUT[name]
    values = np.frombuffer(obj[2]["data"][name][1][1], dtype=dtype).copy()
    return values.reshape(-1, 3) if width == 3 else values


def set_column(obj, name, values):
    obj[2]["data"][name][1][1] = np.ascontiguousarray(values).tobytes()


def first_used_row(obj):
    """A row that is indexed and predicted in the quartz table."""
    return int(np.flatnonzero((column(obj, "id") >= 0) & (column(obj, "xyzcal.mm")[:, 0] != 0))[0])


def one_value_changed(folder, name, value, index=(), identifiers=None):
    """The quartz table with ``name[row][index] = value`` in its first used row,
    written to the case folder: (arguments, table path, row)."""
    obj = table_object()
    if identifiers is not None:
        obj[2]["identifiers"] = identifiers
    values = column(obj, name)
    row = first_used_row(obj)
    values[(row,) + tuple(index)] = value
    set_column(obj, name, values)
    args, path = refl_object(folder, obj)
    return args, path, row


def expt_document(pair=QUARTZ):
    return json.load(open(shared_path(pair, ".expt")))


# -- the cases ---------------------------------------------------------------------------
# Each builder gets the case folder and returns (arguments, the file the message must name,
# a fragment of the message). Files it writes are the case's inputs.

CASES = {}


def case(name):
    def register(builder):
        CASES[name] = builder
        return builder
    return register


def refl_bytes(folder, payload, name="bad.refl", pair=QUARTZ):
    path = os.path.join(folder, name)
    open(path, "wb").write(payload)
    return [shared_path(pair, ".expt"), path], path


def refl_object(folder, obj, pair=QUARTZ, name="bad.refl"):
    return refl_bytes(folder, msgpack.packb(obj, use_bin_type=True), name, pair)


def expt_json(folder, document, pair=QUARTZ):
    path = os.path.join(folder, "bad.expt")
    open(path, "w").write(json.dumps(document) if not isinstance(document, str) else document)
    return [path, shared_path(pair, ".refl")], path


def copy_of(source, folder, name):
    """A real file copied into the case folder under another name."""
    path = os.path.join(folder, name)
    shutil.copy(source, path)
    return path


def raw_quartz():
    return open(shared_path(QUARTZ, ".refl"), "rb").read()


@case("truncated msgpack")
def _(folder):
    args, path = refl_bytes(folder, raw_quartz()[: len(raw_quartz()) // 2])
    return args, path, "is truncated or not a msgpack reflection table"


@case("truncated inside the header")
def _(folder):
    args, path = refl_bytes(folder, raw_quartz()[:40])
    return args, path, "is truncated"


@case("wrong leading magic")
def _(folder):
    args, path = refl_bytes(folder, b"\x00" + raw_quartz()[1:])
    return args, path, "is not a DIALS reflection table (not msgpack)"


@case("an HDF5 file named .refl")
def _(folder):
    args, path = refl_bytes(folder, b"\x89HDF\r\n\x1a\n" + bytes(64))
    return args, path, "is not a DIALS reflection table (an HDF5 file, not msgpack)"


@case("a gzip-compressed table")
def _(folder):
    args, path = refl_bytes(folder, gzip.compress(raw_quartz()))
    return args, path, "is not a DIALS reflection table (gzip-compressed: gunzip it first)"


@case("experiment list and table swapped")
def _(folder):
    path = copy_of(shared_path(QUARTZ, ".expt"), folder, "swapped.refl")
    return [shared_path(QUARTZ, ".expt"), path], path, "(JSON text (an experiment list?), not msgpack)"


@case("pickle from old DIALS")
def _(folder):
    args, path = refl_bytes(folder, pickle.dumps({"miller_index": [(1, 2, 3)]}, protocol=2))
    return args, path, (
        "is a Python pickle (the reflection-table format of older DIALS versions), not msgpack; convert it with DIALS"
        f", which still reads pickles: dials.python -c \"from dials.array_family import flex; "
        f"flex.reflection_table.from_file('{path}').as_file('bad_msgpack.refl')\""
    )


@case("empty file")
def _(folder):
    args, path = refl_bytes(folder, b"")
    return args, path, "is empty, not a reflection table"


@case("trailing bytes")
def _(folder):
    args, path = refl_bytes(folder, raw_quartz() + b"\xc0")
    return args, path, "has trailing bytes after the reflection table"


@case("msgpack that is not a table")
def _(folder):
    args, path = refl_object(folder, ["dials::something_else", 1, {}])
    return args, path, "no dials::af::reflection_table header"


@case("an unknown parameter in a PHIL file")
def _(folder):
    path = os.path.join(folder, "bad.phil")
    open(path, "w").write("output.json = qc.json\nnosuch.param = 3\n")
    return [shared_path(QUARTZ, ".expt"), shared_path(QUARTZ, ".refl"), path], path, (
        "line 2: there is no parameter 'nosuch.param' (-c -e1 lists them all)")


@case("a zero block width")
def _(folder):
    """0 divided the scan into blocks (ZeroDivisionError); 1e-9 asked for 745 GiB."""
    return [shared_path(QUARTZ, ".expt"), shared_path(QUARTZ, ".refl"), "scan_varying.block_width=0"], None, (
        "scan_varying.block_width element is less than the minimum allowed value: 0 < 0.001")


#: Cases that change one node of the decoded quartz table: (name, path to the node,
#: new value or a function of the old one, message fragment or a function of the
#: unchanged table giving it).
TABLE_EDITS = [
    ("header not a map", (2,), [1, 2, 3], "reflection table header is not a map"),
    ("unknown column type", (2, "data", "rlp", 0), "vec3<float>", "column 'rlp': unknown column type 'vec3<float>'"),
    ("nrows disagrees with a column", (2, "nrows"), 506, "has 505 rows but the table has 506"),
    ("blob of the wrong length", (2, "data", "s1", 1, 1), lambda blob: blob[:-8],
     "column 's1': blob is 12112 bytes, expected 12120 for 505 rows of vec3<double>"),
    ("truncated shoebox blob", (2, "data", "shoebox", 1, 1), lambda blob: blob[:-100],
     lambda obj: (f"column 'shoebox': shoebox blob is {len(obj[2]['data']['shoebox'][1][1]) - 100} bytes, "
                  f"its 505 rows need {len(obj[2]['data']['shoebox'][1][1])}")),
    ("unsupported table version", (1,), 3, "reflection table version 3 is not supported (1 or 2 are)"),
]


DELETE = object()


def apply_edit(document, keys, value):
    """Set (or with DELETE remove) the node at ``keys``; a callable value maps the old one."""
    parent = document
    for key in keys[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = value(parent[keys[-1]]) if callable(value) else value


def _edited_table(keys, value, fragment):
    def build(folder):
        obj = table_object()
        expected = fragment(obj) if callable(fragment) else fragment
        apply_edit(obj, keys, value)
        args, path = refl_object(folder, obj)
        return args, path, expected
    return build


for _name, _keys, _value, _fragment in TABLE_EDITS:
    case(_name)(_edited_table(_keys, _value, _fragment))


def _without(name):
    def build(folder):
        obj = table_object()
        del obj[2]["data"][name]
        args, path = refl_object(folder, obj)
        return args, path, f"has no {name!r} column"
    return build


for _name in ("miller_index", "id", "s1", "xyzcal.mm", "panel"):
    case(f"no {_name} column")(_without(_name))


@case("no xyzobs.mm.value with q_pixel.source=observed")
def _(folder):
    args, path, message = _without("xyzobs.mm.value")(folder)
    return args + ["q_pixel.source=observed"], path, message


@case("a column of the wrong shape")
def _(folder):
    obj = table_object()
    entry = obj[2]["data"]["s1"]
    entry[0], entry[1][1] = "double", entry[1][1][: 505 * 8]
    args, path = refl_object(folder, obj)
    return args, path, "column 's1' holds one number per row, expected 3 numbers"


@case("id beyond the experiment list (no identifiers)")
def _(folder):
    args, path, _ = one_value_changed(folder, "id", 4, identifiers={})
    return args, path, "id 4 is beyond the 1 experiment(s) in the experiment list"


@case("id missing from the identifiers map")
def _(folder):
    args, path, _ = one_value_changed(folder, "id", 7)
    return args, path, "id 7 has no entry in the table's identifiers map"


@case("identifiers that do not match the .expt")
def _(folder):
    obj = table_object()
    obj[2]["identifiers"] = {0: "00000000-not-this-experiment"}
    args, path = refl_object(folder, obj)
    return args, path, "identifier '00000000-not-this-experiment' of id 0 is not in the experiment list"


@case("one identifier for several experiments")
def _(folder):
    """The CuNiR stills' experiments 1-4 and their ids all given the identifier
    '': their rows went to experiment 4, whose crystal was then blamed."""
    document = json.load(open(shared_path(SSX, ".expt")))
    for experiment in document["experiment"][1:]:
        experiment["identifier"] = ""
    expt = os.path.join(folder, "shared_identifier.expt")
    open(expt, "w").write(json.dumps(document))
    obj = msgpack.unpackb(open(shared_path(SSX, ".refl"), "rb").read(), strict_map_key=False, raw=False)
    obj[2]["identifiers"] = {k: (v if k == 0 else "") for k, v in obj[2]["identifiers"].items()}
    args, path = refl_object(folder, obj, pair=SSX)
    return [expt, path], path, ("identifier '' of id 1 belongs to 4 experiments of the list: experiments and "
                                "reflections cannot be matched")


@case("panel beyond the detector")
def _(folder):
    args, path, _ = one_value_changed(folder, "panel", 3)
    return args, path, "panel 3 is beyond the 1 panel(s) of experiment 0's detector"


@case("panel number that wraps negative")
def _(folder):
    args, path, _ = one_value_changed(folder, "panel", np.iinfo(np.uint64).max)
    return args, path, f"panel {np.iinfo(np.uint64).max} is beyond the 1 panel(s)"


def _bad_number(name, value, extra=()):
    def build(folder):
        args, path, row = one_value_changed(folder, name, value, index=(1,))
        return args + list(extra), path, f"column {name!r} is NaN, infinite or beyond 1e+10 in 1 indexed row(s) (first: row {row})"
    return build


case("NaN calculated position")(_bad_number("xyzcal.mm", np.nan))
case("infinite observed position")(_bad_number("xyzobs.mm.value", np.inf, ["q_pixel.source=observed"]))
case("NaN s1")(_bad_number("s1", np.nan))
case("absurdly large s1")(_bad_number("s1", 1e300))


@case("zero s1 beside a calculated position")
def _(folder):
    args, path, row = one_value_changed(folder, "s1", 0.0)
    return args, path, f"column 's1' is (0, 0, 0) beside a calculated position in 1 indexed row(s) (first: row {row})"


@case("empty table")
def _(folder):
    obj = table_object()
    obj[2]["nrows"] = 0
    for name, entry in obj[2]["data"].items():
        entry[1] = [0, b""]
    args, path = refl_object(folder, obj)
    return args, path, "has no reflections (an empty table)"


@case("reflection table given twice (no .expt)")
def _(folder):
    path = copy_of(shared_path(QUARTZ, ".refl"), folder, "copy.refl")
    return [path, shared_path(QUARTZ, ".refl")], None, "give experiment lists (.expt) and reflection tables (.refl) to pair (got 0 and 2)"


# .expt cases


@case(".expt that is not JSON")
def _(folder):
    args, path = expt_json(folder, "<?xml version='1.0'?><experiments/>")
    return args, path, "is not JSON, so not an experiment list"


@case(".expt cut short (crashed job)")
def _(folder):
    text = open(shared_path(QUARTZ, ".expt")).read()
    args, path = expt_json(folder, text[: len(text) // 3])
    return args, path, "ends in the middle of the JSON (a half-written file?)"


@case(".expt that is a reflection table")
def _(folder):
    path = copy_of(shared_path(QUARTZ, ".refl"), folder, "swapped.expt")
    return [path, shared_path(QUARTZ, ".refl")], path, "is a reflection table or a pickle, not an experiment list"


@case(".expt JSON that is not an ExperimentList")
def _(folder):
    args, path = expt_json(folder, {"__id__": "imageset", "experiment": []})
    return args, path, "is not a dxtbx ExperimentList"


#: Cases that edit the quartz experiment list: (name, [(path to a node, new value,
#: a function of the old one, or DELETE), ...], message fragment; {refl} is the table).
EXPT_EDITS = [
    (".expt with an unknown beam model type", [(("beam", 0, "__id__"), "WobblyBeam")],
     "beam 0: beam type 'WobblyBeam' is not supported"),
    (".expt with an unknown crystal model type", [(("crystal", 0, "__id__"), "QuasiCrystal")],
     "crystal 0: crystal type 'QuasiCrystal' is not a dxtbx crystal model"),
    (".expt with an unknown px_mm_strategy",
     [(("detector", 0, "panels", 0, "px_mm_strategy"), {"type": "MagicPxMmStrategy"})],
     "unknown px_mm_strategy 'MagicPxMmStrategy'"),
    ("experiment without a crystal", [(("experiment", 0, "crystal"), DELETE)],
     "experiment 0 has no crystal model, but {refl} has indexed reflections for it"),
    ("goniometer without a scan (rotation reflections)",
     [(("experiment", 0, "scan"), DELETE), (("crystal", 0, "A_at_scan_points"), DELETE)],
     "experiment 0 has a goniometer but no scan, yet its reflections in {refl} have rotation angles"),
    ("scan-varying crystal without a scan", [(("experiment", 0, "scan"), DELETE)],
     "experiment 0 has A_at_scan_points (a scan-varying model) but no scan"),
    ("wrong number of scan-varying states", [(("crystal", 0, "A_at_scan_points"), lambda states: states[:-1])],
     "experiment 0: A_at_scan_points has 100 states but its scan of 100 images needs 101"),
    ("experiment refers to a model that is not there", [(("experiment", 0, "beam"), 3)],
     "experiment 0 refers to beam 3, which is not in the file"),
    ("NaN in a panel origin", [(("detector", 0, "panels", 0, "origin", 0), float("nan"))],
     "holds a number that is not finite"),
    ("a zero-length rotation axis", [(("goniometer", 0, "rotation_axis"), [0.0, 0.0, 0.0])],
     "goniometer 0: has a direction of zero length"),
    ("a setting rotation that is not a rotation",
     [(("goniometer", 0, "setting_rotation"), [1.0, 0, 0, 0, 2.0, 0, 0, 0, 1.0])],
     "goniometer 0: setting_rotation is not a rotation matrix"),
    ("a wavelength in metres", [(("beam", 0, "wavelength"), 2.5e-12)],
     "beam 0: wavelength 2.5e-12 Å is not a plausible wavelength (1e-4 to 1e4 Å)"),
    ("pixels of no size", [(("detector", 0, "panels", 0, "pixel_size"), [0.0, 0.0])],
     "detector 0: panel 0 has a pixel size of [0.0, 0.0] mm (must be > 0)"),
    ("a panel of no pixels", [(("detector", 0, "panels", 0, "image_size"), [0, 0])],
     "detector 0: panel 0 has an image size of [0, 0] pixels (two whole numbers ≥ 1)"),
    ("crystal axes without volume", [(("crystal", 0, "real_space_a"), [4.9, 0.0, 0.0]),
                                     (("crystal", 0, "real_space_b"), [0.0, 4.9, 0.0]),
                                     (("crystal", 0, "real_space_c"), [4.9, 4.9, 0.0])],
     "real-space axes a, b, c do not span a cell (zero volume)"),
]


def _edited_experiments(edits, fragment):
    def build(folder):
        document = expt_document()
        for keys, value in edits:
            apply_edit(document, keys, value)
        args, path = expt_json(folder, document)
        return args, path, fragment.format(refl=args[1])
    return build


for _name, _edits, _fragment in EXPT_EDITS:
    case(_name)(_edited_experiments(_edits, _fragment))


@case(".expt that is a directory")
def _(folder):
    path = os.path.join(folder, "a_folder.expt")
    os.mkdir(path)
    return [path, shared_path(QUARTZ, ".refl")], path, "is a directory, not an experiment list"


# time-of-flight (polychromatic) cases, from the SXD NaCl pair

SXD = ("tof_sxd_nacl", "sxd_refined")  # neutron time of flight: a polychromatic beam


@case("polychromatic table without wavelength_cal")
def _(folder):
    obj = table_object(SXD)
    del obj[2]["data"]["wavelength_cal"]
    args, path = refl_object(folder, obj, pair=SXD)
    return args, path, "has no 'wavelength_cal' column, which the polychromatic beam of experiment 0 needs"


@case("polychromatic table with a negative wavelength")
def _(folder):
    obj = table_object(SXD)
    wavelength = np.frombuffer(obj[2]["data"]["wavelength_cal"][1][1], dtype="<f8").copy()
    row = int(np.flatnonzero(wavelength > 0)[3])
    wavelength[row] = -wavelength[row]
    obj[2]["data"]["wavelength_cal"][1][1] = wavelength.tobytes()
    args, path = refl_object(folder, obj, pair=SXD)
    return args, path, f"column 'wavelength_cal' is zero or negative in 1 indexed row(s) of experiment 0 (first: row {row})"


@case("polychromatic beam without a direction")
def _(folder):
    document = expt_document(SXD)
    del document["beam"][0]["direction"]
    args, path = expt_json(folder, document, pair=SXD)
    return args, path, "beam 0: polychromatic beam has no direction"


# output cases


def _quartz_with(*extra):
    return [shared_path(QUARTZ, ".expt"), shared_path(QUARTZ, ".refl"), *extra]


@case("output folder does not exist")
def _(folder):
    target = os.path.join(folder, "no", "such", "folder", "out.refl")
    return _quartz_with(f"output.reflections={target}"), target, "cannot be written"


@case("output below a regular file")
def _(folder):
    blocker = os.path.join(folder, "blocker.txt")
    open(blocker, "w").write("a file, not a folder\n")
    target = os.path.join(blocker, "out.refl")
    return _quartz_with(f"output.reflections={target}"), target, "is not a directory"


@case("output path is a directory")
def _(folder):
    target = os.path.join(folder, "existing_folder")
    os.mkdir(target)
    return _quartz_with(f"output.reflections={target}"), target, "output.reflections cannot be written (it is a directory)"


@case("output path equal to the input path")
def _(folder):
    target = shared_path(QUARTZ, ".refl")
    return _quartz_with(f"output.reflections={target}"), target, "output.reflections would overwrite the input file"


@case("output path reaches the input through a symlink")
def _(folder):
    link = os.path.join(folder, "link.refl")
    os.symlink(shared_path(QUARTZ, ".refl"), link)
    return _quartz_with(f"output.reflections={link}"), link, "output.reflections would overwrite the input file"


@case("log path equal to the input path")
def _(folder):
    target = shared_path(QUARTZ, ".refl")
    return _quartz_with(f"output.log={target}"), target, "output.log would overwrite the input file"


@case("JSON report over the experiment list")
def _(folder):
    target = shared_path(QUARTZ, ".expt")
    return _quartz_with(f"output.json={target}"), target, "output.json would overwrite the input file"


@case("two outputs with one name")
def _(folder):
    target = os.path.join(folder, "same.out")
    return _quartz_with(f"output.reflections={target}", f"output.json={target}"), target, "output.json and output.reflections name the same file"


# -- running them ----------------------------------------------------------------------


def snapshot(folder):
    """Every file below a folder with its hash."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = sha(path) if not os.path.islink(path) else "link"
    return found


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30


#: The one honest difference: DIALS reads pickled tables (older DIALS) and says
#: why it could not read this one; the standalone reader tells how to convert one.
NATIVE_MESSAGES = {
    "pickle from old DIALS": "is a Python pickle (the reflection-table format of older DIALS versions) that DIALS "
                             "cannot read as a reflection table either (AssertionError",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_gives_one_line_and_leaves_nothing(shared, tmp_path, monkeypatch, capsys, name, backend):
    """Every case on both backends: the same line, status 1, nothing written."""
    inputs_folder = tmp_path / "inputs"
    inputs_folder.mkdir()
    args, named, fragment = CASES[name](str(inputs_folder))
    args = args + [f"backend={backend}"]
    if backend == "native":
        fragment = NATIVE_MESSAGES.get(name, fragment)
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    monkeypatch.chdir(run_folder)
    shared_before = {p: sha(p) for p in (shared_path(QUARTZ, ".expt"), shared_path(QUARTZ, ".refl"))}
    inputs_before = snapshot(inputs_folder)

    status = main(args)

    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 1, (captured.out, captured.err)
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("dials.q_consistency: error: ")
    assert fragment in lines[0], lines[0]
    if named:
        assert f"{named}: " in lines[0], lines[0]
    assert os.listdir(run_folder) == []  # no output, no log, no temporary file
    assert snapshot(inputs_folder) == inputs_before  # inputs unchanged, nothing added beside them
    assert {p: sha(p) for p in shared_before} == shared_before


@pytest.mark.parametrize("backend", BACKENDS)
def test_debug_shows_the_traceback_the_one_line_hides(shared, tmp_path, monkeypatch, capsys, backend):
    args, named, fragment = CASES["truncated msgpack"](str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(args + ["debug=True", f"backend={backend}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].endswith(fragment)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_installed_command_gives_the_same_line(shared, tmp_path, backend):
    """The console script in a fresh process: same one line, status 1, nothing written."""
    for name in ("pickle from old DIALS", "identifiers that do not match the .expt", "zero s1 beside a calculated position"):
        inputs = tmp_path / name.replace(" ", "_")
        inputs.mkdir()
        args, named, fragment = CASES[name](str(inputs))
        if backend == "native":
            fragment = NATIVE_MESSAGES.get(name, fragment)
        run_folder = inputs / "run"
        run_folder.mkdir()
        done = run_command(*args, cwd=run_folder, backend=backend)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert fragment in done.stderr and f"{named}: " in done.stderr
        assert os.listdir(run_folder) == []


# -- awkward but legitimate: a correct result ------------------------------------------------


def test_goniometer_without_scan_on_stills_is_computed_as_stills(shared, tmp_path):
    """A still with a goniometer but no scan (as some formats import them): q_bragg = A·h."""
    document = expt_document(SSX)
    document["goniometer"] = [{"rotation_axis": [1.0, 0.0, 0.0]}]
    for entry in document["experiment"]:
        entry["goniometer"] = 0
    expt = tmp_path / "with_goniometer.expt"
    expt.write_text(json.dumps(document))
    plain = run_core(shared_path(SSX, ".expt"), shared_path(SSX, ".refl"))[3]
    with_goniometer = run_core(str(expt), shared_path(SSX, ".refl"))[3]
    used = plain.used
    assert used.sum() == 360 and np.array_equal(with_goniometer.used, used)
    assert np.array_equal(with_goniometer.q_bragg[used], plain.q_bragg[used])
    assert np.array_equal(with_goniometer.q_pixel[used], plain.q_pixel[used])
    assert np.isnan(with_goniometer.phi).all()


def test_dials_marker_for_unpredicted_rows_is_counted_not_an_error(shared, tmp_path):
    """dials.refine writes s1 = 0 and xyzcal.mm = 0 for a reflection it could not predict."""
    done = run_command(os.path.join(SHARED_DATA, "dials_current", "centroid_refined.expt"),
                       os.path.join(SHARED_DATA, "dials_current", "centroid_refined.refl"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = run_core(os.path.join(SHARED_DATA, "dials_current", "centroid_refined.expt"),
                      os.path.join(SHARED_DATA, "dials_current", "centroid_refined.refl"))[3]
    # 569 rows have id >= 0; row 108, hkl (11, -5, -2), is the one dials.refine could not predict
    assert int(np.count_nonzero(result.reason == NOT_PREDICTED)) == 1
    assert result.reason[108] == NOT_PREDICTED and int(result.used.sum()) == 568
    assert REASONS[NOT_PREDICTED] in done.stdout


def test_nan_in_an_unindexed_row_is_left_alone(shared, tmp_path):
    """Only indexed rows must carry finite numbers: an id = -1 row is counted, not checked."""
    source = os.path.join(SHARED_DATA, "centroid_test_data", "indexed.refl")
    table = ReflectionTable.from_file(source)
    ids = table.get("id")
    row = int(np.flatnonzero(ids < 0)[0])
    xyzobs = table.get("xyzobs.mm.value").copy()
    xyzobs[row] = np.nan
    table.set_column("xyzobs.mm.value", "vec3<double>", xyzobs)
    refl = tmp_path / "nan_unindexed.refl"
    table.write(str(refl))
    expt = os.path.join(SHARED_DATA, "centroid_test_data", "indexed.expt")
    before = run_core(expt, source, q_pixel_source="observed")[3]
    after = run_core(expt, str(refl), q_pixel_source="observed")[3]
    assert after.reason[row] == NOT_INDEXED
    assert np.array_equal(after.used, before.used) and int(after.used.sum()) == 568
    assert np.array_equal(after.q_pixel[after.used], before.q_pixel[before.used])


# -- a full disk -------------------------------------------------------------------------


def _command_line(*args):
    return [sys.executable, "-m", "dials_qconsistency.command_line.q_consistency", *args]


def _environment():
    return dict(os.environ, PYTHONPATH=REPO_ROOT, MPLBACKEND="Agg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_size_limit_leaves_no_output(shared, tmp_path, backend):
    """The kernel refuses writes past 200 kB (RLIMIT_FSIZE): the 830 kB table cannot be
    written. One line, status 1, no output or temporary file; the log says why."""
    limit = 200_000

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out.refl"
    done = subprocess.run(
        _command_line(*_quartz_with(f"output.reflections={out}", "output.json=report.json", f"backend={backend}")),
        cwd=tmp_path, env=_environment(), capture_output=True, text=True, preexec_fn=limit_file_size,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"{out}: cannot be written (File too large)" in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["dials.q_consistency.log"]
    log = (tmp_path / "dials.q_consistency.log").read_text()
    assert log.endswith(f"\nError: {out}: cannot be written (File too large)\n"), log[-300:]
    assert "WARN" not in log  # DIALS' log formatter marks a message above INFO with a line "WARN: "


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_disk_leaves_no_output(shared, tmp_path, backend):
    """A real ENOSPC: the outputs go to a 64 kB tmpfs mounted in a private mount namespace."""
    disk = tmp_path / "small_disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {disk} || exit 77; "
        f"{' '.join(_command_line(*_quartz_with(f'output.reflections={disk}/out.refl', f'output.plots={disk}/plots/', f'backend={backend}')))}; "
        f"status=$?; echo LISTING; ls -A {disk}; exit $status"
    )
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed: cannot mount a small tmpfs")
    done = subprocess.run([unshare, "-rm", "sh", "-c", script], cwd=tmp_path, env=_environment(), capture_output=True, text=True)
    if done.returncode == 77:
        pytest.skip(f"this machine does not allow a private tmpfs mount: {done.stderr.strip()}")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and f"{disk}/out.refl: cannot be written (No space left on device)" in done.stderr
    assert done.stdout.split("LISTING\n")[1] == ""  # no table, no plots folder, no temporary file


def test_sigterm_while_writing_leaves_no_output(shared, tmp_path, monkeypatch, capsys):
    """A batch system's time limit arrives after the table and two figures are staged
    in a new plots folder: the staged files and the new folders are removed."""
    from dials_qconsistency.io import staged as files
    import signal

    staged = []
    add = files.StagedOutputs.add

    def add_then_terminate(self, path, payload):
        add(self, path, payload)
        staged.append(os.path.basename(path))
        if len(staged) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(files.StagedOutputs, "add", add_then_terminate)
    monkeypatch.chdir(tmp_path)
    status = main(_quartz_with("output.plots=new/figures/run1_", "backend=standalone"))
    err = capsys.readouterr().err
    assert status == 143 and err == "dials.q_consistency: terminated by SIGTERM (outputs are all written or none)\n"
    assert staged == ["q_consistency.refl", "run1_detector_norm.png", "run1_detector_dqx.png"]
    assert sorted(os.listdir(tmp_path)) == ["dials.q_consistency.log"]  # no table, no new/ folder
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the handler back
    log = (tmp_path / "dials.q_consistency.log").read_text()
    assert "Verdict: CONSISTENT" in log  # the run had got that far: its log must not read as the report of a run
    assert log.endswith("\nInterrupted by SIGTERM: none of the outputs was written (files of their names are an "
                        "earlier run's, not this log's)\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_rename_keeps_the_earlier_runs_files(shared, tmp_path, monkeypatch, capsys, backend):
    """The last output cannot be renamed into place (an immutable file, another
    user's file in a sticky folder): the outputs renamed before it are taken
    back and the earlier run's files they had replaced are put back."""
    import errno

    monkeypatch.chdir(tmp_path)
    earlier = {"q_consistency.refl": b"an earlier run's table", "qc.json": b'{"earlier": true}'}
    for name, data in earlier.items():
        (tmp_path / name).write_bytes(data)
    replace = os.replace

    def refuse_the_report(source, target):
        if os.path.basename(target) == "dials.q_consistency.html":
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_report)
    status = main(_quartz_with("output.json=qc.json", "output.plots=None", f"backend={backend}"))
    assert status == 1
    assert capsys.readouterr().err == (
        "dials.q_consistency: error: dials.q_consistency.html: cannot be written (Operation not permitted)\n")
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier
    assert sorted(os.listdir(tmp_path)) == sorted([*earlier, "dials.q_consistency.log"])  # no temporary, no kept copy
    log = (tmp_path / "dials.q_consistency.log").read_text()
    assert log.endswith("\nError: dials.q_consistency.html: cannot be written (Operation not permitted)\n")


@pytest.mark.parametrize("moment", ["rename", "kept copies"])
def test_ctrl_c_during_the_commit_waits_for_it(shared, tmp_path, monkeypatch, capsys, moment):
    """Ctrl-C right after the second rename, or while the earlier run's kept
    copies are removed: it left some outputs new and some old, a kept copy,
    and a log saying none was written. The commit now holds the signal: every
    output is the new run's, nothing else is left, and the log says so."""
    import signal

    monkeypatch.chdir(tmp_path)
    earlier = {"q_consistency.refl": b"an earlier run's table", "qc.json": b'{"earlier": true}'}
    for name, data in earlier.items():
        (tmp_path / name).write_bytes(data)
    replace, unlink, calls = os.replace, os.unlink, []

    def then_interrupt(real):
        def call(*args):
            real(*args)
            calls.append(args)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)
        return call

    monkeypatch.setattr(os, "replace" if moment == "rename" else "unlink",
                        then_interrupt(replace if moment == "rename" else unlink))
    status = main(_quartz_with("output.json=qc.json", "output.plots=None", "backend=standalone"))
    monkeypatch.undo()
    assert status == 130 and capsys.readouterr().err.endswith("interrupted (outputs are all written or none)\n")
    assert sorted(os.listdir(tmp_path)) == ["dials.q_consistency.html", "dials.q_consistency.log", "q_consistency.refl",
                                            "qc.json"]  # no temporary file, no kept copy
    assert "verdict" in json.load(open(tmp_path / "qc.json"))
    assert ReflectionTable.from_file(str(tmp_path / "q_consistency.refl")).nrows == 505
    assert (tmp_path / "dials.q_consistency.log").read_text().endswith(
        "\nInterrupted by Ctrl-C (SIGINT) after the outputs were written\n")


def test_a_successful_commit_replaces_the_earlier_files(tmp_path):
    """The kept copies of the replaced files go once every rename is done."""
    from dials_qconsistency.io.staged import StagedOutputs

    (tmp_path / "a.json").write_text("old")
    with StagedOutputs() as outputs:
        outputs.add(str(tmp_path / "a.json"), b"new")
        outputs.add(str(tmp_path / "b.json"), b"also new")
        assert outputs.commit() == [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]
    assert (tmp_path / "a.json").read_text() == "new"


def test_plots_go_into_a_new_folder(shared, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_quartz_with("output.plots=new/figures/run1_", "output.reflections=None", "backend=standalone")) == 0
    assert sorted(os.listdir(tmp_path / "new" / "figures")) == sorted(
        f"run1_{name}.png" for name in plots.FIGURE_NAMES if name != "vs_wavelength"  # rotation data
    )
