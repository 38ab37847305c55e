"""Read a dxtbx ExperimentList (``.expt`` JSON) into the models of :mod:`dials_qconsistency.model.experiment` without dxtbx.

Follows dxtbx's ``from_dict`` for each model: panel axes are normalised and the
detector ``hierarchy`` is composed from the root down (a child's lab frame is
its parent's orientation [f s n] times its local frame, plus the parent
origin); a multi-axis goniometer gives F (axes below the scan axis), S (axes
above) and the scan axis exactly as ``MultiAxisGoniometer`` does; crystals give
A = inverse of the matrix with rows a, b, c.
"""

from __future__ import annotations

import json
import math

import numpy as np

from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.io.staged import read_input_file
from dials_qconsistency.core.geometry import rotation_matrix, unit
from dials_qconsistency.io.expt_detector import read_detector
from dials_qconsistency.io.expt_values import ModelProblem, as_direction, as_matrix, as_number, as_scan_points, as_vector
from dials_qconsistency.model.experiment import Beam, Crystal, Experiment, ExperimentList, Goniometer, Scan


def read_experiments(path: str) -> ExperimentList:
    """Read an ``.expt`` (or old ``experiments.json``) file."""
    return read_experiments_and_document(path)[0]


def read_experiments_and_document(path: str) -> tuple[ExperimentList, dict]:
    """The experiment list of an ``.expt`` file and its decoded JSON document
    (which the native backend hands on to dxtbx); one-line errors name ``path``."""
    document = _document_from_bytes(read_input_file(path, "an experiment list"), path)
    return _checked_experiments(document, path), document


def experiments_from_bytes(raw: bytes, path: str = "<bytes>") -> ExperimentList:
    """An experiment list from the bytes of an ``.expt`` file; one-line errors name ``path``."""
    return _checked_experiments(_document_from_bytes(raw, path), path)


def _document_from_bytes(raw: bytes, path: str):
    if not raw.strip():
        raise QConsistencyError("is empty, not an experiment list", path)
    if raw[:1] == b"\x93" or raw[:2] == b"\x80\x02":
        raise QConsistencyError("is a reflection table or a pickle, not an experiment list (.expt JSON)", path)
    try:
        text = raw.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        raise QConsistencyError("is not JSON text, so not an experiment list (.expt)", path) from None
    except RecursionError:
        raise QConsistencyError("is JSON nested too deeply to be an experiment list", path) from None
    except json.JSONDecodeError as error:
        ends_early = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
        problem = "ends in the middle of the JSON (a half-written file?)" if ends_early and text.strip() else (
            "is not JSON, so not an experiment list")
        raise QConsistencyError(f"{problem} ({error.msg} at line {error.lineno})", path) from None


def _checked_experiments(document, path: str) -> ExperimentList:
    try:
        return experiments_from_dict(document)
    except ModelProblem as error:
        raise QConsistencyError(str(error), path) from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, np.linalg.LinAlgError) as error:
        raise QConsistencyError(f"is a malformed experiment list ({type(error).__name__}: {str(error):.80})", path) from None


def experiments_from_dict(document) -> ExperimentList:
    if not isinstance(document, dict) or document.get("__id__") != "ExperimentList":
        raise ModelProblem("is not a dxtbx ExperimentList (no __id__: ExperimentList)")
    entries = document.get("experiment")
    if not isinstance(entries, list):
        raise ModelProblem("ExperimentList has no 'experiment' list")

    notes: list[str] = []
    cache: dict[tuple[str, int], object] = {}
    readers = {
        "beam": _beam,
        "detector": lambda d: read_detector(d, notes),
        "goniometer": _goniometer,
        "scan": _scan,
        "crystal": _crystal,
    }

    def model(kind, entry, index):
        reference = entry.get(kind)
        if reference is None:
            return None
        models = document.get(kind) or []
        if not isinstance(reference, int) or not 0 <= reference < len(models):
            raise ModelProblem(f"experiment {index} refers to {kind} {reference!r}, which is not in the file")
        key = (kind, reference)
        if key not in cache:
            try:
                cache[key] = readers[kind](models[reference])
            except ModelProblem as error:
                raise ModelProblem(f"{kind} {reference}: {error}") from None
            except (KeyError, TypeError, ValueError, IndexError, OverflowError, np.linalg.LinAlgError) as error:
                raise ModelProblem(f"{kind} {reference} is malformed ({type(error).__name__}: {error})") from None
        return cache[key]

    experiments = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ModelProblem(f"experiment {index} is not a JSON object")
        experiment = Experiment(
            identifier=str(entry.get("identifier", "")),
            beam=model("beam", entry, index),
            detector=model("detector", entry, index),
            goniometer=model("goniometer", entry, index),
            scan=model("scan", entry, index),
            crystal=model("crystal", entry, index),
        )
        _check_scan_points(experiment, index)
        experiments.append(experiment)
    return ExperimentList(experiments, sorted(set(notes)))


