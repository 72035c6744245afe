"""Frozen vs training BatchNorm in a short fine-tune from a pretrained start.

  .venv/bin/python bench/frozen_bn.py --out /tmp/frozen_bn [--seeds 0,1,2] [--steps 200]
      [--batches 4,8]

The GLR2020 release trained its backbone in inference mode (`--backbone_mode=frozen_bn`:
BatchNorm normalises with its stored statistics and keeps them, gamma/beta train, no
drop-connect; v2clean_train.ipynb cell 11). This bench measures what that does where it
matters, fine-tuning a pretrained network with few images per replica:
  pretrain   scripts/pretrain_synthetic.sh OUT/pretrain (cached): EfficientNet-B0 at 64 px,
             400 steps with training BN on a separate landmark-synth set (seed 1000, 120
             landmarks, no label noise: other scenes and landmarks than the target, the
             stand-in for ImageNet)
  target     the demo's set (landmark-synth seed 0, difficulty 0.7)
  start      the pretrained backbone and neck, embedded as they are (no fine-tune)
  rows       `--steps` SGD steps (lr 0.01, cosine, 10 warm-up) from the pretrained backbone and
             neck (new head: the class counts differ) at each per-replica batch in `--batches`
             (one replica), with backbone_mode train and frozen_bn, one run per seed
Scored by test->index mAP@100 (Kaggle retrieval) and test GAP (kNN over train). Results go to
OUT/results.json after each run (a rerun skips what is there); a markdown table with mean and
spread (max - min) over seeds is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import runs

from landmark_tf.synth import plan as synth_plan

LR = 0.01
MODES = ("train", "frozen_bn")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batches", default="4,8", help="Per-replica batch sizes.")
    a = p.parse_args()
    path = os.path.join(a.out, "results.json")
    results = runs.read_json(path, {})

    def save():
        runs.write_json(path, results)

    start_dir = runs.pretrain(os.path.join(a.out, "pretrain"))
    root = os.path.join(a.out, "target")
    plan = synth_plan.make_plan(runs.synth(root, 0))
    data = runs.train_records(root)
    if "start" not in results:
        r = runs.score(start_dir, root, plan, "start")
        results["start"] = {k: v for k, v in r.items() if k != "embeddings"}
        save()
    for batch in (int(b) for b in a.batches.split(",")):
        for mode in MODES:
            for seed in (int(s) for s in a.seeds.split(",")):
                key = f"{mode}/b{batch}/s{seed}"
                if key in results:
                    continue
                t0 = time.time()
                workdir = os.path.join(root, "runs", key.replace("/", "_"))
                r = runs.fit(data, workdir, a.steps, seed, init_from=start_dir,
                           batch_size=batch, learning_rate=LR, warmup_steps=10,
                           backbone_mode=mode)
                s = runs.score(workdir, root, plan, key.replace("/", "_"))
                results[key] = {"map@100": s["map@100"], "gap": s["gap"], "loss": r["loss"],
                                "seconds": round(time.time() - t0)}
                print(json.dumps({"run": key, **results[key]}), flush=True)
                save()
    print(table(results))


def table(results: dict) -> str:
    lines = ["| images per replica | backbone_mode | mAP@100 per seed | mean | spread "
             "| GAP per seed | mean |", "|---|---|---|---|---|---|---|"]
    if "start" in results:
        r = results["start"]
        lines.append(f"| – | pretrained start, no fine-tune | {r['map@100']:.3f} | | "
                     f"| {r['gap']:.3f} | |")
    keys = sorted({tuple(k.split("/")[:2]) for k in results if "/" in k},
                  key=lambda k: (int(k[1][1:]), MODES.index(k[0])))
    for mode, batch in keys:
        got = [results[k] for k in sorted(results) if k.startswith(f"{mode}/{batch}/")]
        m, g = [x["map@100"] for x in got], [x["gap"] for x in got]
        lines.append(f"| {batch[1:]} | {mode} | {' / '.join(f'{x:.3f}' for x in m)} | "
                     f"{np.mean(m):.3f} | {max(m) - min(m):.3f} | "
                     f"{' / '.join(f'{x:.3f}' for x in g)} | {np.mean(g):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
