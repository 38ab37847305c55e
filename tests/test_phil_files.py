"""The refinement strategy files in phil/ parse, name only real DIALS parameters,
and set what their header comments promise.

DIALS is not importable here, so the definitions these files use are
transcribed from dials.refine and dials.index (names, types and choices as in
their master scopes); a misspelt parameter shows as an unused definition.
"""

from __future__ import annotations

import glob
import os

import libtbx.phil
import pytest

from conftest import REPO_ROOT

DIALS_DEFINITIONS = libtbx.phil.parse(
    """
refinement {
  parameterisation {
    scan_varying = Auto
      .type = bool
    crystal {
      fix = all cell orientation
        .type = choice(multi=True)
    }
    beam {
      fix = all *in_spindle_plane out_spindle_plane *wavelength
        .type = choice(multi=True)
    }
    detector {
      fix = all position orientation distance
        .type = choice(multi=True)
    }
  }
  reflections {
    outlier {
      algorithm = null *auto mcd tukey sauter_poon
        .type = choice
      minimum_number_of_reflections = 20
        .type = int
    }
  }
}
indexing {
  method = *fft3d fft1d real_space_grid_search low_res_spot_match
    .type = choice
  stills {
    indexer = *Auto stills sequences
      .type = choice
    refine_all_candidates = True
      .type = bool
    candidate_outlier_rejection = True
      .type = bool
    refine_candidates_with_known_symmetry = False
      .type = bool
  }
  multiple_lattice_search {
    max_lattices = 1
      .type = int
  }
}
output {
  experiments = refined.expt
    .type = str
  reflections = refined.refl
    .type = str
  log = dials.refine.log
    .type = str
}
"""
)

PHIL_FILES = sorted(glob.glob(os.path.join(REPO_ROOT, "phil", "*.phil")))


def load(name):
    path = os.path.join(REPO_ROOT, "phil", name)
    text = open(path).read()
    user = libtbx.phil.parse(text, source_info=path)
    working, unused = DIALS_DEFINITIONS.fetch(sources=[user], track_unused_definitions=True)
    return text, working.extract(), unused


def test_the_four_strategy_files_are_there():
    assert [os.path.basename(p) for p in PHIL_FILES] == [
        "index_stills.phil", "refine_1_detector_beam.phil", "refine_2_all_free.phil", "refine_stills.phil",
    ]


@pytest.mark.parametrize("name", [os.path.basename(p) for p in PHIL_FILES])
def test_each_file_parses_names_real_parameters_and_says_when_to_use_it(name):
    text, _, unused = load(name)
    assert [str(u) for u in unused] == []  # every parameter is one DIALS defines
    lines = text.splitlines()
    header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert len(header) >= 5  # a header comment first
    assert any(word in " ".join(header) for word in ("Use it", "Use for", "add to"))  # saying when to use it


def test_step_1_fixes_the_cell_and_frees_detector_and_beam():
    _, p, _ = load("refine_1_detector_beam.phil")
    r = p.refinement.parameterisation
    assert r.crystal.fix == ["cell"] and r.detector.fix == [] and r.beam.fix == ["wavelength"]
    assert r.scan_varying is False and p.output.experiments == "refined_step1.expt"


def test_step_2_frees_everything_but_the_wavelength():
    _, p, _ = load("refine_2_all_free.phil")
    r = p.refinement.parameterisation
    assert r.crystal.fix == [] and r.detector.fix == [] and r.beam.fix == ["wavelength"]
    assert r.scan_varying is libtbx.Auto and p.output.experiments == "refined.expt"


def test_stills_refinement_is_static_with_sauter_poon():
    _, p, _ = load("refine_stills.phil")
    assert p.refinement.parameterisation.scan_varying is False
    assert p.refinement.parameterisation.beam.fix == ["all"]
    assert p.refinement.reflections.outlier.algorithm == "sauter_poon"
    assert p.refinement.reflections.outlier.minimum_number_of_reflections == 10  # keeps a 19-spot still


@pytest.mark.dials
@pytest.mark.parametrize("name", [os.path.basename(p) for p in PHIL_FILES])
def test_each_file_names_only_parameters_of_the_real_dials_programs(name):
    """The transcription above, checked against DIALS' own master scopes."""
    from dials.command_line.index import working_phil as index_scope
    from dials.command_line.refine import working_phil as refine_scope

    master = index_scope if name.startswith("index") else refine_scope
    path = os.path.join(REPO_ROOT, "phil", name)
    _, unused = master.fetch(sources=[libtbx.phil.parse(open(path).read(), source_info=path)],
                             track_unused_definitions=True)
    assert [str(u) for u in unused] == []


def test_stills_indexing():
    _, p, _ = load("index_stills.phil")
    assert p.indexing.method == "fft1d" and p.indexing.stills.indexer == "stills"
    assert p.indexing.stills.refine_all_candidates is True
    assert p.refinement.parameterisation.detector.fix == ["all"]
