"""The native backend: DIALS' option parser, dxtbx models, flex.reflection_table.

Used inside a DIALS environment (``backend=auto`` with DIALS importable, or
``backend=native``). Only the source of the arrays differs from the standalone
backend; q is computed by the same numpy core, and a msgpack table is written
by the same writer (DIALS' ``as_file`` writes the tables DIALS alone reads).

What is taken from dxtbx (lab frame, mm, radians, Å⁻¹):

- beam: ``get_s0()`` and ``get_wavelength()``; ``get_s0_at_scan_point(i)`` for
  each of ``num_scan_points`` (so for the goniometer and crystal)
- detector: each panel's lab-frame ``get_origin()``, ``get_fast_axis()``,
  ``get_slow_axis()`` (the hierarchy already composed by dxtbx), pixel and
  image size, ``get_mu()``, ``get_thickness()``; pixels -> mm through the
  panel's own ``pixel_to_millimeter`` (its PxMmStrategy, parallax included);
  the groups of the hierarchy from ``Detector.to_dict()``, which names panels
  by index
- goniometer: ``get_rotation_axis_datum()``, ``get_fixed_rotation()``,
  ``get_setting_rotation()``; ``get_setting_rotation_at_scan_point(i)``
- scan: ``get_image_range()``, ``get_oscillation(deg=False)``
- crystal: ``get_A()`` (= U·B), ``get_A_at_scan_point(i)``

Nothing here is imported unless the native backend is chosen.
"""

from __future__ import annotations

import io
import logging
import os
import sys

import numpy as np

from dials_qconsistency.model import experiment as models
from dials_qconsistency.errors import OtherTableFormat, QConsistencyError
from dials_qconsistency.io import backends
from dials_qconsistency.io.expt import read_experiments_and_document
from dials_qconsistency.io.expt_detector import hierarchy_groups
from dials_qconsistency.io.refl import ReflectionTable
from dials_qconsistency.io.refl_writer import column_values

#: The columns the numpy core reads (table_checks.COLUMN_SHAPES), taken from the flex table.
CORE_COLUMNS = ("id", "panel", "miller_index", "s1", "xyzcal.mm", "xyzobs.mm.value", "xyzobs.px.value",
                "xyzobs.mm.variance", "xyzobs.px.variance", "flags", "wavelength_cal", "s0_cal", "delpsical.rad")


def _vector(values, n=3) -> np.ndarray:
    return np.array(list(values), dtype=float).reshape(n)


def _matrix(values) -> np.ndarray:
    """A dxtbx/scitbx mat3 (9 numbers, row-major) as a 3x3 array."""
    return np.array(list(values), dtype=float).reshape(3, 3)


def _scan_points(model, getter_name, convert):
    """``convert`` of each scan point of a model (None when it has none); the
    count is dxtbx's ``num_scan_points`` property (beam, goniometer, crystal)."""
    count = int(model.num_scan_points)
    if count == 0:
        return None
    getter = getattr(model, getter_name)
    return np.array([convert(getter(i)) for i in range(count)])


def beam_model(beam) -> models.Beam:
    kind = type(beam).__name__
    if "Polychromatic" in kind:
        return models.Beam(s0=None, wavelength=None, polychromatic=True, unit_s0=_vector(beam.get_unit_s0()),
                           sample_to_source_distance=float(beam.get_sample_to_source_distance()),
                           wavelength_range=tuple(float(v) for v in beam.get_wavelength_range()),
                           probe=str(beam.get_probe_name()))
    return models.Beam(
        s0=_vector(beam.get_s0()),
        wavelength=float(beam.get_wavelength()),
        s0_at_scan_points=_scan_points(beam, "get_s0_at_scan_point", _vector),
        probe=str(beam.get_probe_name()),
    )


def _pixel_to_millimetre(panel):
    """The panel's own px -> mm mapping on (N, 2) arrays (dxtbx's PxMmStrategy)."""

    def mapping(xy_px):
        from dxtbx import flumpy

        xy = flumpy.vec_from_numpy(np.ascontiguousarray(xy_px, dtype=float).reshape(-1, 2))
        return np.array(flumpy.to_numpy(panel.pixel_to_millimeter(xy)), dtype=float).reshape(-1, 2)

    return mapping


