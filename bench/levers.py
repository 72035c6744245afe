"""Every lever of the seeds against one baseline, on landmark-synth data with GLDv2's phenomena,
fine-tuned from a pretrained start, over several seeds (issue 24).

  PYTHONPATH=. .venv/bin/python bench/levers.py --out /tmp/levers [--seeds 0,1,2] [--steps 150]
      [--jobs 2] [--rows clean,pseudo,control,pseudo05,dynamic,npairs,factorised,pk]

Data: per seed, landmark-synth with PHENOMENA (below; why each models GLDv2 is said there).
Start: scripts/pretrain_synthetic.sh OUT/pretrain (EfficientNet-B0, 64 px, 400 steps on a
separate landmark-synth set, seed 1000, 120 landmarks, no noise: the stand-in for ImageNet),
made once and cached. Every trained row fine-tunes from it as the sources fine-tuned ImageNet
networks: backbone and neck restored, new head, `--steps` SGD steps at lr 0.01 (cosine, 10
warm-up), batch 32, 64 px, 128-d, CPU float32, training seed = the data seed.
Rows (per seed; "gain" is row - baseline):
  start        the pretrained start embedded as it is (no fine-tune)
  baseline     cosface on the full noisy train.csv
  post-processing on the baseline's embeddings (evaluation.evaluate, what landmark-evaluate
               runs): test->index mAP@100 per --rerank method; test GAP per non-landmark handling
  clean quality  landmark-clean on the start's and on the baseline's train embeddings at
               several --auto_quantile: precision / recall of the dropped images against the
               plan's noise images (train_noise.csv)
  pseudo quality landmark-pseudolabel of the index against the baseline's train embeddings:
               labels and their precision (truth: the plan) per threshold
  clean        fine-tune on the list landmark-clean keeps (start's embeddings, default 0.99)
  pseudo       baseline + steps/2 on train.csv + the index's pseudo-labels (PSEUDO_THRESHOLD)
  control      baseline + steps/2 on train.csv only (what pseudo must beat)
  pseudo05     pseudo at threshold 0.5 (more labels, fewer right)
  dynamic      dynamic_arcface (GLR2021 1st: margins 0.45 minmax(n^-1/4) + 0.05, k 3, s 45)
  npairs       cosface + NPAIRS_WEIGHT x n-pairs on P x K batches (8 landmarks x 4 images)
  factorised   cosface with head_rank 16 (a memory lever: not expected to gain accuracy)
  pk           cosface on the npairs row's P x K batches, no n-pairs (what npairs must beat)
Tasks run as `--jobs` processes side by side (each trains on about one core); every row's
result is its own file OUT/seed<S>/rows/<row>.json, so a rerun skips finished rows and resumes
unfinished ones. A markdown table (mean over seeds, gain over the baseline and its spread max -
min, the source and the direction it reports) goes to stdout, then one JSON object, the last line.
Results and their reading: bench/README.md ("levers").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import runs

from landmark_tf.curation import pseudolabel
from landmark_tf.retrieval import evaluation
from landmark_tf.synth import generator
from landmark_tf.synth import plan as synth_plan

# The lever data, on top of the demo's landmark-synth settings (difficulty 0.7, 60 train
# landmarks, 8-40 train images each). Why each setting models GLDv2: bench/README.md "levers".
PHENOMENA = {
    "facets": 3,  # distinct scenes under one landmark id (exterior, interior, detail)
    "noisy_fraction": 0.2,  # train images filed under a landmark they do not show
    "noise_other_landmarks": 0.5,  # of those, half show another landmark, half none
    "nonlandmark_style": "everyday",  # non-landmark images that do not look like landmarks
    "test_distractors": 3.0,  # recognition test set mostly non-landmark images
    "novel_landmarks": 2,  # train covers (almost) all index landmarks
}
STEPS, LR, WARMUP = 150, 0.01, 10
PSEUDO_THRESHOLD = 0.8
PSEUDO_ROWS = {"pseudo": PSEUDO_THRESHOLD, "pseudo05": 0.5}  # training row -> its threshold
NPAIRS_WEIGHT = 0.01
CLEAN_QUANTILES = (0.9, 0.95, 0.99)
PSEUDO_THRESHOLDS = (0.5, 0.7, 0.8, 0.9)
# Post-processing rows: name -> (EvalConfig fields, source, the direction the source reports).
RETRIEVAL = {
    "none": ({}, "baseline", ""),
    "aqe": ({"rerank": "aqe"}, "alpha-QE, Radenovic et al. TPAMI 2019", "+"),
    "dba": ({"rerank": "dba"}, "DBA, Radenovic et al. TPAMI 2019", "+"),
    "dba+aqe": ({"rerank": "dba+aqe"}, "Radenovic et al.; GLR2019 1st (smlyaka)", "+"),
    "aqe qe_k 3": ({"rerank": "aqe", "qe_k": 3}, "as aqe, 3 neighbours", "+"),
    "dba+aqe qe_k 3": ({"rerank": "dba+aqe", "qe_k": 3}, "as dba+aqe, 3 neighbours", "+"),
    "discriminative": ({"rerank": "discriminative"},
                       "GLR2019 1st, smlyaka (Yokoo et al. 2020)", "+"),
    "discriminative+dba+aqe": ({"rerank": "discriminative+dba+aqe"},
                               "GLR2019 1st, smlyaka: the full pipeline", "+"),
    "superglobal": ({"rerank": "superglobal"}, "SuperGlobal, Shao et al. ICCV 2023", "+"),
    "diffusion": ({"rerank": "diffusion"}, "Iscen et al. CVPR 2017", "+"),
    "egt": ({"rerank": "egt"}, "EGT, Chang et al. 2019", "+"),
}
RECOGNITION = {
    "none": ("baseline", ""),
    "penalty": ("GLR2020 recognition 1st (Henkel & Pfeiffer)", "+ GAP"),
    "classifier": ("Cookpad GLR2019 landmark classifier", "+ GAP"),
    "both": ("penalty and classifier", "+ GAP"),
}
TRAINING = {  # row -> (fit settings, source, expected direction)
    "clean": ({}, "Cookpad GLR2019; GLDv2-clean", "+"),
    "pseudo": ({}, "WeChat / Baidu GLR2019 pseudo-labels", "+"),
    "control": ({}, "same extra steps without pseudo-labels", ""),
    "pseudo05": ({}, "pseudo-labels at threshold 0.5 (more, less precise)", "+"),
    "dynamic": ({"head": "dynamic_arcface", "subcenters": 3, "scale": 45.0},
                "GLR2021 1st (dynamic margins)", "+"),
    "npairs": ({"npairs_weight": NPAIRS_WEIGHT, "batch_classes": 4},
               "Baidu GLR2019 (n-pairs)", "+"),
    "factorised": ({"head_rank": 16}, "Cookpad GLR2019 (memory)", "= (memory)"),
    "pk": ({"batch_classes": 4}, "P x K batches alone: the npairs row's sampler", ""),
}
BASE_ROWS = ("start", "baseline", "post", "quality", "facet")
# Re-rankers also scored where only the index images on the query's own facet count.
FACET_METHODS = ("none", "aqe", "dba", "dba+aqe", "aqe qe_k 3", "superglobal", "diffusion", "egt",
                 "discriminative")


class Seed:
    """One data seed's paths and plan under OUT/seed<S>."""

    def __init__(self, out: str, seed: int, settings: dict, steps: int):
        self.out, self.seed, self.steps = out, seed, steps
        self.root = os.path.join(out, f"seed{seed}")
        self.cfg = synth_plan.SynthConfig(**{"difficulty": 0.7, **settings, "seed": seed})
        self.plan = synth_plan.make_plan(self.cfg)
        self.gldv2 = os.path.join(self.root, "gldv2")
        self.start = os.path.join(out, "pretrain", "run")

    def row_path(self, row: str) -> str:
        return os.path.join(self.root, "rows", f"{row}.json")

    def done(self, row: str) -> bool:
        return os.path.exists(self.row_path(row))

    def save(self, row: str, result: dict) -> dict:
        result = {k: v for k, v in result.items() if k != "embeddings"}
        runs.write_json(self.row_path(row), result)
        print(json.dumps({"seed": self.seed, "row": row, **result}), flush=True)
        return result

    def emb(self, tag: str, split: str) -> str:
        return os.path.join(self.root, "emb", tag, f"{split}.npz")

    def fit(self, row: str, data: str, steps: int, init_from: str, **kw) -> dict:
        return runs.fit(data, os.path.join(self.root, "runs", row), steps, self.seed,
                        init_from=init_from, learning_rate=LR, warmup_steps=WARMUP, **kw)

    def score(self, row: str) -> dict:
        return runs.score(os.path.join(self.root, "runs", row), self.root, self.plan, row)


