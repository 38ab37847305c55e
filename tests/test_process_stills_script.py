"""examples/process_stills.sh: the steps in order, with the phil/ files, stopping
at the first failure. The DIALS steps are stand-ins that record their command
line (DIALS is not installed here); the last step is the real
dials.q_consistency on the bundled stills, which the stand-in dials.refine
hands on as refined.expt/refined.refl.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import EXAMPLES, REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "examples", "process_stills.sh")

STAND_IN = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALLS"
name=$(basename "$0")
[ "$name" = "$FAIL_AT" ] && exit 3
case "$name" in
  dials.import) touch imported.expt ;;
  dials.find_spots) touch strong.refl ;;
  dials.index) touch indexed.expt indexed.refl ;;
  dials.refine)
    if [ -e refined_step1.expt ]; then
      cp "$EXAMPLES/stills.expt" refined.expt; cp "$EXAMPLES/stills.refl" refined.refl
    else
      touch refined_step1.expt refined_step1.refl
    fi ;;
esac
"""


@pytest.fixture
def stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("dials.import", "dials.find_spots", "dials.index", "dials.refine"):
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    real = bin_dir / "dials.q_consistency"
    real.write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m dials_qconsistency.command_line.q_consistency "$@"\n')
    real.chmod(0o755)
    return bin_dir


def run_script(tmp_path, bin_dir, **env):
    environment = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls.txt"),
        EXAMPLES=EXAMPLES, PYTHONPATH=REPO_ROOT, MPLBACKEND="Agg", FAIL_AT="",
    )
    environment.update(env)
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", SCRIPT, str(out), "shot_1.cbf", "shot_2.cbf", "--", "indexing.known_symmetry.space_group=P213"],
        env=environment, capture_output=True, text=True,
    )
    calls = (tmp_path / "calls.txt").read_text().splitlines() if (tmp_path / "calls.txt").exists() else []
    return done, calls, out


def test_all_steps_in_order_then_the_gate_passes(tmp_path, stand_ins):
    done, calls, out = run_script(tmp_path, stand_ins)
    assert done.returncode == 0, done.stderr
    phil = os.path.join(REPO_ROOT, "phil")
    assert calls == [
        "dials.import shot_1.cbf shot_2.cbf",
        "dials.find_spots imported.expt",
        f"dials.index imported.expt strong.refl {phil}/index_stills.phil indexing.known_symmetry.space_group=P213",
        f"dials.refine indexed.expt indexed.refl {phil}/refine_1_detector_beam.phil {phil}/refine_stills.phil",
        f"dials.refine refined_step1.expt refined_step1.refl {phil}/refine_2_all_free.phil {phil}/refine_stills.phil",
    ]
    assert (out / "q_consistency.json").exists() and (out / "q_consistency.refl").exists()
    assert done.stdout.strip().splitlines()[-1].startswith("process_stills: done")


def test_stops_at_the_first_failing_step(tmp_path, stand_ins):
    done, calls, out = run_script(tmp_path, stand_ins, FAIL_AT="dials.index")
    assert done.returncode == 3
    assert done.stderr.strip() == f"process_stills: step 'index' failed (exit status 3); see {out}/dials.index.log"
    assert [c.split()[0] for c in calls] == ["dials.import", "dials.find_spots", "dials.index"]


def test_a_model_over_the_gate_stops_the_pipeline(tmp_path, stand_ins):
    done, calls, out = run_script(tmp_path, stand_ins, QC_MAX_MEAN_DELTA_Q="1e-12")
    assert done.returncode == 2
    assert f"process_stills: step 'q_consistency' failed (exit status 2); see {out}/dials.q_consistency.log" in done.stderr
    assert "fail_if" in done.stderr and "process_stills: done" not in done.stdout
