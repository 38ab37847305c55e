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
from dials_qconsistency.core.geometry import cross, rotation_matrix, unit
from dials_qconsistency.model.experiment import (
    MAX_MAGNITUDE,
    Beam,
    Crystal,
    Detector,
    Experiment,
    ExperimentList,
    Goniometer,
    Panel,
    PanelGroup,
    Scan,
)

_SIMPLE = "SimplePxMmStrategy"
_PARALLAX = "ParallaxCorrectedPxMmStrategy"
_OFFSET = "OffsetPxMmStrategy"
_OFFSET_PARALLAX = "OffsetParallaxCorrectedPxMmStrategy"


class _Bad(Exception):
    """Internal: a problem inside one model, re-raised with the file name."""


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
    except _Bad as error:
        raise QConsistencyError(str(error), path) from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, np.linalg.LinAlgError) as error:
        raise QConsistencyError(f"is a malformed experiment list ({type(error).__name__}: {str(error):.80})", path) from None


def experiments_from_dict(document) -> ExperimentList:
    if not isinstance(document, dict) or document.get("__id__") != "ExperimentList":
        raise _Bad("is not a dxtbx ExperimentList (no __id__: ExperimentList)")
    entries = document.get("experiment")
    if not isinstance(entries, list):
        raise _Bad("ExperimentList has no 'experiment' list")

    notes: list[str] = []
    cache: dict[tuple[str, int], object] = {}
    readers = {
        "beam": _beam,
        "detector": lambda d: _detector(d, notes),
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
            raise _Bad(f"experiment {index} refers to {kind} {reference!r}, which is not in the file")
        key = (kind, reference)
        if key not in cache:
            try:
                cache[key] = readers[kind](models[reference])
            except _Bad as error:
                raise _Bad(f"{kind} {reference}: {error}") from None
            except (KeyError, TypeError, ValueError, IndexError, OverflowError, np.linalg.LinAlgError) as error:
                raise _Bad(f"{kind} {reference} is malformed ({type(error).__name__}: {error})") from None
        return cache[key]

    experiments = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _Bad(f"experiment {index} is not a JSON object")
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
            raise _Bad(f"experiment {index} has {name} (a scan-varying model) but no scan")
        needed = experiment.scan.num_images + 1
        if len(values) != needed:
            raise _Bad(
                f"experiment {index}: {name} has {len(values)} states but its scan of "
                f"{experiment.scan.num_images} images needs {needed}"
            )


def _vec(values, n=3) -> np.ndarray:
    if type(values) is list and len(values) == n and all(type(v) is float or type(v) is int for v in values):
        # the usual case, checked in Python: a detector hierarchy has hundreds of these
        if all(math.isfinite(v) and abs(v) <= MAX_MAGNITUDE for v in values):
            return np.array(values, dtype=float)
    array = np.asarray(values, dtype=float)
    if array.shape != (n,):
        raise _Bad(f"expected {n} numbers, got {values!r:.60}")
    if not np.all(np.isfinite(array)):
        raise _Bad(f"holds a number that is not finite: {values!r:.60}")
    if np.any(np.abs(array) > MAX_MAGNITUDE):
        raise _Bad(f"holds a number too large for a model: {values!r:.60}")
    return array


def _direction(values) -> np.ndarray:
    """A unit vector from three model numbers; a zero vector has no direction."""
    vector = _vec(values)
    length = np.linalg.norm(vector)
    if not length > 1e-12:
        raise _Bad(f"has a direction of zero length: {values!r:.60}")
    return vector / length


def _number(value) -> float:
    """One finite model number of plausible size."""
    return float(_vec([value], 1)[0])


def _scan_points(values, shape) -> np.ndarray | None:
    """A model's per-scan-point values (finite), or None when absent."""
    if not values:
        return None
    array = np.asarray(values, dtype=float).reshape((-1,) + shape)
    if not np.all(np.isfinite(array)) or np.any(np.abs(array) > MAX_MAGNITUDE):
        raise _Bad("has scan-point values that are not finite or too large")
    return array


def _mat(values) -> np.ndarray:
    return _vec(values, 9).reshape(3, 3)


#: dxtbx beam model types (``__id__``).
POLYCHROMATIC_TYPES = ("polychromatic", "PolychromaticBeam")


def _beam(d) -> Beam:
    kind = d.get("__id__", "monochromatic")
    if kind in POLYCHROMATIC_TYPES:
        return _polychromatic_beam(d)
    if kind not in ("monochromatic", "Beam"):
        raise _Bad(f"beam type {kind!r:.40} is not supported (monochromatic and polychromatic beams are)")
    if "direction" in d:
        direction = _direction(d["direction"])
        wavelength = _number(d["wavelength"])
    elif "s0" in d:
        direction = -_direction(d["s0"])
        wavelength = 1.0 / np.linalg.norm(_vec(d["s0"]))
    else:
        raise _Bad("has neither direction nor s0")
    if not 1e-4 <= wavelength <= 1e4:
        raise _Bad(f"wavelength {wavelength:g} Å is not a plausible wavelength (1e-4 to 1e4 Å)")
    s0 = -direction / wavelength
    scan_points = _scan_points(d.get("s0_at_scan_points"), (3,))
    return Beam(s0=s0, wavelength=wavelength, s0_at_scan_points=scan_points, probe=str(d.get("probe", "xray")))


def _polychromatic_beam(d) -> Beam:
    """A polychromatic beam: a direction, the source distance and a wavelength
    range; each reflection's wavelength comes from the table."""
    if "direction" not in d:
        raise _Bad("polychromatic beam has no direction")
    direction = _direction(d["direction"])
    distance = _number(d.get("sample_to_source_distance", 0.0))  # 0 (dxtbx's default): no flight path known
    if distance < 0:
        raise _Bad(f"polychromatic beam: sample_to_source_distance {distance:g} mm is negative")
    low, high = (_number(v) for v in d.get("wavelength_range", (0.0, 0.0)))
    return Beam(s0=None, wavelength=None, polychromatic=True, unit_s0=-direction, sample_to_source_distance=distance,
                wavelength_range=(low, high), probe=str(d.get("probe", "xray")))


def _frame(node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fast, slow = _direction(node["fast_axis"]), _direction(node["slow_axis"])
    if np.linalg.norm(cross(fast, slow)) < 1e-6:
        raise _Bad(f"fast and slow axes are parallel: {node['fast_axis']!r:.40} and {node['slow_axis']!r:.40}")
    return fast, slow, _vec(node["origin"])


def _compose(parent, local):
    """Lab frame of a child from its parent's lab frame and its local frame."""
    p_fast, p_slow, p_origin = (unit(parent[0]), unit(parent[1]), parent[2])
    orientation = np.column_stack([p_fast, p_slow, cross(p_fast, p_slow)])
    fast, slow, origin = local
    return orientation @ fast, orientation @ slow, orientation @ origin + p_origin


def _detector(d, notes) -> Detector:
    panel_dicts = d["panels"]
    if not isinstance(panel_dicts, list) or not panel_dicts:
        raise _Bad("has no panels")
    identity = (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3))
    frames: list = [None] * len(panel_dicts)

    def walk(node, parent_frame, depth) -> None:
        if depth > 64:
            raise _Bad("hierarchy is too deep (a cycle?)")
        if "panel" in node:
            index = node["panel"]
            if not isinstance(index, int) or not 0 <= index < len(panel_dicts):
                raise _Bad(f"hierarchy names panel {index!r}, which does not exist")
            if frames[index] is not None:
                raise _Bad(f"hierarchy names panel {index} twice")
            frames[index] = _compose(parent_frame, _frame(panel_dicts[index]))
            return
        frame = _compose(parent_frame, _frame(node))
        for child in node.get("children", []):
            walk(child, frame, depth + 1)

    hierarchy = d.get("hierarchy")
    if hierarchy:
        walk(hierarchy, identity, 0)
        missing = [i for i, f in enumerate(frames) if f is None]
        if missing:
            raise _Bad(f"panel {missing[0]} is not in the detector hierarchy")
    else:
        frames = [_compose(identity, _frame(p)) for p in panel_dicts]

    panels = []
    for index, (p, (fast, slow, origin)) in enumerate(zip(panel_dicts, frames)):
        mu = _number(p.get("mu", 0.0))
        thickness = _number(p.get("thickness", 0.0))
        strategy = (p.get("px_mm_strategy") or {}).get("type", _SIMPLE)
        st = p.get("px_mm_strategy") or {}
        if "mu" in st and "t0" in st:
            mu, thickness = _number(st["mu"]), _number(st["t0"])
        note = ""
        if strategy not in (_SIMPLE, _PARALLAX, _OFFSET, _OFFSET_PARALLAX):
            raise _Bad(f"panel {index} has unknown px_mm_strategy {strategy!r}")
        parallax = strategy in (_PARALLAX, _OFFSET_PARALLAX)
        if strategy in (_OFFSET, _OFFSET_PARALLAX):
            note = (
                f"panel {index}: {strategy} without its dx/dy offset maps in the .expt; "
                "the offsets are not applied (as dxtbx does when reading the file alone)"
            )
        if parallax and not (mu > 0 and thickness > 0):
            parallax = False
            note = (
                f"panel {index}: parallax correction requested but mu/thickness are not set; "
                "the simple pixel->mm mapping is used (as dxtbx does)"
            )
        if note:
            notes.append(note)
        panels.append(
            Panel(
                name=str(p.get("name", "")),
                origin=origin,
                fast=fast,
                slow=slow,
                pixel_size=_vec(p["pixel_size"], 2),
                image_size=np.asarray(p["image_size"], dtype=int).reshape(2),
                thickness=thickness,
                mu=mu,
                parallax=parallax,
            )
        )
    return Detector(panels, hierarchy_groups(hierarchy))


def hierarchy_groups(hierarchy) -> list[PanelGroup]:
    """The groups below the root of a detector hierarchy dict (as in the .expt
    and dxtbx's ``Detector.to_dict()``, leaves naming panels by index), ordered
    by depth, then by first panel."""
    groups: list[PanelGroup] = []

    def walk(node, depth) -> list[int]:
        if "panel" in node:
            return [node["panel"]]
        below = [index for child in node.get("children", []) for index in walk(child, depth + 1)]
        if depth > 0:
            groups.append(PanelGroup(str(node.get("name", "")) or f"group {len(groups)}", depth, below))
        return below

    if hierarchy:
        walk(hierarchy, 0)
    return sorted(groups, key=lambda group: (group.depth, group.panels[0] if group.panels else -1))


def _goniometer(d) -> Goniometer:
    scan_points = _scan_points(d.get("setting_rotation_at_scan_points"), (3, 3))
    if {"axes", "angles", "scan_axis"} <= set(d):
        axes = [_direction(a) for a in d["axes"]]
        angles = [math.radians(_number(a)) for a in d["angles"]]
        scan_axis = int(d["scan_axis"])
        if not axes or len(angles) != len(axes) or not 0 <= scan_axis < len(axes):
            raise _Bad("multi-axis goniometer axes/angles/scan_axis do not agree")
        fixed = np.eye(3)
        for axis, angle in zip(axes[:scan_axis], angles[:scan_axis]):
            fixed = rotation_matrix(axis, angle) @ fixed
        setting = np.eye(3)
        for axis, angle in zip(axes[scan_axis + 1 :], angles[scan_axis + 1 :]):
            setting = rotation_matrix(axis, angle) @ setting
        return Goniometer(unit(axes[scan_axis]), fixed, setting, scan_points, "multi-axis")
    fixed = _rotation(d.get("fixed_rotation", np.eye(3).ravel()), "fixed_rotation")
    setting = _rotation(d.get("setting_rotation", np.eye(3).ravel()), "setting_rotation")
    return Goniometer(_direction(d["rotation_axis"]), fixed, setting, scan_points)


def _rotation(values, name) -> np.ndarray:
    """A 3x3 orthogonal matrix (R·Rᵀ = I to 1e-3). A mirror (det −1) is let through:
    it is a frame mistake that the diagnosis exists to name."""
    matrix = _mat(values)
    if not np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-3):
        raise _Bad(f"{name} is not a rotation matrix (R·Rᵀ ≠ I): {values!r:.60}")
    return matrix