def detector_model(detector) -> models.Detector:
    panels = []
    for index, panel in enumerate(detector):
        strategy = type(panel.get_px_mm_strategy()).__name__
        parallax = "Parallax" in strategy
        panels.append(
            models.Panel(
                name=str(panel.get_name()),
                origin=_vector(panel.get_origin()),
                fast=_vector(panel.get_fast_axis()),
                slow=_vector(panel.get_slow_axis()),
                pixel_size=_vector(panel.get_pixel_size(), 2),
                image_size=np.array(list(panel.get_image_size()), dtype=int).reshape(2),
                thickness=float(panel.get_thickness()),
                mu=float(panel.get_mu()),
                parallax=parallax,
                pixel_to_millimetre=_pixel_to_millimetre(panel),
            )
        )
    return models.Detector(panels, hierarchy_groups(detector.to_dict().get("hierarchy")))


def goniometer_model(goniometer) -> models.Goniometer:
    kind = "multi-axis" if hasattr(goniometer, "get_axes") else "single-axis"
    return models.Goniometer(
        axis=_vector(goniometer.get_rotation_axis_datum()),
        fixed_rotation=_matrix(goniometer.get_fixed_rotation()),
        setting_rotation=_matrix(goniometer.get_setting_rotation()),
        setting_rotation_at_scan_points=_scan_points(goniometer, "get_setting_rotation_at_scan_point", _matrix),
        kind=kind,
    )


def scan_model(scan) -> models.Scan:
    first, last = (int(i) for i in scan.get_image_range())
    if not scan.has_property("oscillation") and scan.has_property("time_of_flight"):  # a time-of-flight scan
        return models.Scan((first, last), (0.0, 0.0), np.array(list(scan.get_property("time_of_flight")), dtype=float))
    start, width = (float(v) for v in scan.get_oscillation(deg=False))
    return models.Scan((first, last), (start, width))


def crystal_model(crystal) -> models.Crystal:
    return models.Crystal(A=_matrix(crystal.get_A()),
                          A_at_scan_points=_scan_points(crystal, "get_A_at_scan_point", _matrix))


def experiments_from_dxtbx(experiment_list) -> models.ExperimentList:
    """A dxtbx ExperimentList as the plain models the numpy core reads."""
    out = models.ExperimentList()
    converted = {}  # one plain model per dxtbx model, shared as the experiments share it (as the .expt reader does)

    def convert(model, function):
        if model is None:
            return None
        if id(model) not in converted:  # the model held too, so that its id is not another's while we run
            converted[id(model)] = (model, function(model))
        return converted[id(model)][1]

    for experiment in experiment_list:
        out.experiments.append(
            models.Experiment(
                identifier=str(experiment.identifier),
                beam=convert(experiment.beam, beam_model),
                detector=convert(experiment.detector, detector_model),
                goniometer=convert(experiment.goniometer, goniometer_model),
                scan=convert(experiment.scan, scan_model),
                crystal=convert(experiment.crystal, crystal_model),
            )
        )
    return out


# -- the table ------------------------------------------------------------------

def _flex_column(type_name, array):
    """The flex array (sharing memory, through flumpy) of an output column:
    double, vec2<double> or vec3<double>; ``array`` must outlive it."""
    from dxtbx import flumpy

    if type_name in ("vec3<double>", "vec2<double>"):
        return flumpy.vec_from_numpy(array)
    if type_name == "double":
        return flumpy.from_numpy(array)
    raise TypeError(f"no flex type for {type_name}")