def _check_scan_points(experiment, index) -> None:
    """Scan-varying models need a scan, with one state per image boundary."""
    states = {
        "A_at_scan_points": getattr(experiment.crystal, "A_at_scan_points", None),
        "setting_rotation_at_scan_points": getattr(experiment.goniometer, "setting_rotation_at_scan_points", None),
        "s0_at_scan_points": getattr(experiment.beam, "s0_at_scan_points", None),
    }
    for name, values in states.items():
        if values is None:
            continue
        if experiment.scan is None:
            raise ModelProblem(f"experiment {index} has {name} (a scan-varying model) but no scan")
        needed = experiment.scan.num_images + 1
        if len(values) != needed:
            raise ModelProblem(
                f"experiment {index}: {name} has {len(values)} states but its scan of "
                f"{experiment.scan.num_images} images needs {needed}"
            )


#: dxtbx beam model types (``__id__``).
POLYCHROMATIC_TYPES = ("polychromatic", "PolychromaticBeam")


def _beam(d) -> Beam:
    kind = d.get("__id__", "monochromatic")
    if kind in POLYCHROMATIC_TYPES:
        return _polychromatic_beam(d)
    if kind not in ("monochromatic", "Beam"):
        raise ModelProblem(f"beam type {kind!r:.40} is not supported (monochromatic and polychromatic beams are)")
    if "direction" in d:
        direction = as_direction(d["direction"])
        wavelength = as_number(d["wavelength"])
    elif "s0" in d:
        direction = -as_direction(d["s0"])
        wavelength = 1.0 / np.linalg.norm(as_vector(d["s0"]))
    else:
        raise ModelProblem("has neither direction nor s0")
    if not 1e-4 <= wavelength <= 1e4:
        raise ModelProblem(f"wavelength {wavelength:g} Å is not a plausible wavelength (1e-4 to 1e4 Å)")
    s0 = -direction / wavelength
    scan_points = as_scan_points(d.get("s0_at_scan_points"), (3,))
    return Beam(s0=s0, wavelength=wavelength, s0_at_scan_points=scan_points, probe=str(d.get("probe", "xray")))


def _polychromatic_beam(d) -> Beam:
    """A polychromatic beam: a direction, the source distance and a wavelength
    range; each reflection's wavelength comes from the table."""
    if "direction" not in d:
        raise ModelProblem("polychromatic beam has no direction")
    direction = as_direction(d["direction"])
    distance = as_number(d.get("sample_to_source_distance", 0.0))  # 0 (dxtbx's default): no flight path known
    if distance < 0:
        raise ModelProblem(f"polychromatic beam: sample_to_source_distance {distance:g} mm is negative")
    low, high = (as_number(v) for v in d.get("wavelength_range", (0.0, 0.0)))
    return Beam(s0=None, wavelength=None, polychromatic=True, unit_s0=-direction, sample_to_source_distance=distance,
                wavelength_range=(low, high), probe=str(d.get("probe", "xray")))


