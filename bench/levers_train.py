"""The training-data levers of issue 14 on landmark-synth, one table (training part of levers.py).

  .venv/bin/python bench/levers_train.py --out /tmp/levers [--seeds 0,1] [--steps 250]
      [--rows baseline,clean,dynamic,factorised,npairs,pseudo]
  .venv/bin/python bench/levers_train.py --out /tmp/levers --clean_sweep 0.9,0.95,0.99

Per synth seed (difficulty 0.7, the demo's set: 60 landmarks, 8-40 train images each, 10%
noise images per landmark): landmark-tfrecords, then EfficientNet-B0 at 64 px, batch 32,
`--steps` SGD steps (lr 0.1, cosine, 20 warm-up), embedding dim 128, CPU float32; every row
is scored by test->index mAP@100 (Kaggle retrieval) and test GAP (recognition vs train).
  baseline    cosface m=0.15 on the full noisy train.csv
  clean       landmark-clean on the baseline's train embeddings -> train on the cleaned list
              only (same steps); also precision/recall of the dropped images vs train_noise.csv
  pseudo      landmark-pseudolabel index images against the baseline's train embeddings ->
              train.csv + pseudo rows, an extra stage of steps/2 from the baseline; precision
              of the pseudo-labels vs the synth plan; control: baseline + steps/2 on train only
  dynamic     dynamic_arcface (a 0.45, b 0.05, k 3, s 45: GLR2021 1st place)
  factorised  cosface with head_rank 16 (class matrix 128x16 times 16xC)
  npairs      cosface + 0.1 x n-pairs loss, i.i.d. batches (few same-class pairs)
  pk          cosface on P x K batches (--batch_classes 4: 8 landmarks x 4 images), no n-pairs
  npairs_pk   cosface + 0.1 x n-pairs on the same P x K batches (every anchor has positives)
  npairs_pk_w01  the same at n-pairs weight 0.01
Results go to OUT/results.json after each row (a rerun skips rows already there), and a
markdown table is printed at the end with the spread (max - min) over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf

from landmark_tf import preprocess
from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.curation import clean, pseudolabel
from landmark_tf.data import convert
from landmark_tf.modeling import model
from landmark_tf.retrieval import evaluation
from landmark_tf.retrieval.embeddings import save_embeddings
from landmark_tf.synth import generator
from landmark_tf.synth import plan as synth_plan
from landmark_tf.training import train

SIZE, BATCH, DIM = 64, 32, 128
ROWS = ("baseline", "clean", "dynamic", "factorised", "npairs", "pk", "npairs_pk", "npairs_pk_w01",
        "pseudo")
MODELS = {
    "baseline": {}, "clean": {}, "pseudo": {},
    "dynamic": {"head": "dynamic_arcface", "subcenters": 3, "scale": 45.0},
    "factorised": {"head_rank": 16},
    "npairs": {"npairs_weight": 0.1},
    "pk": {"batch_classes": 4},
    "npairs_pk": {"npairs_weight": 0.1, "batch_classes": 4},
    "npairs_pk_w01": {"npairs_weight": 0.01, "batch_classes": 4},
}
TRAIN_KEYS = ("batch_classes",)  # MODELS entries that are TrainConfig fields


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def synth(root: str, seed: int) -> synth_plan.SynthConfig:
    cfg = synth_plan.SynthConfig(seed=seed, difficulty=0.7)
    generator.generate(cfg, os.path.join(root, "gldv2"), progress=False)
    return cfg


def records(root: str, name: str, image_dir: str, **kw) -> str:
    out = os.path.join(root, "records", name)
    convert.convert_dataset(convert.ConvertConfig(image_dir=image_dir, output_dir=out,
                                                  num_shards=2, **kw), progress=False)
    return out


def fit(data_dir: str, workdir: str, steps: int, seed: int, init_from: str = "",
        batch_size: int = BATCH, learning_rate: float = 0.1, warmup_steps: int = 20, **kw):
    train_kw = {k: kw.pop(k) for k in TRAIN_KEYS if k in kw}
    cfg = ModelConfig(backbone="efficientnet-b0", image_size=SIZE, embedding_dim=DIM, **kw)
    tcfg = TrainConfig(data_dir=data_dir, workdir=workdir, train_steps=steps,
                       batch_size=batch_size, learning_rate=learning_rate, schedule="cosine",
                       warmup_steps=warmup_steps, val_split="", checkpoint_every=steps,
                       seed=seed, init_from=init_from, **train_kw)
    return train.train(cfg, tcfg)


def embed(workdir: str, gldv2: str, split: str, ids: list[str], labels=None, out=""):
    net, _ = model.restore_embedding_model(workdir)
    vecs = []
    for s in range(0, len(ids), 64):
        batch = [preprocess.resize_for_model(tf.io.decode_jpeg(tf.io.read_file(
            generator.image_path(gldv2, split, i))), SIZE) for i in ids[s:s + 64]]
        vecs.append(net(tf.stack(batch), training=False).numpy())
    save_embeddings(out, ids, np.concatenate(vecs), labels)
    return out


def score(workdir: str, root: str, plan, tag: str) -> dict:
    gldv2, emb = os.path.join(root, "gldv2"), os.path.join(root, "emb", tag)
    train_items = plan.split("train")
    paths = {s: embed(workdir, gldv2, s, [it.id for it in plan.split(s)],
                      out=os.path.join(emb, f"{s}.npz")) for s in ("index", "test")}
    paths["train"] = embed(workdir, gldv2, "train", [it.id for it in train_items],
                           [it.landmark_id for it in train_items], os.path.join(emb, "train.npz"))
    r = evaluation.evaluate(evaluation.EvalConfig(
        queries=paths["test"], index=paths["index"], train=paths["train"],
        solution=os.path.join(gldv2, "retrieval_solution_v2.1.csv"),
        recognition_solution=os.path.join(gldv2, "recognition_solution_v2.1.csv")))
    return {"map@100": r["map@100"], "gap": r["gap"], "embeddings": paths}


def clean_quality(root, plan, train_npz, quantile=0.99, name="train_clean_levers.csv"):
    """landmark-clean on `train_npz`; precision/recall of the dropped images vs the truth."""
    gldv2 = os.path.join(root, "gldv2")
    out = os.path.join(root, name)
    summary = clean.clean(clean.CleanConfig(train_npz, os.path.join(gldv2, "train.csv"), out,
                                            os.path.join(root, "clean_report.csv"),
                                            auto_quantile=quantile))
    noise = {it.id for it in synth_plan.noise_items(plan)}
    kept = {i for line in _read(out).splitlines()[1:] for i in line.split(",")[1].split()}
    dropped = {it.id for it in plan.split("train")} - kept
    tp = len(dropped & noise)
    return out, {"noise_recall": tp / len(noise), "noise_precision": tp / max(1, len(dropped)),
                 "dropped": len(dropped), "noise": len(noise), "quantile": quantile,
                 "threshold": summary["threshold"], "classes_kept": summary["classes"]}


def clean_row(root, plan, base, steps, seed):
    out, quality = clean_quality(root, plan, base["embeddings"]["train"])
    data = records(root, "clean", os.path.join(root, "gldv2", "train"), train_csv=out)
    r = fit(data, os.path.join(root, "runs", "clean"), steps, seed)
    return {**score(os.path.join(root, "runs", "clean"), root, plan, "clean"), **quality,
            "loss": r["loss"]}


def clean_sweep(out: str, seeds: list[int], quantiles: list[float]) -> None:
    """Cleaning quality only (no training) at several --auto_quantile values, from the
    baseline's train embeddings of an earlier run."""
    for seed in seeds:
        root = os.path.join(out, f"seed{seed}")
        plan = synth_plan.make_plan(synth_plan.SynthConfig(seed=seed, difficulty=0.7))
        npz = os.path.join(root, "emb", "baseline", "train.npz")
        for q in quantiles:
            _, quality = clean_quality(root, plan, npz, q, f"sweep_clean_{q}.csv")
            print(json.dumps({"seed": seed, **quality}), flush=True)


