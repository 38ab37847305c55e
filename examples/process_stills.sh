#!/usr/bin/env bash
# Process serial stills with DIALS and prove the model q-consistent.
#
#   examples/process_stills.sh OUTDIR IMAGE [IMAGE ...] [-- dials.index options]
#
# dials.import -> dials.find_spots -> dials.index (phil/index_stills.phil)
# -> dials.refine step 1 (detector and beam, cell fixed) -> dials.refine
# step 2 (everything free), both with phil/refine_stills.phil
# -> dials.q_consistency with a gate on mean |delta_q| (Å⁻¹; set
# QC_MAX_MEAN_DELTA_Q, default 0.02, the top of the "excellent" band).
# Stops at the first failing step and says which, with its log.
set -uo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
phil="$here/phil"
gate="${QC_MAX_MEAN_DELTA_Q:-0.02}"

if [ $# -lt 2 ]; then
  echo "usage: $0 OUTDIR IMAGE [IMAGE ...] [-- dials.index options]" >&2
  exit 1
fi
outdir="$1"; shift
images=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do images+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
index_options=("$@")

mkdir -p "$outdir" && cd "$outdir" || { echo "process_stills: cannot use $outdir" >&2; exit 1; }

step() {  # step NAME LOG COMMAND...
  local name="$1" log="$2"; shift 2
  echo "== $name: $*"
  "$@"
  local status=$?
  if [ $status -ne 0 ]; then
    echo "process_stills: step '$name' failed (exit status $status); see $outdir/$log" >&2
    exit $status
  fi
}

step import dials.import.log dials.import "${images[@]}"
step find_spots dials.find_spots.log dials.find_spots imported.expt
step index dials.index.log dials.index imported.expt strong.refl "$phil/index_stills.phil" "${index_options[@]}"
step refine_step1 dials.refine.step1.log dials.refine indexed.expt indexed.refl \
  "$phil/refine_1_detector_beam.phil" "$phil/refine_stills.phil"
step refine_step2 dials.refine.step2.log dials.refine refined_step1.expt refined_step1.refl \
  "$phil/refine_2_all_free.phil" "$phil/refine_stills.phil"
step q_consistency dials.q_consistency.log dials.q_consistency refined.expt refined.refl \
  "fail_if.mean_delta_q=$gate" output.json=q_consistency.json
echo "process_stills: done; the model is q-consistent (mean |delta_q| <= $gate 1/Angstrom): $outdir/refined.expt"
