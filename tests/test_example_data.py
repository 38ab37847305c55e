"""The bundled example is exactly what the simulator writes."""

from __future__ import annotations

import os

from simulation.simulate import write_example
from conftest import EXAMPLES


def test_bundled_example_is_reproducible(tmp_path):
    written = write_example(str(tmp_path))
    assert len(written) == 4
    for path in written:
        committed = os.path.join(EXAMPLES, os.path.basename(path))
        assert open(path, "rb").read() == open(committed, "rb").read(), path