def _goniometer(d) -> Goniometer:
    scan_points = as_scan_points(d.get("setting_rotation_at_scan_points"), (3, 3))
    if {"axes", "angles", "scan_axis"} <= set(d):
        axes = [as_direction(a) for a in d["axes"]]
        angles = [math.radians(as_number(a)) for a in d["angles"]]
        scan_axis = int(d["scan_axis"])
        if not axes or len(angles) != len(axes) or not 0 <= scan_axis < len(axes):
            raise ModelProblem("multi-axis goniometer axes/angles/scan_axis do not agree")
        fixed = np.eye(3)
        for axis, angle in zip(axes[:scan_axis], angles[:scan_axis]):
            fixed = rotation_matrix(axis, angle) @ fixed
        setting = np.eye(3)
        for axis, angle in zip(axes[scan_axis + 1 :], angles[scan_axis + 1 :]):
            setting = rotation_matrix(axis, angle) @ setting
        return Goniometer(unit(axes[scan_axis]), fixed, setting, scan_points, "multi-axis")
    fixed = _rotation(d.get("fixed_rotation", np.eye(3).ravel()), "fixed_rotation")
    setting = _rotation(d.get("setting_rotation", np.eye(3).ravel()), "setting_rotation")
    return Goniometer(as_direction(d["rotation_axis"]), fixed, setting, scan_points)


def _rotation(values, name) -> np.ndarray:
    """A 3x3 orthogonal matrix (R·Rᵀ = I to 1e-3). A mirror (det −1) is let through:
    it is a frame mistake that the diagnosis exists to name."""
    matrix = as_matrix(values)
    if not np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-3):
        raise ModelProblem(f"{name} is not a rotation matrix (R·Rᵀ ≠ I): {values!r:.60}")
    return matrix


def _scan(d) -> Scan:
    first, last = (int(as_number(v)) for v in d["image_range"])
    if last < first:
        raise ModelProblem(f"image_range {first}..{last} is empty")
    n_images = last - first + 1
    time_of_flight = None
    if "properties" in d:
        properties = d["properties"]
        if "time_of_flight" in properties:
            time_of_flight = np.array([as_number(v) for v in properties["time_of_flight"]], dtype=float)
            if time_of_flight.size != n_images:
                raise ModelProblem(f"has {time_of_flight.size} time-of-flight values for {n_images} images")
        starts = [math.radians(as_number(v)) for v in properties.get("oscillation", [])]
        if not starts:
            oscillation = (0.0, 0.0)
        elif n_images == 1:
            widths = properties.get("oscillation_width", [0.0])
            oscillation = (starts[0], math.radians(as_number(widths[0])))
        else:
            if len(starts) != n_images:
                raise ModelProblem(f"has {len(starts)} oscillation angles for {n_images} images")
            oscillation = (starts[0], starts[1] - starts[0])
    else:
        start, width = d.get("oscillation", (0.0, 0.0))
        oscillation = (math.radians(as_number(start)), math.radians(as_number(width)))
    return Scan((first, last), oscillation, time_of_flight)


#: dxtbx crystal model types (``__id__``); all carry A = U·B the same way.
CRYSTAL_TYPES = ("crystal", "MosaicCrystalKabsch2010", "MosaicCrystalSauter2014")


def _crystal(d) -> Crystal:
    kind = d.get("__id__", "crystal")
    if kind not in CRYSTAL_TYPES:
        raise ModelProblem(f"crystal type {kind!r:.40} is not a dxtbx crystal model ({', '.join(CRYSTAL_TYPES)})")
    real_space = np.array(
        [as_vector(d["real_space_a"]), as_vector(d["real_space_b"]), as_vector(d["real_space_c"])]
    )
    volume = abs(np.linalg.det(real_space))
    if not volume > 1e-9 * np.prod(np.linalg.norm(real_space, axis=1)):
        raise ModelProblem("real-space axes a, b, c do not span a cell (zero volume)")
    A = np.linalg.inv(real_space)
    scan_points = as_scan_points(d.get("A_at_scan_points"), (3, 3))
    return Crystal(A=A, A_at_scan_points=scan_points)
