#!/usr/bin/env bash
# Process serial stills with DIALS and prove the refined model q-consistent.
#
#   examples/process_stills.sh OUTDIR IMAGE [IMAGE ...] [--STEP OPTION ...] ...
#
# Steps, each a DIALS program run in OUTDIR (its log is there too):
#   import         dials.import IMAGE ...
#   find_spots     dials.find_spots imported.expt
#   index          dials.index imported.expt strong.refl phil/index_stills.phil
#   combine        dials.combine_experiments reference_from_experiment.detector=0:
#                  dials.index gives every still its own copy of the detector; shots
#                  taken on one detector are refined with one shared detector
#                  (skip with --separate-detectors)
#   refine_step1   dials.refine phil/refine_1_detector_beam.phil phil/refine_stills.phil
#   refine_step2   dials.refine phil/refine_2_all_free.phil phil/refine_stills.phil
#   q_consistency  dials.q_consistency refined.expt refined.refl, gated on its verdict
#                  (fail_if.inconsistent=True) and on the mean |delta_q| (1/Angstrom;
#                  QC_MAX_MEAN_DELTA_Q, default 0.001)
#
# Options for one step follow its name, up to the next step name, e.g.
#   --find_spots spotfinder.threshold.dispersion.gain=25 --index indexing.known_symmetry.space_group=P6122
# (a bare "--" means --index, as in earlier versions). Image paths may be relative to
# the folder the script is called from. The script stops at the first step that fails
# or leaves no output, says which and where its log is, and exits with that step's
# status (2 when the gate fails).
set -uo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
phil="$here/phil"
gate="${QC_MAX_MEAN_DELTA_Q:-0.001}"
steps=(import find_spots index combine refine_step1 refine_step2 q_consistency)

usage() {
  echo "usage: $0 OUTDIR IMAGE [IMAGE ...] [--STEP OPTION ...] (steps: ${steps[*]}; --separate-detectors)" >&2
  exit 1
}
[ $# -ge 2 ] || usage
outdir="$1"; shift
declare -A options=()
images=()
current=""
separate_detectors=0
for arg in "$@"; do
  case "$arg" in
    --) current=index ;;
    --separate-detectors) separate_detectors=1 ;;
    --*)
      current="${arg#--}"; current="${current//-/_}"
      [[ " ${steps[*]} " == *" $current "* ]] || { echo "process_stills: unknown step '$arg'" >&2; usage; }
      ;;
    *)
      if [ -z "$current" ]; then
        [ -e "$arg" ] || { echo "process_stills: $arg: no such image file" >&2; exit 1; }
        images+=("$(realpath "$arg")")
      else
        options[$current]+="${options[$current]:+$'\n'}$arg"
      fi
      ;;
  esac
done
[ ${#images[@]} -gt 0 ] || usage

mkdir -p "$outdir" && cd "$outdir" || { echo "process_stills: cannot use $outdir" >&2; exit 1; }
outdir="$(pwd)"

step() {  # step NAME LOG OUTPUT COMMAND...: run, with the step's own options appended
  local name="$1" log="$2" output="$3"; shift 3
  local extra=()
  [ -n "${options[$name]:-}" ] && mapfile -t extra <<< "${options[$name]}"
  echo "== $name: $* ${extra[*]}"
  "$@" "${extra[@]}"
  local status=$?
  if [ $status -ne 0 ]; then
    echo "process_stills: step '$name' failed (exit status $status); see $outdir/$log" >&2
    exit $status
  fi
  if [ ! -s "$output" ]; then
    echo "process_stills: step '$name' wrote no $output; see $outdir/$log" >&2
    exit 1
  fi
}

step import dials.import.log imported.expt dials.import "${images[@]}"
step find_spots dials.find_spots.log strong.refl dials.find_spots imported.expt
step index dials.index.log indexed.refl dials.index imported.expt strong.refl "$phil/index_stills.phil"
input=indexed
if [ "$separate_detectors" -eq 0 ]; then
  step combine dials.combine_experiments.log combined.refl dials.combine_experiments indexed.expt indexed.refl \
    reference_from_experiment.detector=0
  input=combined
fi
step refine_step1 dials.refine.step1.log refined_step1.refl dials.refine "$input.expt" "$input.refl" \
  "$phil/refine_1_detector_beam.phil" "$phil/refine_stills.phil"
step refine_step2 dials.refine.step2.log refined.refl dials.refine refined_step1.expt refined_step1.refl \
  "$phil/refine_2_all_free.phil" "$phil/refine_stills.phil"
step q_consistency dials.q_consistency.log q_consistency.json dials.q_consistency refined.expt refined.refl \
  fail_if.inconsistent=True "fail_if.mean_delta_q=$gate" output.json=q_consistency.json output.plots=None
echo "process_stills: done; the model is q-consistent (verdict consistent, mean |delta_q| <= $gate 1/Angstrom): $outdir/refined.expt"