class NativeTable:
    """A ``flex.reflection_table`` seen through the interface the program uses.

    ``source``: the same file as the standalone reader's ReflectionTable (a
    memory map), or None for a format only DIALS reads. With it the output is
    written as the standalone backend writes it: the input's columns copied
    byte for byte in the kernel while the program computes, the new ones put
    in place as they come (DIALS' ``as_file`` re-encodes every column in one
    go at the end: 1.2 s of a 1M-row run). Without it, ``as_file`` writes."""

    def __init__(self, table, notes=(), source=None):
        self.table = table
        self.notes = list(notes)  # what the reader had to say about the file
        self.source = source
        self._keep = []  # numpy arrays that flex columns made by flumpy point into

    @property
    def nrows(self) -> int:
        return len(self.table)

    @property
    def identifiers(self) -> dict:
        mapping = self.table.experiment_identifiers()
        return {int(k): str(v) for k, v in zip(mapping.keys(), mapping.values())}

    def __contains__(self, name) -> bool:
        return name in self.table

    def columns(self) -> dict[str, np.ndarray]:
        """Numpy views (flumpy, no copy) of the columns the numpy core reads."""
        from dxtbx import flumpy

        return {name: flumpy.to_numpy(self.table[name]) for name in CORE_COLUMNS if name in self.table}

    def release_memory(self) -> None:
        """flex columns live in this process's memory; the source file's mapped pages are let go."""
        if self.source is not None:
            self.source.release_memory()

    def release_rows(self, start: int, stop: int) -> None:
        """As :meth:`release_memory`, for the pages of rows ``start`` to ``stop``."""
        if self.source is not None:
            self.source.release_rows(start, stop)

    def set_column(self, name, type_name, values) -> None:
        array = np.ascontiguousarray(values, dtype=float)
        if len(array) != self.nrows:
            raise ValueError(f"column {name}: {len(array)} rows for a table of {self.nrows}")
        self._keep.append(array)
        self.table[name] = _flex_column(type_name, array)

    def remove_column(self, name) -> None:
        """Leave column ``name`` out of the table, and of the source file's copy when it writes."""
        del self.table[name]
        if self.source is not None:
            self.source.remove_column(name)

    def stage(self, outputs, path) -> None:
        """Write with DIALS' own ``as_file`` into a staged temporary file."""
        try:
            self.table.as_file(outputs.reserve(path))
        except OSError as error:  # a full disk, a file size limit
            raise QConsistencyError(f"cannot be written ({error.strerror})", path) from None

    def begin_write(self, outputs, path, new_columns):
        """The standalone writer's TableWriter over the source file; without
        one, DIALS writes the table in one go at ``finish``, with the new columns."""
        if self.source is not None:
            return self.source.begin_write(outputs, path, new_columns)
        return _WriteWhenFinished(self, lambda: self.stage(outputs, path))


class _WriteWhenFinished:
    """A :class:`backends.TableWrite` over a NativeTable: the new columns are set
    in the flex table as they come, and DIALS writes it whole at :meth:`close`
    (errors are raised there; :meth:`finish` has nothing left to wait for)."""

    def __init__(self, table, write):
        self.table = table
        self._write = write

    def put(self, name, type_name, values) -> None:
        self.table.set_column(name, type_name, column_values(values, self.table.nrows))

    def close(self) -> None:
        if self._write is not None:
            write, self._write = self._write, None
            write()

    def failed(self) -> bool:
        return False

    def finish(self) -> None:
        self.close()


def _one_line(error) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


class Native:
    """Reads with dxtbx and DIALS; writes msgpack tables as the standalone
    backend does (the same bytes), others with ``as_file``.

    Each file is first checked by the standalone reader, the one place that
    says what is wrong with a broken file, so that both backends refuse the
    same files with the same line (DIALS accepts some broken ones silently,
    and names the problem of others vaguely). Tables that DIALS reads and the
    standalone reader does not (a pickle of older DIALS, an HDF5 table) are
    read by DIALS, and the log says so.
    """

    name = "native"

    @staticmethod
    def read_experiments(path):
        from dxtbx.model.experiment_list import ExperimentListFactory

        checked, document = read_experiments_and_document(path)
        try:
            experiment_list = ExperimentListFactory.from_dict(
                models_only(document), check_format=False, directory=os.path.dirname(os.path.abspath(path))
            )
        except Exception as error:  # dxtbx raises many kinds
            raise QConsistencyError(f"cannot be read as an experiment list by dxtbx: {_one_line(error)}", path) from None
        try:
            converted = experiments_from_dxtbx(experiment_list)
        except ValueError as error:
            raise QConsistencyError(str(error), path) from None
        converted.notes = checked.notes
        return converted

    @staticmethod
    def read_table(path):
        from dials.array_family import flex

        other_format = source = None
        try:
            source = ReflectionTable.from_file(path)
        except OtherTableFormat as error:
            other_format = error
        try:
            table = flex.reflection_table.from_file(path)
        except Exception as error:  # DIALS raises many kinds
            if other_format is None:
                raise QConsistencyError(f"cannot be read as a reflection table by DIALS: {_one_line(error)}", path) from None
            if other_format.kind == "pickle":
                raise QConsistencyError(
                    f"is a Python pickle (the reflection-table format of older DIALS versions) that DIALS cannot "
                    f"read as a reflection table either ({type(error).__name__}: {_one_line(error)})", path) from None
            raise other_format from None
        notes = []
        if other_format is not None:
            notes.append(f"{path} is {OTHER_FORMATS[other_format.kind]}, read by DIALS; "
                         "the output table is written as msgpack")
        return NativeTable(table, notes, source)


