#!/usr/bin/env bash
# export_and_ensemble.sh: the last step of the GLR2020 recipe, on the TPU VM (worker 0's host CPU).
# Exports the stage-4 checkpoints of B7, B6 and B5 as SavedModels, then builds their ensemble
# (weights 1.0 / 0.8 / 0.5) in gs://$BUCKET/glr2020/export/ensemble, the Kaggle submission model.
#
# Usage: BUCKET=gs://my-bucket launch/glr2020/export_and_ensemble.sh [tpu_vm.sh OPTIONS]
#   e.g. --dry_run to print the gcloud commands, --name/--zone/--project for another VM.
# Needs a VM set up with `launch/tpu_vm.sh setup`; takes ~30 min (ESTIMATE, not measured).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tpu_vm="$here/../tpu_vm.sh"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed -E 's/^# ?//'
  exit 0
fi

for model in b7 b6 b5; do
  "$tpu_vm" "$@" stage landmark-export "$here/export_${model}.flags"
done
"$tpu_vm" "$@" stage landmark-ensemble "$here/ensemble.flags"
