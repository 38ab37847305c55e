"""The standalone msgpack reader and writer."""

from __future__ import annotations

import errno
import glob
import os

import msgpack
import numpy as np
import pytest

from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.io import refl_writer
from dials_qconsistency.io.staged import StagedOutputs
from dials_qconsistency.report.columns import OUTPUT_TYPES
from dials_qconsistency.io.refl import ReflectionTable
from dials_qconsistency.io.refl_format import row_bytes
from dials_qconsistency.io.refl_writer import ColumnBlocks
from conftest import SHARED_DATA


def shared_tables():
    return sorted(glob.glob(os.path.join(SHARED_DATA, "*", "*.refl")))


def test_every_shared_table_round_trips_byte_for_byte(shared):
    paths = shared_tables()
    assert len(paths) >= 9
    versions = set()
    for path in paths:
        raw = open(path, "rb").read()
        table = ReflectionTable.from_bytes(raw, path)
        versions.add(table.version)
        assert table.to_bytes() == raw, path
    assert versions == {1, 2}


def test_columns_decode_like_msgpack_does(shared):
    path = shared("quartz_processed", "refined.refl")
    table = ReflectionTable.from_file(path)
    raw = msgpack.unpackb(open(path, "rb").read(), raw=False, strict_map_key=False)[2]["data"]
    hkl = np.frombuffer(raw["miller_index"][1][1], dtype="<i4").reshape(-1, 3)
    assert np.array_equal(table.get("miller_index"), hkl)
    assert table.get("xyzcal.mm").shape == (505, 3) and table.get("panel").dtype == np.uint64


def make_table_bytes(**overrides):
    table = ReflectionTable(2, {0: "a"}, version=2)
    table.set_column("id", "int", [0, 1])
    table.set_column("xyzcal.mm", "vec3<double>", np.zeros((2, 3)))
    obj = msgpack.unpackb(table.to_bytes(), raw=False, strict_map_key=False)
    for key, value in overrides.items():
        value(obj)
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"", "empty"),
        (b"\x80\x02}q\x00.", "pickle"),
        (make_table_bytes()[:-5], "truncated"),
        (make_table_bytes() + b"\x00", "trailing"),
        (msgpack.packb(["something else", 1, {}]), "not a DIALS reflection table"),
        (make_table_bytes(v=lambda o: o.__setitem__(1, 3)), "version 3"),
        (make_table_bytes(t=lambda o: o[2]["data"]["id"].__setitem__(0, "complex<float>")), "unknown column type"),
        (make_table_bytes(n=lambda o: o[2]["data"]["id"][1].__setitem__(0, 3)), "has 3 rows"),
        (make_table_bytes(b=lambda o: o[2]["data"]["id"][1].__setitem__(1, b"\0" * 7)), "blob is 7 bytes"),
    ],
)
def test_bad_tables_give_one_line_errors(raw, message):
    with pytest.raises(QConsistencyError) as error:
        ReflectionTable.from_bytes(raw, "bad.refl")
    text = str(error.value)
    assert text.startswith("bad.refl: ") and message in text and "\n" not in text


def test_new_columns_are_inserted_in_dials_order():
    table = ReflectionTable(1, {}, version=1)
    table.set_column("zeta", "double", [1.0])
    table.set_column("id", "int", [0])
    names = list(msgpack.unpackb(table.to_bytes(), raw=False, strict_map_key=False)[2]["data"])
    assert names == ["id", "zeta"]


def _begin_and_finish(path, folder, values):
    """Write ``path`` plus ``values`` (name -> (type, array)) the way the command
    does: the layout first, the input copied in a thread, the new columns handed
    over as they come (a third whole, a third in blocks of 7 rows, a third set
    in the table before ``finish``). Returns the file and the same table with
    every column set, written in one go."""
    table = ReflectionTable.from_file(path)
    out = os.path.join(folder, "out.refl")
    with StagedOutputs() as outputs:
        writer = table.begin_write(outputs, out, {name: type_name for name, (type_name, _) in values.items()})
        for i, (name, (type_name, array)) in enumerate(values.items()):
            if i % 3 == 0:
                writer.put(name, type_name, array)
            elif i % 3 == 1:
                writer.put(name, type_name, ColumnBlocks(lambda rows, a=array: a[rows], 7))
            else:
                table.set_column(name, type_name, array)
        writer.finish()
        outputs.commit()
    one_go = ReflectionTable.from_file(path)
    for name, (type_name, array) in values.items():
        one_go.set_column(name, type_name, array)
    return one_go.to_bytes(), open(out, "rb").read()


