"""The standalone msgpack reader and writer."""

from __future__ import annotations

import glob
import os

import msgpack
import numpy as np
import pytest

from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.reflection_table import ReflectionTable
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
