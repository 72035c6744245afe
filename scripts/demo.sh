#!/usr/bin/env bash
# The whole landmark-tf path on a synthetic GLDv2-layout set, on a laptop CPU:
#   synth -> tfrecords -> train b0 and b1 -> export -> ensemble -> embed -> evaluate -> report.
# Usage: scripts/demo.sh [OUTPUT_DIR]   (default demo_output; `make demo` calls this)
# DEMO_SEED=N picks another synthetic dataset; DEMO_STEPS, DEMO_IMAGE_SIZE, DEMO_BATCH the training.
# Every stage is resumable: rerunning after an interruption picks up where it stopped.
set -euo pipefail

OUT=${1:-demo_output}
SEED=${DEMO_SEED:-0}
STEPS=${DEMO_STEPS:-300}
SIZE=${DEMO_IMAGE_SIZE:-64}
BATCH=${DEMO_BATCH:-32}
mkdir -p "$OUT/results"
export TF_CPP_MIN_LOG_LEVEL=2

say() { printf '\n== %s\n' "$*" >&2; }
# Runs a landmark-* command, echoes it, keeps its closing JSON line in results/NAME.json and
# its wall-clock and CPU seconds (user, system) in results/times.txt.
stage() {
  local name=$1; shift
  printf '$ %s\n' "$*" >&2
  local TIMEFORMAT="$name %R %U %S"
  { time "$@" 2>&3 | tee "$OUT/results/$name.log" | tail -n 1 > "$OUT/results/$name.json"; } \
    3>&2 2>> "$OUT/results/times.txt"
}

say "1/7 synthetic GLDv2-layout dataset"
# difficulty 0.7: untrained features stay near chance, a few hundred CPU steps learn it.
# GLDv2's test set (README "Synthetic data"): three quarters of it shows no landmark, and those
# images look like rooms, food, people and documents, not like landmarks.
stage synth landmark-synth --output_dir="$OUT/gldv2" --seed="$SEED" --difficulty=0.7 \
  --nonlandmark_style=everyday --test_distractors=3

say "2/7 TFRecords (train with a per-landmark validation split; index; test)"
stage tfrecords_train landmark-tfrecords --train_csv="$OUT/gldv2/train.csv" \
  --clean_csv="$OUT/gldv2/train_clean.csv" --image_dir="$OUT/gldv2/train" \
  --output_dir="$OUT/tfrecords/train" --val_fraction=0.1 --num_shards=4
for split in index test; do
  stage "tfrecords_$split" landmark-tfrecords --csv="$OUT/gldv2/$split.csv" --split="$split" \
    --image_dir="$OUT/gldv2/$split" --output_dir="$OUT/tfrecords/$split" --num_shards=1
done

say "3/7 train: an untrained baseline (random init), then EfficientNet-B0 and -B1"
# bn_momentum 0.9: inference uses BatchNorm moving statistics, and Keras's 0.99 averages over
# ~100 steps, too long for a run of a few hundred (measured: mAP@100 0.29 -> 0.41 for one B1).
common=(--data_dir="$OUT/tfrecords/train" --image_size="$SIZE" --batch_size="$BATCH"
        --head=cosface --embedding_dim=128 --checkpoint_every=100 --bn_momentum=0.9 --seed=1)
# --train_steps=0: a checkpoint of B0's random initialisation (the same seed as the trained B0).
stage train_untrained landmark-train "${common[@]}" --workdir="$OUT/runs/untrained" \
  --backbone=efficientnet-b0 --train_steps=0
# A CPU train step of these small models keeps about one core busy: train both side by side.
printf 'training b0 and b1 side by side; progress bars in %s/results/train_*.progress\n' "$OUT" >&2
pids=()
for b in b0 b1; do
  stage "train_$b" landmark-train "${common[@]}" --workdir="$OUT/runs/$b" \
    --backbone="efficientnet-$b" --train_steps="$STEPS" --learning_rate=0.1 \
    --schedule=cosine --warmup_steps=20 2> "$OUT/results/train_$b.progress" &
  pids+=($!)
done
for i in 0 1; do
  b=$([ "$i" = 0 ] && echo b0 || echo b1)
  if ! wait "${pids[$i]}"; then
    tail -n 3 "$OUT/results/train_$b.progress" >&2
    exit 1
  fi
