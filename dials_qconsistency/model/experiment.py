"""Plain geometry models shared by both backends.

Everything is in the DIALS laboratory frame (imgCIF): lengths in mm, angles in
radians, reciprocal vectors in Å⁻¹ without 2π. The standalone reader
(:mod:`dials_qconsistency.io.expt`) and the DIALS backend both fill these,
so the numpy core never sees where the numbers came from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

#: No number in a model or a used table row is larger than this: lengths in mm,
#: cell edges in Å, angles in degrees or radians and s0/s1 in Å⁻¹ stay far
#: below it, and anything above would overflow the geometry (squares, products).
MAX_MAGNITUDE = 1e10


@dataclass
class Beam:
    """A beam. Monochromatic: ``s0 = -unit(direction) / wavelength`` (Å⁻¹).

    Polychromatic (Laue; neutron time of flight): every reflection has its own
    wavelength λ_i (the table's ``wavelength_cal``) and s0_i = ``unit_s0`` / λ_i;
    ``s0`` and ``wavelength`` are then None.
    """

    s0: np.ndarray | None
    wavelength: float | None
    s0_at_scan_points: np.ndarray | None = None  # (n, 3)
    polychromatic: bool = False
    unit_s0: np.ndarray | None = None  # -unit(direction); set for every beam by the readers
    sample_to_source_distance: float | None = None  # mm (polychromatic: the primary flight path L0)
    wavelength_range: tuple[float, float] | None = None  # Å (polychromatic)
    probe: str = "xray"

    def __post_init__(self):
        if self.unit_s0 is None and self.s0 is not None:
            self.unit_s0 = np.asarray(self.s0, dtype=float) / np.linalg.norm(self.s0)

    @property
    def along_s0(self) -> np.ndarray:
        """A vector along s0 (for drawing): s0 itself, or its unit vector for a
        polychromatic beam."""
        return self.s0 if self.s0 is not None else self.unit_s0


@dataclass
class Panel:
    """One detector panel with lab-frame (composed) origin and unit axes (mm).

    ``parallax`` selects the parallax-corrected pixel->mm mapping, which needs
    ``mu`` (mm⁻¹) and ``thickness`` (mm) > 0; a panel read by the native
    backend maps pixels with dxtbx instead (``pixel_to_millimetre``).
    """

    name: str
    origin: np.ndarray
    fast: np.ndarray
    slow: np.ndarray
    pixel_size: np.ndarray  # (fast, slow) mm
    image_size: np.ndarray  # (fast, slow) px
    thickness: float = 0.0
    mu: float = 0.0
    parallax: bool = False
    #: The native backend's px -> mm: dxtbx's own mapping of (N, 2) arrays. None:
    #: the numpy mapping above (simple, or parallax-corrected as dxtbx does it).
    pixel_to_millimetre: object = field(default=None, repr=False, compare=False)

    @property
    def d_matrix(self) -> np.ndarray:
        """d = [fast | slow | origin] as columns: lab = d · (x, y, 1)."""
        return np.column_stack([self.fast, self.slow, self.origin])

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.fast, self.slow)

    @property
    def size_mm(self) -> np.ndarray:
        """The panel's extent (fast, slow) in mm: image size times pixel size."""
        return np.asarray(self.image_size, dtype=float) * np.asarray(self.pixel_size, dtype=float)


@dataclass
class PanelGroup:
    """A group node of the detector hierarchy: its name, depth below the root, panels."""

    name: str
    depth: int
    panels: list[int]


@dataclass
class Detector:
    panels: list[Panel]
    groups: list[PanelGroup] = field(default_factory=list)  # hierarchy groups below the root

    def groups_at_depth(self, depth: int) -> list[PanelGroup]:
        return [group for group in self.groups if group.depth == depth]

    @functools.cached_property
    def panel_vectors(self) -> np.ndarray:
        """(panels, 9), read-only: each panel's origin, fast and slow axes (lab,
        mm), tabulated once (the panels are not changed once read)."""
        table = np.array([[*p.origin, *p.fast, *p.slow] for p in self.panels], dtype=float).reshape(-1, 9)
        table.flags.writeable = False
        return table

    @functools.cached_property
    def panel_matrices(self) -> np.ndarray:
        """(panels, 3, 3), read-only: each panel's D = [fast | slow | origin]."""
        table = np.array([p.d_matrix for p in self.panels], dtype=float).reshape(-1, 3, 3)
        table.flags.writeable = False
        return table

    @functools.cached_property
    def panel_inverses(self) -> np.ndarray:
        """(panels, 9), read-only: the elements of each panel's D⁻¹ (lab ray ->
        panel coordinates), row by row."""
        table = np.array([np.linalg.inv(d).ravel() for d in self.panel_matrices], dtype=float).reshape(-1, 9)
        table.flags.writeable = False
        return table


@dataclass
class Goniometer:
    """r_lab = S · R(axis, φ) · F · r_crystal, with the datum rotation axis."""

    axis: np.ndarray
    fixed_rotation: np.ndarray
    setting_rotation: np.ndarray
    setting_rotation_at_scan_points: np.ndarray | None = None  # (n, 3, 3)
    kind: str = "single-axis"


@dataclass
class Scan:
    """Image range and oscillation (start, width) in radians, as dxtbx."""

    image_range: tuple[int, int]
    oscillation: tuple[float, float]
    time_of_flight: np.ndarray | None = None  # µs per image (a time-of-flight scan: no oscillation)

    @property
    def array_range(self) -> tuple[int, int]:
        return (self.image_range[0] - 1, self.image_range[1])

    @property
    def num_images(self) -> int:
        return self.image_range[1] - self.image_range[0] + 1

    @property
    def is_still(self) -> bool:
        return abs(self.oscillation[1]) < 1e-12

    @property
    def oscillation_range(self) -> tuple[float, float]:
        start, width = self.oscillation
        return (start, start + self.num_images * width)

    def array_index_from_angle(self, angle):
        """Array index (0 at the start of the first image) of an angle (rad)."""
        start, width = self.oscillation
        return self.array_range[0] + (np.asarray(angle) - start) / width

    def image_position(self, angle):
        """Where an angle (rad) lies in the scan, in image numbers: image k spans
        k to k + 1 (the first image starts at ``image_range[0]``)."""
        return self.array_index_from_angle(angle) - self.array_range[0] + self.image_range[0]

    def image_numbers(self, angle) -> np.ndarray:
        """The image each angle (rad) falls in, numbered as ``image_range``,
        clamped to the scan: a reflection predicted just beyond an end belongs
        to its end image, as its model state does."""
        offset = np.floor(self.array_index_from_angle(angle))
        offset -= self.array_range[0]
        np.clip(offset, 0, self.num_images - 1, out=offset)
        image = offset.astype(np.int64)
        image += self.image_range[0]
        return image

    def angle_from_array_index(self, index):
        start, width = self.oscillation
        return start + (np.asarray(index) - self.array_range[0]) * width


@dataclass
class Crystal:
    """A = U·B (Å⁻¹): the inverse of the matrix whose rows are a, b, c."""

    A: np.ndarray
    A_at_scan_points: np.ndarray | None = None  # (n, 3, 3)


@dataclass
class Experiment:
    identifier: str
    beam: Beam | None
    detector: Detector | None
    goniometer: Goniometer | None = None
    scan: Scan | None = None
    crystal: Crystal | None = None

    @property
    def is_rotation(self) -> bool:
        """Rotation data: a goniometer and a scan with a non-zero oscillation."""
        return (
            self.goniometer is not None
            and self.scan is not None
            and not self.scan.is_still
        )

    @property
    def is_laue(self) -> bool:
        """Polychromatic data: each reflection has its own wavelength."""
        return self.beam is not None and self.beam.polychromatic

    @property
    def kind(self) -> str:
        """rotation, still, or tof / laue (polychromatic, with or without a time-of-flight scan)."""
        if self.is_laue:
            return "tof" if self.scan is not None and self.scan.time_of_flight is not None else "laue"
        return "rotation" if self.is_rotation else "still"

    @property
    def is_scan_varying(self) -> bool:
        """Does a model vary along the scan (A, S or s0 at scan points)?"""
        return any(
            getattr(model, name, None) is not None
            for model, name in ((self.crystal, "A_at_scan_points"), (self.goniometer, "setting_rotation_at_scan_points"),
                                (self.beam, "s0_at_scan_points"))
        )


@dataclass
class ExperimentList:
    experiments: list[Experiment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.experiments)

    def __iter__(self):
        return iter(self.experiments)

    def __getitem__(self, index) -> Experiment:
        return self.experiments[index]

    def identifiers(self) -> list[str]:
        return [e.identifier for e in self.experiments]