#: What dxtbx is not given: the program reads models, not images (no image file
#: need exist), nor profile or scaling models.
UNUSED_MODELS = ("imageset", "profile", "scaling_model")


def models_only(document) -> dict:
    """An ExperimentList document without the entries the program does not use."""
    out = {key: value for key, value in document.items() if key not in UNUSED_MODELS}
    out["experiment"] = [
        {key: value for key, value in entry.items() if key not in UNUSED_MODELS} for entry in document["experiment"]
    ]
    return out


#: Table formats DIALS reads that the standalone reader does not.
OTHER_FORMATS = {"pickle": "a Python pickle (older DIALS)", "hdf5": "an HDF5 reflection table"}


# -- the command line and the log ---------------------------------------------------


def parse(args, files, phil, usage, epilog):
    """DIALS' ArgumentParser over the options and PHIL words of ``args``.

    The input ``files`` (already told apart by the standalone parser) are
    taken out first: each pair is read on its own, checked, by
    :class:`Native`. Returns None when there is nothing to do (no arguments:
    the help is printed; ``-c`` and ``-h`` print and exit inside DIALS'
    parser), else (params, verbosity, diff). Arguments DIALS cannot handle
    give one line naming the first of them.
    """
    from dials.util.options import ArgumentParser
    from libtbx.utils import Sorry

    parser = ArgumentParser(usage=usage, phil=phil, read_experiments=False, read_reflections=False, epilog=epilog)
    if not args:
        parser.print_help()
        return None
    files = set(files)
    words = [arg for arg in args if arg not in files]
    stdin = sys.stdin
    if "--phil=-" in words or any(a == "--phil" and b == "-" for a, b in zip(words, words[1:])):
        sys.stdin = io.StringIO(backends.standard_input())  # read once, by the standalone parser first
    try:
        params, options, unhandled = parser.parse_args(args=words, show_diff_phil=False, return_unhandled=True)
    except Sorry as error:
        raise QConsistencyError(_one_line(error)) from None
    finally:
        sys.stdin = stdin
    if unhandled:  # the standalone parser has refused what DIALS' would not use
        raise QConsistencyError(f"bad parameter {unhandled[0]!r}")
    return params, options.verbose, parser.diff_phil.as_str()


#: The loggers dials.util.log.config gives handlers.
DIALS_LOGGERS = ("dials", "dxtbx", "xfel", "py.warnings")


def setup_logging(logger, log_path, verbosity=0):
    """DIALS' logging (dials.util.log.config with the log file); the handlers it
    adds are kept in ``logger.native_handlers`` for close_logging. DIALS'
    banner is held back for :func:`show_banner`, once the caller has set the
    handlers up."""
    import dials.util.log

    owners = [logging.getLogger(name) for name in DIALS_LOGGERS]
    before = {id(handler) for owner in owners for handler in owner.handlers}
    chosen = os.environ.get("DIALS_NOBANNER")
    os.environ["DIALS_NOBANNER"] = "1"
    try:
        dials.util.log.config(verbosity=verbosity, logfile=log_path)
    finally:
        if chosen is None:
            del os.environ["DIALS_NOBANNER"]
        else:
            os.environ["DIALS_NOBANNER"] = chosen
    logger.native_handlers = [(o, h) for o in owners for h in o.handlers if id(h) not in before]
    logger.propagate = True
    logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)


def show_banner():
    """DIALS' citation banner, logged as dials.util.log.config logs it (once a
    process, not with DIALS_NOBANNER set)."""
    import dials.util.log

    dials.util.log.print_banner(use_logging=True)


def version_line() -> str:
    from dials.util.version import dials_version

    return dials_version()

