"""Tag pretraining (WeChat AI GLR2019: WT-Set / LW-Set) as a stage before the landmark stage,
against the same number of steps without it, on landmark-synth.

  .venv/bin/python bench/tag_pretraining.py --out /tmp/tags [--seeds 0,1] [--steps 250]
      [--tag_steps 125]

Per synth seed, the levers_train set (difficulty 0.7: 60 landmarks, 8-40 train images each,
10% noise images) with its noisy train_attribution.csv titles; one landmark-tfrecords output with
--attribution_csv (landmark labels and title tags); EfficientNet-B0 at 64 px, batch 32, SGD lr 0.1
cosine, embedding 128, random init, CPU float32 (levers_train.fit). Rows:
  control         cosface m 0.15 for tag_steps + steps (the same number of steps, no tags)
  wt_then_cosface --head=multilabel for tag_steps, then cosface for steps (--init_from: backbone
                  and neck kept, new head)
  lw_then_cosface --head=label_weighted for tag_steps, then the same landmark stage
Scored like levers_train: test->index mAP@100 and test GAP. Results go to OUT/results.json after
each row (a rerun skips rows already there); a markdown table with the spread over seeds last.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from levers_train import _read, fit, score, synth

from landmark_tf.data import convert
from landmark_tf.synth import plan as synth_plan
from landmark_tf.synth import titles

ROWS = ("control", "wt_then_cosface", "lw_then_cosface")
TAG_HEADS = {"wt_then_cosface": "multilabel", "lw_then_cosface": "label_weighted"}


def tag_records(root: str) -> str:
    gldv2, out = os.path.join(root, "gldv2"), os.path.join(root, "records", "tags")
    convert.convert_dataset(convert.ConvertConfig(
        image_dir=os.path.join(gldv2, "train"), output_dir=out, num_shards=2,
        train_csv=os.path.join(gldv2, "train.csv"),
        attribution_csv=os.path.join(gldv2, titles.ATTRIBUTION_FILE)), progress=False)
    return out


def run_row(root: str, data: str, row: str, seed: int, steps: int, tag_steps: int) -> dict:
    runs = os.path.join(root, "runs")
    if row == "control":
        r = fit(data, os.path.join(runs, row), steps + tag_steps, seed)
        return {"loss": r["loss"]}
    tags_dir = os.path.join(runs, f"{row}_tags")
    t = fit(data, tags_dir, tag_steps, seed, head=TAG_HEADS[row])
    r = fit(data, os.path.join(runs, row), steps, seed, init_from=tags_dir)
    return {"tag_loss": t["loss"], "tag_accuracy": t["accuracy"], "loss": r["loss"],
            "restored": r["init_from"]["restored"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=250, help="Landmark-stage steps.")
    p.add_argument("--tag_steps", type=int, default=125, help="Tag-stage steps.")
    a = p.parse_args()
    path = os.path.join(a.out, "results.json")
    results = json.loads(_read(path)) if os.path.exists(path) else {}
    for seed in (int(s) for s in a.seeds.split(",")):
        root = os.path.join(a.out, f"seed{seed}")
        plan = synth_plan.make_plan(synth(root, seed))
        data = tag_records(root)
        done = results.setdefault(str(seed), {})
        for row in ROWS:
            if row in done:
                continue
            start = time.time()
            facts = run_row(root, data, row, seed, a.steps, a.tag_steps)
            scored = score(os.path.join(root, "runs", row), root, plan, row)
            done[row] = {**facts, "map@100": scored["map@100"], "gap": scored["gap"],
                         "seconds": round(time.time() - start)}
            print(json.dumps({"seed": seed, "row": row, **done[row]}), flush=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    print(table(results))


def table(results: dict) -> str:
    lines = ["| row | mAP@100 per seed | spread | GAP per seed | spread |", "|---|---|---|---|---|"]
    for row in ROWS:
        got = [results[s][row] for s in sorted(results) if row in results[s]]
        if got:
            cells = []
            for key in ("map@100", "gap"):
                v = [g[key] for g in got]
                cells += [" / ".join(f"{x:.3f}" for x in v), f"{max(v) - min(v):.3f}"]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