def base_task(s: Seed) -> None:
    """Data, the start's and the baseline's scores, and every row that needs no more training."""
    generator.generate(s.cfg, s.gldv2, progress=False)
    data = runs.train_records(s.root)
    splits = ("index", "test", "nonlandmark")
    if not s.done("start"):
        r = runs.score(s.start, s.root, s.plan, "start", splits)
        s.save("start", r)
    if not s.done("baseline"):
        t0 = time.time()
        fit = s.fit("baseline", data, s.steps, s.start)
        r = runs.score(os.path.join(s.root, "runs", "baseline"), s.root, s.plan, "baseline",
                       splits)
        s.save("baseline", {**r, "loss": fit["loss"], "seconds": round(time.time() - t0)})
    if not s.done("post"):
        s.save("post", post_processing(s))
    if not s.done("quality"):
        s.save("quality", quality(s))
    if not s.done("facet"):
        s.save("facet", facet_rows(s))


def post_processing(s: Seed) -> dict:
    """mAP@100 per RETRIEVAL row, GAP per RECOGNITION row, on the baseline's embeddings."""
    e = {split: s.emb("baseline", split) for split in ("train", "index", "test", "nonlandmark")}
    out = {}
    for name, (kw, _, _) in RETRIEVAL.items():
        r = evaluation.evaluate(evaluation.EvalConfig(
            queries=e["test"], index=e["index"], train=e["train"],
            solution=os.path.join(s.gldv2, "retrieval_solution_v2.1.csv"), **kw))
        out[f"map@100 {name}"] = r["map@100"]
    for name in RECOGNITION:
        kw = {} if name == "none" else {"nonlandmark": e["nonlandmark"],
                                        "nonlandmark_method": name}
        r = evaluation.evaluate(evaluation.EvalConfig(
            queries=e["test"], train=e["train"],
            recognition_solution=os.path.join(s.gldv2, "recognition_solution_v2.1.csv"), **kw))
        out[f"gap {name}"] = r["gap"]
        if name != "none":
            out[f"gap {name} settings"] = {
                "lambda": r["nonlandmark_penalty_weight"],
                "n": r["nonlandmark_penalty_neighbours"],
                "g": r["nonlandmark_classifier_exponent"],
                "val_gap": [r[f"nonlandmark_validation_gap{x}"] for x in ("_before", "")]}
    out["label_accuracy"] = label_accuracy(s, e)
    return out


