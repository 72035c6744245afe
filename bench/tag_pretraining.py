"""Tag pretraining (WeChat AI GLR2019: WT-Set / LW-Set) as a stage before the landmark stage,
against the same number of steps without it, on landmark-synth.

  .venv/bin/python bench/tag_pretraining.py --out /tmp/tags [--seeds 0,1] [--steps 250]
      [--tag_steps 125]

Per synth seed, the demo's set (difficulty 0.7: 60 landmarks, 8-40 train images each,
10% noise images) with its noisy train_attribution.csv titles; one landmark-tfrecords output with
--attribution_csv (landmark labels and title tags); EfficientNet-B0 at 64 px, batch 32, SGD lr 0.1
cosine, embedding 128, random init, CPU float32 (runs.fit). Rows:
  control         cosface m 0.15 for tag_steps + steps (the same number of steps, no tags)
  wt_then_cosface --head=multilabel for tag_steps, then cosface for steps (--init_from: backbone
                  and neck kept, new head)
  lw_then_cosface --head=label_weighted for tag_steps, then the same landmark stage
Scored like bench/levers.py: test->index mAP@100 and test GAP. Results go to OUT/results.json after
each row (a rerun skips rows already there); a markdown table with the spread over seeds last.
"""

from __future__ import annotations

import argparse
import os

import runs
from runs import fit

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


def run_row_stages(root: str, data: str, row: str, seed: int, steps: int, tag_steps: int) -> dict:
    run_dir = os.path.join(root, "runs")
    if row == "control":
        r = fit(data, os.path.join(run_dir, row), steps + tag_steps, seed)
        return {"loss": r["loss"]}
    tags_dir = os.path.join(run_dir, f"{row}_tags")
    t = fit(data, tags_dir, tag_steps, seed, head=TAG_HEADS[row])
    r = fit(data, os.path.join(run_dir, row), steps, seed, init_from=tags_dir)
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
    results = {}
    for seed in (int(s) for s in a.seeds.split(",")):
        root = os.path.join(a.out, f"seed{seed}")
        plan = synth_plan.make_plan(runs.synth(root, seed))
        data = tag_records(root)

        def run_row(row: str, root=root, data=data, seed=seed, plan=plan) -> dict:
            facts = run_row_stages(root, data, row, seed, a.steps, a.tag_steps)
            scored = runs.score(os.path.join(root, "runs", row), root, plan, row)
            return {**facts, "map@100": scored["map@100"], "gap": scored["gap"]}

        results = runs.run_rows(path, seed, ROWS, run_row)
    print(runs.per_seed_table(results, ROWS))


if __name__ == "__main__":
    main()