def test_a_table_written_while_computing_has_the_bytes_of_one_written_in_one_go(shared, tmp_path):
    rng = np.random.default_rng(3)
    for path in shared_tables():
        raw = open(path, "rb").read()
        nrows = ReflectionTable.from_bytes(raw).nrows
        values = {}
        for name, type_name in OUTPUT_TYPES.items():
            width = row_bytes(type_name) // 8  # doubles a row
            values[name] = (type_name, rng.normal(size=(nrows, width)) if width > 1 else rng.normal(size=nrows))
        values["xyzcal.mm"] = ("vec3<double>", rng.normal(size=(nrows, 3)))  # an input column replaced
        one_go, written = _begin_and_finish(path, tmp_path, values)
        assert written == one_go, path
        # and, decoded by msgpack itself: the input's columns unchanged, the new ones the arrays
        before = msgpack.unpackb(raw, raw=False, strict_map_key=False)[2]
        after = msgpack.unpackb(written, raw=False, strict_map_key=False)[2]
        assert after["nrows"] == before["nrows"] and after["identifiers"] == before["identifiers"]
        for name, column in before["data"].items():
            if name not in values:
                assert after["data"][name] == column, (path, name)
        for name, (type_name, array) in values.items():
            assert after["data"][name] == [type_name, [nrows, np.ascontiguousarray(array).tobytes()]], (path, name)
        assert sorted(after["data"]) == sorted(set(before["data"]) | set(values))


def test_a_failed_run_stops_the_copy_and_leaves_nothing(shared, tmp_path):
    path = shared("quartz_processed", "refined.refl")
    table = ReflectionTable.from_file(path)
    with pytest.raises(ZeroDivisionError):
        with StagedOutputs() as outputs:
            writer = table.begin_write(outputs, str(tmp_path / "out.refl"), OUTPUT_TYPES)
            1 / 0
    assert os.listdir(tmp_path) == [] and not writer._thread.is_alive()