def facet_rows(s: Seed) -> dict:
    """The re-rankers scored against a solution that counts only index images on the query's
    own facet (scene) as relevant, and the share of relevant index images on that facet: where
    similarity-based re-ranking can help and where only labels can."""
    index = s.plan.split("index")
    shares, lines = [], ["id,images,Usage"]
    for it in sorted(s.plan.split("test"), key=lambda x: x.id):
        same = [x.id for x in index if x.landmark_id == it.landmark_id and x.scene == it.scene]
        relevant = [x for x in index if x.landmark_id == it.landmark_id >= 0]
        if relevant:
            shares.append(len(same) / len(relevant))
        lines.append(f"{it.id},{' '.join(same)},{s.plan.usage[it.id]}" if same
                     else f"{it.id},None,Ignored")
    path = os.path.join(s.root, "retrieval_solution_same_facet.csv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    e = {split: s.emb("baseline", split) for split in ("train", "index", "test")}
    out = {"same_facet_share": float(np.mean(shares)),
           "queries_with_same_facet": len(lines) - 1 - sum(x.endswith("Ignored") for x in lines)}
    out["neighbour_precision"] = neighbour_precision(s, e)
    for name in FACET_METHODS:
        r = evaluation.evaluate(evaluation.EvalConfig(
            queries=e["test"], index=e["index"], train=e["train"], solution=path,
            **RETRIEVAL[name][0]))
        out[f"map@100 {name}"] = r["map@100"]
    return out


def neighbour_precision(s: Seed, e: dict) -> dict:
    """Share of the k nearest index images that show the query's landmark (k 1, 3, 10), over
    test queries of a landmark ("query") and over index images of one, themselves excluded
    ("index"): what alpha-QE (queries) and DBA (index) average with, at --qe_k."""
    from landmark_tf.retrieval import embeddings as emb_lib

    index = emb_lib.load_embeddings(e["index"])
    lid = {it.id: it.landmark_id for it in s.plan.items}
    index_lids = np.array([lid[str(i)] for i in index.ids])
    out = {}
    for name, path in (("query", e["test"]), ("index", e["index"])):
        q = emb_lib.load_embeddings(path)
        q_lids = np.array([lid[str(i)] for i in q.ids])
        sims = q.embeddings @ index.embeddings.T
        if name == "index":
            np.fill_diagonal(sims, -np.inf)
        keep = q_lids >= 0
        order = np.argsort(-sims[keep], axis=1)
        same = index_lids[order] == q_lids[keep][:, None]
        out[name] = {k: round(float(same[:, :k].mean()), 3) for k in (1, 3, 10)}
    return out


def label_accuracy(s: Seed, e: dict) -> dict:
    """Share of test queries of train landmarks whose 3-NN train vote names their landmark (the
    label step of discriminative re-ranking), and share of those queries among scored ones."""
    from landmark_tf.retrieval import embeddings as emb_lib

    train, test = emb_lib.load_embeddings(e["train"]), emb_lib.load_embeddings(e["test"])
    truth = {it.id: it.landmark_id for it in s.plan.split("test")}
    train_ids = set(s.plan.train_landmarks)
    sims = test.embeddings @ train.embeddings.T
    top = np.argsort(-sims, axis=1)[:, :3]
    right = total = 0
    for i, qid in enumerate(test.ids):
        lid = truth[str(qid)]
        if lid in train_ids:
            vote = Counter(train.landmark_ids[top[i]].tolist()).most_common(1)[0][0]
            right += int(vote == lid)
            total += 1
    scored = sum(1 for it in s.plan.split("test") if it.landmark_id >= 0)
    return {"accuracy": right / max(1, total), "queries_of_train_landmarks": total,
            "landmark_queries": scored}


def quality(s: Seed) -> dict:
    """Cleaning precision/recall per embeddings x quantile; pseudo-label precision per threshold."""
    out = {}
    for tag in ("start", "baseline"):
        for q in CLEAN_QUANTILES:
            _, r = runs.clean_quality(s.root, s.plan, s.emb(tag, "train"), q,
                                      f"clean_{tag}_{q}.csv")
            out[f"clean {tag} {q}"] = r
    truth = {it.id: it.landmark_id for it in s.plan.split("index")}
    for t in PSEUDO_THRESHOLDS:
        path = os.path.join(s.root, f"pseudo_{t}.csv")
        pseudolabel.pseudolabel(pseudolabel.PseudoLabelConfig(
            s.emb("baseline", "train"), s.emb("baseline", "index"), path, threshold=t, k=5))
        rows = [line.split(",") for line in runs.read_text(path).splitlines()[1:]]
        right = sum(truth[r[0]] == int(r[2]) for r in rows)
        out[f"pseudo {t}"] = {"labelled": len(rows), "precision": right / max(1, len(rows)),
                              "index_of_train_landmarks": sum(
                                  lid in set(s.plan.train_landmarks) for lid in truth.values())}
    return out


def pseudo_records(s: Seed, threshold: float) -> str:
    """TFRecords of train.csv plus the index images landmark-pseudolabel labels at `threshold`
    (one image tree of links: landmark-tfrecords reads one --image_dir)."""
    path = os.path.join(s.root, f"pseudo_{threshold}.csv")
    rows = [line.split(",") for line in runs.read_text(path).splitlines()[1:]]
    labelled = {r[0] for r in rows}
    merged = os.path.join(s.root, f"merged_images_{threshold}")
    for split in ("train", "index"):
        for it in s.plan.split(split):
            if split == "index" and it.id not in labelled:
                continue
            dst = generator.image_path(merged, "x", it.id)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.exists(dst):
                os.symlink(os.path.abspath(generator.image_path(s.gldv2, split, it.id)), dst)
    csv_path = os.path.join(s.root, f"train_plus_pseudo_{threshold}.csv")
    with open(csv_path, "w") as f:
        f.write(runs.read_text(os.path.join(s.gldv2, "train.csv")))
        f.writelines(f"{r[0]},,{r[2]}\n" for r in rows)
    return runs.records(s.root, f"pseudo_{threshold}", os.path.join(merged, "x"),
                        train_csv=csv_path)


def train_task(s: Seed, row: str) -> None:
    """One training row (after base_task of its seed)."""
    if s.done(row):
        return
    t0 = time.time()
    train = os.path.join(s.root, "records", "train")
    baseline = os.path.join(s.root, "runs", "baseline")
    extra = {}
    if row == "clean":
        path, extra = runs.clean_quality(s.root, s.plan, s.emb("start", "train"))
        data = runs.records(s.root, "clean", os.path.join(s.gldv2, "train"), train_csv=path)
        fit = s.fit(row, data, s.steps, s.start)
    elif row in ("pseudo", "pseudo05", "control"):
        threshold = PSEUDO_ROWS.get(row)
        data = pseudo_records(s, threshold) if threshold else train
        fit = s.fit(row, data, max(1, s.steps // 2), baseline)
    else:
        fit = s.fit(row, train, s.steps, s.start, **TRAINING[row][0])
    extra.update({k: fit[k] for k in ("pair_anchors",) if k in fit})
    s.save(row, {**s.score(row), **extra, "loss": fit["loss"],
                 "seconds": round(time.time() - t0)})


def schedule(a, settings: dict) -> None:
    """Runs the tasks as `--jobs` worker processes: every seed's base task first, then the
    training rows seed by seed in ROW order; a task whose row file exists is skipped."""
    tasks = [("base", seed) for seed in a.seed_list]
    tasks += [(row, seed) for row in a.row_list for seed in a.seed_list]
    logs = os.path.join(a.out, "logs")
    os.makedirs(logs, exist_ok=True)
    running: list[tuple[subprocess.Popen, tuple, str]] = []
    failed = []

    def finished(task) -> bool:
        s = Seed(a.out, task[1], settings, a.steps)
        return all(s.done(r) for r in BASE_ROWS) if task[0] == "base" else s.done(task[0])

    pending = [t for t in tasks if not finished(t)]
    while pending or running:
        for proc, task, log in list(running):
            if proc.poll() is not None:
                running.remove((proc, task, log))
                if proc.returncode != 0:
                    failed.append(f"{task[0]} seed {task[1]} (see {log})")
        ready = [t for t in pending if t[0] == "base" or finished(("base", t[1]))]
        blocked = {t[1] for t in pending if t[0] == "base"} | {
            t[1] for _, t, _ in running if t[0] == "base"}
        ready = [t for t in ready if t[0] == "base" or t[1] not in blocked]
        while ready and len(running) < a.jobs:
            task = ready.pop(0)
            pending.remove(task)
            log = os.path.join(logs, f"{task[0]}_seed{task[1]}.log")
            cmd = [sys.executable, os.path.abspath(__file__), f"--out={a.out}",
                   f"--steps={a.steps}", f"--synth={json.dumps(a.synth_overrides)}",
                   f"--worker={task[0]}", f"--seeds={task[1]}"]
            print(f"[{time.strftime('%H:%M:%S')}] start {task[0]} seed {task[1]}",
                  file=sys.stderr, flush=True)
            with open(log, "a") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=f,
                                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
            running.append((proc, task, log))
        if not ready and not running and pending:  # their base task failed
            failed += [f"{t[0]} seed {t[1]} (its base task failed)" for t in pending]
            break
        time.sleep(2)
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)


def summarise(out: str, seeds: list[int], settings: dict, steps: int) -> tuple[str, dict]:
    """Markdown tables and the JSON summary from the row files there are."""
    got = {}
    for seed in seeds:
        s = Seed(out, seed, settings, steps)
        got[seed] = {r: runs.read_json(s.row_path(r)) for r in (*BASE_ROWS, *TRAINING)}
    have = [x for x in seeds if got[x]["post"]]
    lines = [f"Post-processing on the baseline's embeddings, seeds {have} (values per seed; "
             "gain = lever - none, mean and spread max - min over seeds):", "",
             "| lever | source | expected | per seed | mean | mean gain | spread of gain |",
             "|---|---|---|---|---|---|---|"]
    summary = {"post": {}, "facet": {}, "training": {}, "quality": {}}

    def add(name, key, base_key, source, expected, table):
        vals = [got[x][table][key] for x in have]
        gains = [got[x][table][key] - got[x][table][base_key] for x in have]
        lines.append(f"| {name} | {source} | {expected} | "
                     f"{' / '.join(f'{v:.3f}' for v in vals)} | {np.mean(vals):.3f} | "
                     f"{np.mean(gains):+.3f} | {np.ptp(gains):.3f} |")
        summary["post"][name] = {"per_seed": dict(zip(have, vals, strict=True)),
                                 "mean_gain": round(float(np.mean(gains)), 4),
                                 "spread": round(float(np.ptp(gains)), 4)}

    if have:
        for name, (_, source, expected) in RETRIEVAL.items():
            add(f"mAP@100 {name}", f"map@100 {name}", "map@100 none", source, expected, "post")
        for name, (source, expected) in RECOGNITION.items():
            add(f"GAP {name}", f"gap {name}", "gap none", source, expected, "post")
        acc = [got[x]["post"]["label_accuracy"]["accuracy"] for x in have]
        lines += ["", "3-NN label accuracy on queries of train landmarks (discriminative "
                  f"re-ranking's label step): {' / '.join(f'{v:.2f}' for v in acc)}"]
    f_seeds = [x for x in seeds if got[x]["facet"]]
    if f_seeds:
        share = [got[x]["facet"]["same_facet_share"] for x in f_seeds]
        for x in f_seeds:
            npr = got[x]["facet"].get("neighbour_precision")
            if npr:
                lines.append(f"seed {x}: share of the 1 / 3 / 10 nearest index images of the "
                             "same landmark, for landmark queries: "
                             f"{' / '.join(str(v) for v in npr['query'].values())}; "
                             "for index images: "
                             f"{' / '.join(str(v) for v in npr['index'].values())}")
        lines += ["", "The same re-rankers where only index images on the query's own facet "
                  "count as relevant (share of relevant index images on it: "
                  f"{' / '.join(f'{v:.2f}' for v in share)}):", "",
                  "| lever | mAP@100 per seed | mean | mean gain | spread of gain |",
                  "|---|---|---|---|---|"]
        for name in FACET_METHODS:
            v = [got[x]["facet"][f"map@100 {name}"] for x in f_seeds]
            g = [got[x]["facet"][f"map@100 {name}"] - got[x]["facet"]["map@100 none"]
                 for x in f_seeds]
            lines.append(f"| {name} | {' / '.join(f'{x:.3f}' for x in v)} | {np.mean(v):.3f} "
                         f"| {np.mean(g):+.3f} | {np.ptp(g):.3f} |")
            summary["facet"][name] = {"per_seed": dict(zip(f_seeds, v, strict=True)),
                                      "mean_gain": round(float(np.mean(g)), 4)}
    lines += ["", f"Training rows, {steps} steps from the pretrained start (mAP@100 and GAP per "
              "seed; gain over the baseline, mean and spread):", "",
              "| row | source | expected | mAP@100 per seed | mean | gain | spread | "
              "GAP per seed | mean | gain | spread |", "|---" * 11 + "|"]
    for row in ("start", "baseline", *TRAINING):
        src, exp = TRAINING.get(row, ({}, "pretrained, no fine-tune" if row == "start"
                                      else "cosface, full noisy train.csv", ""))[1:]
        seeds_row = [x for x in seeds if got[x][row] and got[x]["baseline"]]
        if not seeds_row:
            continue
        cells = []
        for key in ("map@100", "gap"):
            v = [got[x][row][key] for x in seeds_row]
            g = [got[x][row][key] - got[x]["baseline"][key] for x in seeds_row]
            cells += [" / ".join(f"{x:.3f}" for x in v), f"{np.mean(v):.3f}",
                      f"{np.mean(g):+.3f}", f"{np.ptp(g):.3f}"]
            summary["training"].setdefault(row, {})[key] = {
                "per_seed": dict(zip(seeds_row, v, strict=True)),
                "mean_gain": round(float(np.mean(g)), 4)}
        lines.append(f"| {row} | {src} | {exp} | " + " | ".join(cells) + " |")
    q_seeds = [x for x in seeds if got[x]["quality"]]
    if q_seeds:
        lines += ["", "Cleaning: dropped images vs the noise truth (precision / recall per "
                  "seed), landmark-clean's embeddings and --auto_quantile:", "",
                  "| embeddings | quantile | precision per seed | recall per seed | "
                  "dropped / noise per seed | true images dropped (on other facets) |",
                  "|---|---|---|---|---|---|"]
        for tag in ("start", "baseline"):
            for q in CLEAN_QUANTILES:
                r = [got[x]["quality"][f"clean {tag} {q}"] for x in q_seeds]
                lines.append(f"| {tag} | {q} | "
                             + " / ".join(f"{v['noise_precision']:.2f}" for v in r) + " | "
                             + " / ".join(f"{v['noise_recall']:.2f}" for v in r) + " | "
                             + " / ".join(f"{v['dropped']}/{v['noise']}" for v in r) + " | "
                             + " / ".join(f"{v['true_dropped']} ({v['true_dropped_other_facets']})"
                                          for v in r) + " |")
                summary["quality"][f"clean {tag} {q}"] = r
        lines += ["", "Pseudo-labels of the index (baseline's train embeddings, k 5):", "",
                  "| threshold | labelled per seed | precision per seed |", "|---|---|---|"]
        for t in PSEUDO_THRESHOLDS:
            r = [got[x]["quality"][f"pseudo {t}"] for x in q_seeds]
            mark = " (trained)" if t in PSEUDO_ROWS.values() else ""
            lines.append(f"| {t}{mark} | " + " / ".join(str(v["labelled"]) for v in r) + " | "
                         + " / ".join(f"{v['precision']:.2f}" for v in r) + " |")
            summary["quality"][f"pseudo {t}"] = r
    return "\n".join(lines), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=STEPS, help="Fine-tuning steps per row.")
    p.add_argument("--jobs", type=int, default=2, help="Worker processes side by side.")
    p.add_argument("--rows", default=",".join(TRAINING), help="Training rows to run.")
    p.add_argument("--synth", default="{}", help="JSON of landmark-synth settings over "
                   "PHENOMENA (e.g. smaller sets for a smoke test; null drops one).")
    p.add_argument("--pretrain_steps", type=int, default=400)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.seed_list = [int(x) for x in a.seeds.split(",")]
    a.row_list = [r for r in a.rows.split(",") if r]
    unknown = set(a.row_list) - set(TRAINING)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; known {list(TRAINING)}")
    a.synth_overrides = json.loads(a.synth)
    # null drops a PHENOMENA setting (landmark-synth's default then)
    settings = {k: v for k, v in {**PHENOMENA, **a.synth_overrides}.items() if v is not None}
    if a.worker:
        s = Seed(a.out, a.seed_list[0], settings, a.steps)
        base_task(s) if a.worker == "base" else train_task(s, a.worker)
        return
    t0 = time.time()
    # Row files do not say how they were made: one OUT holds one setting of the bench.
    made = {"steps": a.steps, "phenomena": settings, "lr": LR, "warmup": WARMUP,
            "pseudo_threshold": PSEUDO_THRESHOLD, "npairs_weight": NPAIRS_WEIGHT}
    before = runs.read_json(os.path.join(a.out, "bench_settings.json"))
    if before is not None and before != json.loads(json.dumps(made)):
        raise SystemExit(f"{a.out} holds a run with other settings ({before}); use another --out")
    runs.write_json(os.path.join(a.out, "bench_settings.json"), made)
    runs.pretrain(os.path.join(a.out, "pretrain"), PRETRAIN_STEPS=str(a.pretrain_steps))
    schedule(a, settings)
    text, summary = summarise(a.out, a.seed_list, settings, a.steps)
    print(text)
    print(json.dumps({"seeds": a.seed_list, "steps": a.steps, "phenomena": settings,
                      "seconds": round(time.time() - t0), **summary}))


if __name__ == "__main__":
    main()