done

say "4/7 export SavedModels (Kaggle GLR2020 format)"
pids=()
for m in untrained b0 b1; do
  stage "export_$m" landmark-export --workdir="$OUT/runs/$m" --export_dir="$OUT/exports/$m" \
    --overwrite &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

say "5/7 ensemble b0 + b1 (weighted concatenation 1.0 / 0.8)"
stage ensemble landmark-ensemble --models="$OUT/exports/b0,$OUT/exports/b1" --weights=1.0,0.8 \
  --export_dir="$OUT/exports/ensemble" --overwrite

say "6/7 embed index and test sets (and train for recognition), then 7/7 evaluate"
for m in untrained b0 b1 ensemble; do
  splits=(index test)
  # Recognition (GAP) needs labelled train embeddings: computed for the ensemble, the product.
  [ "$m" = ensemble ] && splits+=(train)
  for split in "${splits[@]}"; do
    stage "embed_${m}_$split" landmark-embed --model="$OUT/exports/$m" \
      --records="$OUT/tfrecords/$split/*.tfrec" --output="$OUT/embeddings/$m/$split.npz"
  done
  if [ "$m" = ensemble ]; then  # the separate set of images of no landmark, straight from JPEGs
    stage "embed_${m}_nonlandmark" landmark-embed --model="$OUT/exports/$m" \
      --csv="$OUT/gldv2/nonlandmark.csv" --image_dir="$OUT/gldv2/nonlandmark" \
      --output="$OUT/embeddings/$m/nonlandmark.npz"
  fi
  recognition=()
  if [ "$m" = ensemble ]; then
    recognition=(--train="$OUT/embeddings/$m/train.npz"
                 --recognition_solution="$OUT/gldv2/recognition_solution_v2.1.csv"
                 --recognition_submission="$OUT/submissions/$m/recognition.csv")
  fi
  stage "evaluate_$m" landmark-evaluate --index="$OUT/embeddings/$m/index.npz" \
    --queries="$OUT/embeddings/$m/test.npz" --solution="$OUT/gldv2/retrieval_solution_v2.1.csv" \
    --submission="$OUT/submissions/$m/retrieval.csv" "${recognition[@]}"
done

# The post-processing levers that pay on this data, each a row beside the plain ensemble:
# NAME=FLAGS. bench/levers.py measures every lever over seeds; discriminative re-ranking, aqe,
# dba, diffusion, egt and superglobal do not lift these models' mAP@100 (bench/README "levers").
e="$OUT/embeddings/ensemble"
levers=(
  "nonlandmark=--nonlandmark=$e/nonlandmark.npz --nonlandmark_method=both"
)
for lever in "${levers[@]}"; do
  name=${lever%%=*}
  read -r -a extra <<< "${lever#*=}"
  stage "evaluate_ensemble+$name" landmark-evaluate --index="$e/index.npz" --queries="$e/test.npz" \
    --solution="$OUT/gldv2/retrieval_solution_v2.1.csv" --train="$e/train.npz" \
    --recognition_solution="$OUT/gldv2/recognition_solution_v2.1.csv" "${extra[@]}" \
    --submission="$OUT/submissions/ensemble+$name/retrieval.csv" \
    --recognition_submission="$OUT/submissions/ensemble+$name/recognition.csv"
done

python -m landmark_tf.cli.demo_report "$OUT/results"

say "report: $OUT/report/index.html"
runs=() results=()
for m in untrained b0 b1; do runs+=("$m=$OUT/runs/$m"); done
for m in untrained b0 b1 ensemble; do results+=("$m=$OUT/results/evaluate_$m.json"); done
for lever in "${levers[@]}"; do
  results+=("ensemble+${lever%%=*}=$OUT/results/evaluate_ensemble+${lever%%=*}.json")
done
landmark-report --output_dir="$OUT/report" --gldv2_dir="$OUT/gldv2" \
  --runs="$(IFS=,; echo "${runs[*]}")" --metrics="$(IFS=,; echo "${results[*]}")" \
  --submission="untrained=$OUT/submissions/untrained/retrieval.csv,ensemble=$OUT/submissions/ensemble/retrieval.csv" \
  --recognition_submission="$OUT/submissions/ensemble/recognition.csv" \
  --timings="$OUT/results/times.txt" | tail -n 1