def test_a_full_disk_while_copying_is_a_one_line_error_naming_the_output(shared, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(refl_writer, "_copy_range", full)
    table = ReflectionTable.from_file(shared("quartz_processed", "refined.refl"))
    out = str(tmp_path / "out.refl")
    with pytest.raises(QConsistencyError) as error:
        with StagedOutputs() as outputs:
            writer = table.begin_write(outputs, out, {"zeta": "double"})
            table.set_column("zeta", "double", np.zeros(table.nrows))
            writer.finish()
    assert str(error.value) == f"{out}: cannot be written (No space left on device)"
    assert os.listdir(tmp_path) == []


def test_a_reserved_column_must_be_given_its_values(shared, tmp_path):
    table = ReflectionTable.from_file(shared("quartz_processed", "refined.refl"))
    with pytest.raises(RuntimeError, match="never given its values"):
        with StagedOutputs() as outputs:
            table.begin_write(outputs, str(tmp_path / "out.refl"), {"zeta": "double"}).finish()
    with pytest.raises(RuntimeError, match="no place kept"):
        with StagedOutputs() as outputs:
            table.begin_write(outputs, str(tmp_path / "out.refl"), {"zeta": "double"}).put("eta", "double", [0.0])
    with pytest.raises(RuntimeError, match="a block of shape"):
        with StagedOutputs() as outputs:
            writer = table.begin_write(outputs, str(tmp_path / "out.refl"), {"zeta": "double"})
            writer.put("zeta", "double", ColumnBlocks(lambda rows: np.zeros((rows.stop - rows.start, 2)), 100))
            writer.finish()
    with pytest.raises(RuntimeError, match="after the write was closed"):
        with StagedOutputs() as outputs:
            writer = table.begin_write(outputs, str(tmp_path / "out.refl"), {"zeta": "double"})
            writer.close()
            writer.put("zeta", "double", np.zeros(table.nrows))
    assert os.listdir(tmp_path) == []


def test_a_closed_write_is_finished_by_the_commit(shared, tmp_path):
    """close() hands the rest to the writer's thread (it writes and syncs while
    the program goes on); the commit waits for it: the table is complete, and
    a write that failed meanwhile is told at the next staged file."""
    path = shared("quartz_processed", "refined.refl")
    table = ReflectionTable.from_file(path)
    out = tmp_path / "out.refl"
    with StagedOutputs() as outputs:
        writer = table.begin_write(outputs, str(out), {"zeta": "double"})
        writer.put("zeta", "double", np.arange(table.nrows, dtype=float))
        writer.close()
        outputs.finish_later(writer)
        outputs.commit()
    written = ReflectionTable.from_file(str(out))
    np.testing.assert_array_equal(written.get("zeta"), np.arange(table.nrows))
    assert written.column_blob("miller_index") == table.column_blob("miller_index")

    class Failed:
        def failed(self):
            return True

        def finish(self):
            raise QConsistencyError("cannot be written (No space left on device)", "table.refl")

    with pytest.raises(QConsistencyError, match="table.refl"):
        with StagedOutputs() as outputs:
            outputs.finish_later(Failed())
            outputs.add(str(tmp_path / "report.json"), b"{}")
    assert os.listdir(tmp_path) == ["out.refl"]


def test_a_failed_staged_file_closes_its_descriptor_and_finishes_each_writer_once(tmp_path, monkeypatch):
    """A payload that raises leaves no open file; a pending writer whose own
    finish stages a file that fails too (DIALS' as_file on a broken disk) is
    finished once, and its error is told (no recursion)."""
    def open_descriptors():
        return len(os.listdir("/proc/self/fd"))

    def broken_payload(descriptor):
        raise RuntimeError("a bug while writing")

    before = open_descriptors()
    for _ in range(5):
        with pytest.raises(RuntimeError):
            with StagedOutputs() as outputs:
                outputs.add(str(tmp_path / "a.json"), broken_payload)
    assert open_descriptors() == before and os.listdir(tmp_path) == []

    def no_fsync(descriptor):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", no_fsync)
    calls = []

    class WritesAtFinish:
        def __init__(self, outputs):
            self.outputs = outputs

        def failed(self):
            return False

        def finish(self):
            calls.append(1)
            self.outputs.add(str(tmp_path / "table.refl"), b"table")

    with pytest.raises(QConsistencyError, match="table.refl: cannot be written"):
        with StagedOutputs() as outputs:
            outputs.finish_later(WritesAtFinish(outputs))
            outputs.add(str(tmp_path / "report.json"), b"{}")
    assert calls == [1] and os.listdir(tmp_path) == []


def test_column_blocks_made_whole():
    blocks = ColumnBlocks(lambda rows: np.arange(rows.start, rows.stop)[:, None] * [1.0, 2.0], 4)
    assert np.array_equal(blocks.whole(10), np.arange(10)[:, None] * [1.0, 2.0])
    assert blocks.whole(0).shape == (0, 2) and [r for r, _ in blocks.blocks(9)][-1] == slice(8, 9)


def _resident_file_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_releasing_the_input_frees_its_pages_and_keeps_its_values(shared, tmp_path):
    path = str(tmp_path / "big.refl")
    big = ReflectionTable(1_000_000, {0: "x"})
    big.set_column("xyzcal.mm", "vec3<double>", np.arange(3e6).reshape(-1, 3))  # 24 MB
    big.write(path)
    table = ReflectionTable.from_file(path)
    before = _resident_file_mb()
    assert table.get("xyzcal.mm").sum() == 3e6 * (3e6 - 1) / 2  # every page read
    touched = _resident_file_mb()
    table.release_memory()
    released = _resident_file_mb()
    assert touched - before > 20 and touched - released > 20, (before, touched, released)
    assert np.array_equal(table.get("xyzcal.mm"), np.arange(3e6).reshape(-1, 3))  # read back from the file
    quartz = ReflectionTable.from_file(shared("quartz_processed", "refined.refl"))
    quartz.release_memory()
    assert quartz.to_bytes() == open(shared("quartz_processed", "refined.refl"), "rb").read()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_releasing_rows_frees_the_pages_of_those_rows_only(tmp_path):
    path = str(tmp_path / "big.refl")
    big = ReflectionTable(1_000_000, {0: "x"})
    big.set_column("xyzcal.mm", "vec3<double>", np.arange(3e6).reshape(-1, 3))  # 24 MB
    big.set_column("flags", "std::size_t", np.arange(1_000_000))  # 8 MB
    big.write(path)
    table = ReflectionTable.from_file(path)
    before = _resident_file_mb()
    assert table.get("xyzcal.mm").sum() == 3e6 * (3e6 - 1) / 2 and table.get("flags").sum() > 0  # every page read
    touched = _resident_file_mb()
    table.release_rows(0, 500_000)  # half of each column: 12 + 4 MB
    half = _resident_file_mb()
    table.release_rows(500_000, 1_000_000)
    released = _resident_file_mb()
    assert touched - before > 30, (before, touched)
    assert 14 < touched - half < 18 and 14 < half - released < 18, (touched, half, released)
    assert np.array_equal(table.get("xyzcal.mm"), np.arange(3e6).reshape(-1, 3))  # read back from the file
    assert np.array_equal(table.get("flags"), np.arange(1_000_000))


def test_the_writer_lets_a_column_go_once_written(shared, tmp_path):
    """A column handed to the writer is written from the caller's array, not
    kept in the table: once written, the caller's letting go frees it."""
    import weakref

    table = ReflectionTable.from_file(shared("quartz_processed", "refined.refl"))
    values = np.arange(3.0 * table.nrows).reshape(-1, 3)
    alive = weakref.ref(values)
    with StagedOutputs() as outputs:
        writer = table.begin_write(outputs, str(tmp_path / "out.refl"), {"q_bragg": "vec3<double>"})
        writer.put("q_bragg", "vec3<double>", values)
        del values
        writer.finish()
        assert alive() is None
        outputs.commit()
    assert np.array_equal(ReflectionTable.from_file(str(tmp_path / "out.refl")).get("q_bragg"),
                          np.arange(3.0 * table.nrows).reshape(-1, 3))
