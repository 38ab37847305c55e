"""examples/process_stills.sh with the real DIALS on the real stills of
../shared/data/images: every step's output, the gate passing on the refined
model and failing (exit 2) on the same model with a real mistake in it.

The pipelines run once per image set (about 30 s each) in a module fixture.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, SHARED_DATA

pytestmark = pytest.mark.dials

SCRIPT = os.path.join(REPO_ROOT, "examples", "process_stills.sh")
IMAGES = os.path.join(SHARED_DATA, "images")

#: Per image set: the files (relative to IMAGES), the options of the steps (from
#: ../shared/data/images/README.md), and the number of stills.
IMAGE_SETS = {
    "thaumatin_grid": (
        [f"thaumatin_grid/thau_3_2_{n:04d}.cbf.bz2" for n in (2, 4, 6, 8, 10)],
        ["--index", "indexing.known_symmetry.space_group=P41212",
         "indexing.known_symmetry.unit_cell=58,58,151,90,90,90"],
        5,
    ),
    "thermolysin_cspad": (
        [f"thermolysin_cspad/idx-20130301060858{n}.cbf" for n in (401, 601, 701, 801)],
        ["--find-spots", "spotfinder.threshold.dispersion.gain=25",
         "spotfinder.threshold.dispersion.global_threshold=100", "spotfinder.filter.min_spot_size=2",
         "--index", "indexing.known_symmetry.space_group=P6122",
         "indexing.known_symmetry.unit_cell=92.9,92.9,130.4,90,90,120"],
        4,
    ),
}

#: Each step and the files it must leave.
STEP_OUTPUTS = {
    "import": ["imported.expt", "dials.import.log"],
    "find_spots": ["strong.refl", "dials.find_spots.log"],
    "index": ["indexed.expt", "indexed.refl", "dials.index.log"],
    "combine": ["combined.expt", "combined.refl", "dials.combine_experiments.log"],
    "refine_step1": ["refined_step1.expt", "refined_step1.refl", "dials.refine.step1.log"],
    "refine_step2": ["refined.expt", "refined.refl", "dials.refine.step2.log"],
    "q_consistency": ["q_consistency.json", "q_consistency.refl", "dials.q_consistency.log"],
}


def default_gate() -> float:
    """The script's own default for the mean |delta_q| gate."""
    return float(re.search(r"QC_MAX_MEAN_DELTA_Q:-([0-9.e-]+)", open(SCRIPT).read()).group(1))


def run_script(cwd, *args):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """Each image set processed as a user calls the script: from the image
    folder, with relative image paths and a relative output folder."""
    if not os.path.isdir(IMAGES):
        pytest.skip(f"real images folder {IMAGES} is absent (CI always has it)")
    out = {}
    for name, (images, options, _) in IMAGE_SETS.items():
        work = tmp_path_factory.mktemp(name)
        done = run_script(IMAGES, str(work / "out"), *images, *options)
        out[name] = (done, work / "out")
    return out


@pytest.mark.parametrize("name", sorted(IMAGE_SETS))
def test_every_step_runs_on_real_stills_and_the_gate_passes(processed, name):
    done, out = processed[name]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    started = re.findall(r"^== (\w+):", done.stdout, flags=re.M)
    assert started == list(STEP_OUTPUTS)
    for step, files in STEP_OUTPUTS.items():
        for file in files:
            assert (out / file).stat().st_size > 0, (step, file)
    refined = json.loads((out / "refined.expt").read_text())
    stills = IMAGE_SETS[name][2]
    assert len(refined["experiment"]) == stills  # every still kept, the 19-spot one too
    assert len(refined["detector"]) == 1  # one detector shared by every shot
    report = json.loads((out / "q_consistency.json").read_text())
    assert len(report["per_experiment"]) == stills
    assert 0 < report["overall"]["delta_q"]["mean"] <= default_gate()
    assert report["verdict"]["consistent"] is True, report["verdict"]
    assert "process_stills: done" in done.stdout


def mistaken(source, target, kind):
    """The refined model with a real mistake: the detector 1 mm further from the
    sample, or every crystal turned by -90 degrees about the lab X axis."""
    document = json.loads(source.read_text())
    if kind == "detector moved by 1 mm":
        for detector in document["detector"]:
            detector["hierarchy"]["origin"][2] -= 1.0  # the beam runs along -z: 1 mm further away
    else:
        turn = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
        for crystal in document["crystal"]:
            for axis in ("real_space_a", "real_space_b", "real_space_c"):
                crystal[axis] = list(turn @ np.array(crystal[axis]))
    target.write_text(json.dumps(document))


@pytest.mark.parametrize("kind", ["detector moved by 1 mm", "crystal turned by -90 degrees about X"])
@pytest.mark.parametrize("name", sorted(IMAGE_SETS))
def test_the_gate_fails_on_a_model_with_a_real_mistake(processed, tmp_path, name, kind):
    """The script's last step, on the refined table with a mistaken model: exit 2."""
    _, out = processed[name]
    bad = tmp_path / "mistaken.expt"
    mistaken(out / "refined.expt", bad, kind)
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "dials.q_consistency"), str(bad), str(out / "refined.refl"),
         "fail_if.inconsistent=True", "output.plots=None", "output.reflections=None", "output.json=qc.json"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True, text=True,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr
    verdict = json.loads((tmp_path / "qc.json").read_text())["verdict"]
    assert verdict["consistent"] is False and "fail_if: the verdict is inconsistent" in done.stderr
    named = {entry["mistake"] for entry in verdict["checks"]["named"] if entry["large"]}
    assert named & ({"detector_distance"} if kind.startswith("detector") else {"lab_axis_rotation"}), verdict
    # and the mean gate the script sets as well
    again = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "dials.q_consistency"), str(bad), str(out / "refined.refl"),
         f"fail_if.mean_delta_q={default_gate()}", "output.plots=None", "output.reflections=None"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True, text=True,
    )
    assert again.returncode == 2 and "exceeds fail_if.mean_delta_q" in again.stderr


def test_a_failing_step_stops_the_script_and_names_its_log(tmp_path):
    """The CSPAD images with DIALS' default spot finding: dials.find_spots stops
    (too many strong pixels); nothing after it runs."""
    if not os.path.isdir(IMAGES):
        pytest.skip(f"real images folder {IMAGES} is absent (CI always has it)")
    images, _, _ = IMAGE_SETS["thermolysin_cspad"]
    done = run_script(IMAGES, str(tmp_path / "out"), *images[:1])
    assert done.returncode != 0
    assert re.findall(r"^== (\w+):", done.stdout, flags=re.M) == ["import", "find_spots"]
    assert f"step 'find_spots' failed (exit status {done.returncode}); see {tmp_path}/out/dials.find_spots.log" in done.stderr


def test_a_missing_image_is_named_before_anything_runs(tmp_path):
    done = run_script(tmp_path, "out", "no_such_image.cbf")
    assert done.returncode == 1 and "no_such_image.cbf: no such image file" in done.stderr
    assert os.listdir(tmp_path) == []
