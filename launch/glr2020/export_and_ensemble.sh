#!/usr/bin/env bash
# export_and_ensemble.sh: the last step of the GLR2020 recipe, on the TPU VM (worker 0's host CPU).
# as_released: exports the released ensemble's four members (B7@640, B6@640, B7 512->640, B7@512)
#   and builds ensemble_as_released (weights 1.0/0.8/0.55/0.5), the model that scored 0.38677.
# as_written: exports B7, B6, B5 after stage 5 and builds ensemble_as_written (1.0/0.8/0.5).
#
# Usage: BUCKET=gs://my-bucket launch/glr2020/export_and_ensemble.sh as_released|as_written [tpu_vm.sh OPTIONS]
#   e.g. --dry_run to print the gcloud commands, --name/--zone/--project for another VM.
# Needs a VM set up with `launch/tpu_vm.sh setup`; takes ~30 min (ESTIMATE, not measured).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tpu_vm="$here/../tpu_vm.sh"
case "${1:-}" in
  -h | --help)
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed -E 's/^# ?//'
    exit 0
    ;;
  as_released) exports=(b7_640 b6_640 b7v2_640 b7_512) ;;
  as_written) exports=(b7 b6 b5) ;;
  *)
    echo "export_and_ensemble.sh: error: first argument must be as_released or as_written" >&2
    exit 2
    ;;
esac
which="$1"
shift

for model in "${exports[@]}"; do
  "$tpu_vm" "$@" stage landmark-export "$here/export_${model}.flags"
done
"$tpu_vm" "$@" stage landmark-ensemble "$here/ensemble_${which}.flags"
