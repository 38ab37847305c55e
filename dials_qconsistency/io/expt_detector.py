"""The detector of an .expt: panels composed down the hierarchy into the lab
frame (each node's origin and axes are local to its parent), the px -> mm
strategy of each panel (parallax where dxtbx applies it), and the groups of
the hierarchy at each depth.
"""

from __future__ import annotations

import math

import numpy as np

from dials_qconsistency.core.geometry import cross, unit
from dials_qconsistency.io.expt_values import ModelProblem, as_direction, as_number, as_vector
from dials_qconsistency.model.experiment import Detector, Panel, PanelGroup

_SIMPLE = "SimplePxMmStrategy"


_PARALLAX = "ParallaxCorrectedPxMmStrategy"


_OFFSET = "OffsetPxMmStrategy"


_OFFSET_PARALLAX = "OffsetParallaxCorrectedPxMmStrategy"


def _frame(node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fast, slow = as_direction(node["fast_axis"]), as_direction(node["slow_axis"])
    (fx, fy, fz), (sx, sy, sz) = fast.tolist(), slow.tolist()
    if math.hypot(fy * sz - fz * sy, fz * sx - fx * sz, fx * sy - fy * sx) < 1e-6:
        raise ModelProblem(f"fast and slow axes are parallel: {node['fast_axis']!r:.40} and {node['slow_axis']!r:.40}")
    return fast, slow, as_vector(node["origin"])


def _orientation(frame) -> tuple[np.ndarray, np.ndarray]:
    """(rotation [fast | slow | fast × slow], origin) of a lab frame, into
    which its children's local frames are composed."""
    fast, slow, origin = unit(frame[0]), unit(frame[1]), frame[2]
    return np.column_stack([fast, slow, cross(fast, slow)]), origin


def _compose(parent, local):
    """Lab frame of a child from its parent's :func:`_orientation` and its local frame."""
    orientation, p_origin = parent
    fast, slow, origin = local
    return orientation @ fast, orientation @ slow, orientation @ origin + p_origin


def _panel_size(index, p) -> tuple[np.ndarray, np.ndarray]:
    """A panel's pixel size (mm, > 0) and image size (pixels, ≥ 1 each way):
    pixels of no size would put every spot at the panel's origin."""
    pixel_size = as_vector(p["pixel_size"], 2)
    if not np.all(pixel_size > 0):
        raise ModelProblem(f"panel {index} has a pixel size of {pixel_size.tolist()} mm (must be > 0)")
    image_size = np.asarray(p["image_size"], dtype=float).reshape(-1)
    whole = np.isfinite(image_size) & (image_size >= 1) & (image_size <= 1e9) & (image_size == np.round(image_size))
    if image_size.shape != (2,) or not np.all(whole):
        raise ModelProblem(f"panel {index} has an image size of {p['image_size']!r:.40} pixels (two whole numbers ≥ 1)")
    return pixel_size, image_size.astype(int)


def read_detector(d, notes) -> Detector:
    panel_dicts = d["panels"]
    if not isinstance(panel_dicts, list) or not panel_dicts:
        raise ModelProblem("has no panels")
    root = _orientation((np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3)))
    frames: list = [None] * len(panel_dicts)

    def walk(node, parent, depth) -> None:
        if depth > 64:
            raise ModelProblem("hierarchy is too deep (a cycle?)")
        if "panel" in node:
            index = node["panel"]
            if not isinstance(index, int) or not 0 <= index < len(panel_dicts):
                raise ModelProblem(f"hierarchy names panel {index!r}, which does not exist")
            if frames[index] is not None:
                raise ModelProblem(f"hierarchy names panel {index} twice")
            frames[index] = _compose(parent, _frame(panel_dicts[index]))
            return
        below = _orientation(_compose(parent, _frame(node)))  # once for all the node's children
        for child in node.get("children", []):
            walk(child, below, depth + 1)

    hierarchy = d.get("hierarchy")
    if hierarchy:
        walk(hierarchy, root, 0)
        missing = [i for i, f in enumerate(frames) if f is None]
        if missing:
            raise ModelProblem(f"panel {missing[0]} is not in the detector hierarchy")
    else:
        frames = [_compose(root, _frame(p)) for p in panel_dicts]

    panels = []
    for index, (p, (fast, slow, origin)) in enumerate(zip(panel_dicts, frames)):
        mu = as_number(p.get("mu", 0.0))
        thickness = as_number(p.get("thickness", 0.0))
        strategy = (p.get("px_mm_strategy") or {}).get("type", _SIMPLE)
        st = p.get("px_mm_strategy") or {}
        if "mu" in st and "t0" in st:
            mu, thickness = as_number(st["mu"]), as_number(st["t0"])
        note = ""
        if strategy not in (_SIMPLE, _PARALLAX, _OFFSET, _OFFSET_PARALLAX):
            raise ModelProblem(f"panel {index} has unknown px_mm_strategy {strategy!r}")
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
        pixel_size, image_size = _panel_size(index, p)
        panels.append(
            Panel(
                name=str(p.get("name", "")),
                origin=origin,
                fast=fast,
                slow=slow,
                pixel_size=pixel_size,
                image_size=image_size,
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

