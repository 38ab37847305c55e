"""flex.reflection_table: from_file, columns by name, identifiers, as_file."""

import numpy as np

from dials_qconsistency.reflection_table import ReflectionTable

_TYPES = {1: "double", 2: "vec2<double>", 3: "vec3<double>"}


class _Identifiers:
    def __init__(self, mapping):
        self._mapping = mapping

    def keys(self):
        return list(self._mapping)

    def values(self):
        return list(self._mapping.values())


class reflection_table:  # noqa: N801 (DIALS' name)
    def __init__(self, table):
        self._table = table

    @staticmethod
    def from_file(path):
        return reflection_table(ReflectionTable.from_file(str(path)))

    def __len__(self):
        return self._table.nrows

    def __contains__(self, name):
        return name in self._table

    def keys(self):
        return self._table.keys()

    def __getitem__(self, name):
        return self._table.get(name)

    def __setitem__(self, name, values):
        values = np.asarray(values)
        width = 1 if values.ndim == 1 else values.shape[1]
        self._table.set_column(name, _TYPES[width], values)

    def experiment_identifiers(self):
        return _Identifiers(self._table.identifiers)

    def as_file(self, path):
        with open(path, "wb") as handle:
            self._table.write_to(handle.fileno())
