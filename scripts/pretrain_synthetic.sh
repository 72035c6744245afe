#!/usr/bin/env bash
# A pretrained start for fine-tuning on landmark-synth: the stand-in for ImageNet weights.
#   landmark-synth (a separate set: its own seed, so other scenes and landmarks than any target
#   seed's; no label noise) -> landmark-tfrecords -> landmark-train (training BatchNorm).
# Usage: scripts/pretrain_synthetic.sh OUT_DIR
#   then: landmark-train --init_from=OUT_DIR/run ...   (backbone and neck restored, new head)
# Cached: a rerun after a finished run does nothing; an interrupted run resumes (every
# landmark-* stage resumes on its own). The last stdout line is one JSON object.
# PRETRAIN_SEED (1000), PRETRAIN_LANDMARKS (120), PRETRAIN_STEPS (400), PRETRAIN_BACKBONE
# (efficientnet-b0), PRETRAIN_IMAGE_SIZE (64), PRETRAIN_BATCH (32) set the recipe;
# PRETRAIN_SYNTH_FLAGS adds landmark-synth flags (e.g. smaller sets for tests).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: scripts/pretrain_synthetic.sh OUT_DIR" >&2
  exit 2
fi
OUT=$1
SEED=${PRETRAIN_SEED:-1000}
LANDMARKS=${PRETRAIN_LANDMARKS:-120}
STEPS=${PRETRAIN_STEPS:-400}
BACKBONE=${PRETRAIN_BACKBONE:-efficientnet-b0}
SIZE=${PRETRAIN_IMAGE_SIZE:-64}
BATCH=${PRETRAIN_BATCH:-32}
read -r -a synth_flags <<< "${PRETRAIN_SYNTH_FLAGS:-}"
export TF_CPP_MIN_LOG_LEVEL=2
RUN="$OUT/run"
DONE="$OUT/pretrain.json"

if [ -f "$DONE" ]; then  # written last, after a finished landmark-train: the cache hit
  cat "$DONE"
  exit 0
fi
mkdir -p "$OUT/logs"
# Each stage's stderr goes to OUT/logs; its closing JSON line is kept for the summary.
stage() {
  local name=$1; shift
  printf '$ %s\n' "$*" >&2
  "$@" 2> "$OUT/logs/$name.log" | tail -n 1 > "$OUT/logs/$name.json"
}
# difficulty 0.7 as the targets; no noise images and every landmark clean: a clean
# classification set, as ImageNet is for the published fine-tunes.
stage synth landmark-synth --output_dir="$OUT/gldv2" --seed="$SEED" --num_landmarks="$LANDMARKS" \
  --noisy_fraction=0 --unclean_landmarks=0 --difficulty=0.7 --noprogress "${synth_flags[@]}"
stage tfrecords landmark-tfrecords --train_csv="$OUT/gldv2/train.csv" \
  --image_dir="$OUT/gldv2/train" --output_dir="$OUT/tfrecords" --num_shards=2 --noprogress
# lr 0.1 cosine from random init: the levers baseline's recipe before it had a start.
stage train landmark-train --data_dir="$OUT/tfrecords" --workdir="$RUN" \
  --backbone="$BACKBONE" --image_size="$SIZE" --batch_size="$BATCH" --head=cosface \
  --embedding_dim=128 --train_steps="$STEPS" --learning_rate=0.1 --schedule=cosine \
  --warmup_steps="$(( STEPS < 100 ? STEPS / 5 : 20 ))" --checkpoint_every=100 --seed=0
printf '{"init_from": "%s", "seed": %d, "landmarks": %d, "steps": %d, "train": %s}\n' \
  "$RUN" "$SEED" "$LANDMARKS" "$STEPS" "$(cat "$OUT/logs/train.json")" > "$DONE.tmp"
mv "$DONE.tmp" "$DONE"
cat "$DONE"