def pseudo_row(root, plan, base, steps, seed):
    gldv2 = os.path.join(root, "gldv2")
    out = os.path.join(root, "pseudo.csv")
    summary = pseudolabel.pseudolabel(pseudolabel.PseudoLabelConfig(
        base["embeddings"]["train"], base["embeddings"]["index"], out, threshold=0.5, k=5))
    truth = {it.id: it.landmark_id for it in plan.split("index")}
    rows = [line.split(",") for line in _read(out).splitlines()[1:]]
    correct = sum(truth[r[0]] == int(r[2]) for r in rows)
    # One image tree for both sets (landmark-tfrecords reads one --image_dir): links.
    merged = os.path.join(root, "merged_images")
    for split in ("train", "index"):
        for it in plan.split(split) if split == "train" else [
                it for it in plan.split("index") if it.id in {r[0] for r in rows}]:
            dst = generator.image_path(merged, "x", it.id)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.exists(dst):
                os.symlink(os.path.abspath(generator.image_path(gldv2, split, it.id)), dst)
    csv_path = os.path.join(root, "train_plus_pseudo.csv")
    with open(csv_path, "w") as f:
        f.write(_read(os.path.join(gldv2, "train.csv")))
        f.writelines(f"{r[0]},,{r[2]}\n" for r in rows)
    data = records(root, "pseudo", os.path.join(merged, "x"), train_csv=csv_path)
    base_dir = os.path.join(root, "runs", "baseline")
    extra = max(1, steps // 2)
    fit(data, os.path.join(root, "runs", "pseudo"), extra, seed, init_from=base_dir)
    control_data = os.path.join(root, "records", "train")
    fit(control_data, os.path.join(root, "runs", "control"), extra, seed, init_from=base_dir)
    control = score(os.path.join(root, "runs", "control"), root, plan, "control")
    return {**score(os.path.join(root, "runs", "pseudo"), root, plan, "pseudo"),
            "pseudo_labelled": summary["labelled"], "pseudo_precision": correct / max(1, len(rows)),
            "control_map@100": control["map@100"], "control_gap": control["gap"]}


def run_seed(out: str, seed: int, steps: int, rows: list[str], results: dict) -> None:
    root = os.path.join(out, f"seed{seed}")
    plan = synth_plan.make_plan(synth(root, seed))
    gldv2 = os.path.join(root, "gldv2")
    data = records(root, "train", os.path.join(gldv2, "train"),
                   train_csv=os.path.join(gldv2, "train.csv"))
    done = results.setdefault(str(seed), {})
    for row in rows:
        if row in done:
            continue
        start = time.time()
        if row in MODELS and row not in ("clean", "pseudo"):
            r = fit(data, os.path.join(root, "runs", row), steps, seed, **MODELS[row])
            done[row] = score(os.path.join(root, "runs", row), root, plan, row)
            if "pair_anchors" in r:
                done[row]["pair_anchors"] = r["pair_anchors"]
        elif row == "clean":
            done[row] = clean_row(root, plan, done["baseline"], steps, seed)
        else:
            done[row] = pseudo_row(root, plan, done["baseline"], steps, seed)
        done[row]["seconds"] = round(time.time() - start)
        print(json.dumps({"seed": seed, "row": row, **{k: v for k, v in done[row].items()
                                                        if k != "embeddings"}}), flush=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


def table(results: dict) -> str:
    lines = ["| row | mAP@100 per seed | spread | GAP per seed | spread |", "|---|---|---|---|---|"]
    for row in ROWS:
        got = [results[s][row] for s in sorted(results) if row in results[s]]
        if not got:
            continue
        cells = []
        for key in ("map@100", "gap"):
            v = [g[key] for g in got]
            cells += [" / ".join(f"{x:.3f}" for x in v), f"{max(v) - min(v):.3f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--clean_sweep", default="", help="Only measure cleaning at these "
                   "comma-separated --auto_quantile values on an earlier run's baseline.")
    a = p.parse_args()
    if a.clean_sweep:
        clean_sweep(a.out, [int(s) for s in a.seeds.split(",")],
                    [float(q) for q in a.clean_sweep.split(",")])
        return
    path = os.path.join(a.out, "results.json")
    results = json.loads(_read(path)) if os.path.exists(path) else {}
    rows = [r for r in ROWS if r in a.rows.split(",")]
    if {"clean", "pseudo"} & set(rows) and "baseline" not in rows:
        rows.insert(0, "baseline")
    for seed in (int(s) for s in a.seeds.split(",")):
        run_seed(a.out, seed, a.steps, rows, results)
    print(table(results))


if __name__ == "__main__":
    main()