def _scan(d) -> Scan:
    first, last = (int(_number(v)) for v in d["image_range"])
    if last < first:
        raise _Bad(f"image_range {first}..{last} is empty")
    n_images = last - first + 1
    time_of_flight = None
    if "properties" in d:
        properties = d["properties"]
        if "time_of_flight" in properties:
            time_of_flight = np.array([_number(v) for v in properties["time_of_flight"]], dtype=float)
            if time_of_flight.size != n_images:
                raise _Bad(f"has {time_of_flight.size} time-of-flight values for {n_images} images")
        starts = [math.radians(_number(v)) for v in properties.get("oscillation", [])]
        if not starts:
            oscillation = (0.0, 0.0)
        elif n_images == 1:
            widths = properties.get("oscillation_width", [0.0])
            oscillation = (starts[0], math.radians(_number(widths[0])))
        else:
            if len(starts) != n_images:
                raise _Bad(f"has {len(starts)} oscillation angles for {n_images} images")
            oscillation = (starts[0], starts[1] - starts[0])
    else:
        start, width = d.get("oscillation", (0.0, 0.0))
        oscillation = (math.radians(_number(start)), math.radians(_number(width)))
    return Scan((first, last), oscillation, time_of_flight)


#: dxtbx crystal model types (``__id__``); all carry A = U·B the same way.
CRYSTAL_TYPES = ("crystal", "MosaicCrystalKabsch2010", "MosaicCrystalSauter2014")


def _crystal(d) -> Crystal:
    kind = d.get("__id__", "crystal")
    if kind not in CRYSTAL_TYPES:
        raise _Bad(f"crystal type {kind!r:.40} is not a dxtbx crystal model ({', '.join(CRYSTAL_TYPES)})")
    real_space = np.array(
        [_vec(d["real_space_a"]), _vec(d["real_space_b"]), _vec(d["real_space_c"])]
    )
    volume = abs(np.linalg.det(real_space))
    if not volume > 1e-9 * np.prod(np.linalg.norm(real_space, axis=1)):
        raise _Bad("real-space axes a, b, c do not span a cell (zero volume)")
    A = np.linalg.inv(real_space)
    scan_points = _scan_points(d.get("A_at_scan_points"), (3, 3))
    return Crystal(A=A, A_at_scan_points=scan_points)
