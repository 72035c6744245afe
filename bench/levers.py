"""Which post-processing levers lift mAP@100 and GAP? One trained model per synthetic seed.

    .venv/bin/python bench/levers.py [--workdir /tmp/levers] [--seeds 0,1] [--steps 400]

For each seed: landmark-synth (difficulty 0.7, with its separate non-landmark set) ->
landmark-tfrecords (train) -> landmark-train (EfficientNet-B0, 64 px, --steps CPU steps, batch
32, 128-d CosFace; the demo's settings) -> landmark-export -> landmark-embed (train, index,
test, nonlandmark straight from the CSVs and JPEGs). Then, through the library
(`evaluation.evaluate`, what landmark-evaluate runs), the same embeddings are scored with every
lever: retrieval mAP@100 (Public / Private) for each --rerank method, and recognition GAP with
each non-landmark handling. The seeds' models train side by side (one core each): 400 steps
took 692 s wall on a shared 2-core CPU, the whole run ~20 min. Everything resumes: a rerun
reuses finished stages. The last stdout line is one JSON object. Results: bench/README.md.

Layout for other parts: `prepare(seed, ...)` and `train_and_embed(...)` are the shared pipeline,
`post_processing(...)` is this part; a training-levers part (bench/levers_train.py) can import
them and add its own rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

from landmark_tf.retrieval.evaluation import EvalConfig, evaluate

BIN = os.path.dirname(sys.executable)
RETRIEVAL = ("none", "aqe", "dba", "dba+aqe", "discriminative", "discriminative+aqe")
RECOGNITION = ("none", "penalty", "classifier", "both")
EMBED_SPLITS = ("train", "index", "test", "nonlandmark")


def run(name: str, *args: str, log_dir: str) -> dict:
    """Runs landmark-NAME with args; returns its closing JSON line; output kept in log_dir."""
    os.makedirs(log_dir, exist_ok=True)
    cmd = [os.path.join(BIN, f"landmark-{name}"), *args]
    print(f"$ landmark-{name} " + " ".join(args), file=sys.stderr)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    tag = f"{name}-{abs(hash(args)) % 10**8}"
    with open(os.path.join(log_dir, tag + ".log"), "w") as log:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"landmark-{name} failed (exit {done.returncode}); see {log.name}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(seed: int, root: str) -> dict:
    """Synthetic set + train TFRecords for one seed; returns paths."""
    p = {"data": f"{root}/gldv2", "records": f"{root}/tfrecords", "logs": f"{root}/logs"}
    run("synth", f"--output_dir={p['data']}", f"--seed={seed}", "--difficulty=0.7",
        "--noprogress", log_dir=p["logs"])  # fmt: skip
    run("tfrecords", f"--train_csv={p['data']}/train.csv",
        f"--clean_csv={p['data']}/train_clean.csv", f"--image_dir={p['data']}/train",
        f"--output_dir={p['records']}", "--val_fraction=0.1", "--num_shards=4",
        "--noprogress", log_dir=p["logs"])  # fmt: skip
    return p


def train_command(p: dict, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    """landmark-train arguments of the shared baseline (the demo's B0 settings)."""
    return [f"--data_dir={p['records']}", f"--workdir={p['run']}", "--backbone=efficientnet-b0",
            "--image_size=64", "--batch_size=32", "--head=cosface", "--embedding_dim=128",
            f"--train_steps={steps}", "--learning_rate=0.1", "--schedule=cosine",
            "--warmup_steps=20", "--seed=1", "--checkpoint_every=50", *extra]  # fmt: skip


def train_and_embed(paths: list[dict], steps: int, extra: tuple[str, ...] = ()) -> float:
    """Trains one model per seed side by side, exports and embeds; returns training seconds."""
    t0 = time.perf_counter()
    procs = []
    for p in paths:
        os.makedirs(p["logs"], exist_ok=True)
        tag = os.path.basename(os.path.dirname(p["run"]))
        log = open(os.path.join(p["logs"], f"train-{tag}.log"), "w")  # noqa: SIM115
        cmd = [os.path.join(BIN, "landmark-train"), *train_command(p, steps, extra)]
        print("$ landmark-train " + " ".join(cmd[1:]), file=sys.stderr)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=log, env=env), log))
    for proc, log in procs:
        if proc.wait() != 0:
            raise SystemExit(f"landmark-train failed; see {log.name}")
        log.close()
    seconds = time.perf_counter() - t0
    for p in paths:
        if not os.path.exists(f"{p['export']}/saved_model.pb"):  # a rerun reuses the export
            run("export", f"--workdir={p['run']}", f"--export_dir={p['export']}", "--overwrite",
                log_dir=p["logs"])  # fmt: skip
        for split in EMBED_SPLITS:
            out = f"{p['embeddings']}/{split}.npz"
            if not os.path.exists(out):
                run("embed", f"--model={p['export']}", f"--csv={p['data']}/{split}.csv",
                    f"--image_dir={p['data']}/{split}", f"--output={out}",
                    log_dir=p["logs"])  # fmt: skip
    return seconds


def known_landmark_solution(data: str) -> str:
    """The retrieval solution restricted to queries whose landmark has train images (the label
    step can only be right for those); written next to the dataset, returns its path."""
    with open(f"{data}/recognition_solution_v2.1.csv") as f:
        known = {r["id"] for r in csv.DictReader(f) if r["landmarks"]}
    with open(f"{data}/retrieval_solution_v2.1.csv") as f:
        lines = f.read().splitlines()
    path = f"{data}/retrieval_solution_train_landmarks.csv"
    with open(path, "w") as f:
        f.write("\n".join([lines[0]] + [x for x in lines[1:] if x.split(",")[0] in known]) + "\n")
    return path


def post_processing(p: dict) -> dict:
    """mAP@100 per --rerank method and GAP per non-landmark handling, on one seed's embeddings;
    the rows marked (train landmarks) score only queries whose landmark has train images."""
    e, data = p["embeddings"], p["data"]
    rows = {}
    subsets = (("", f"{data}/retrieval_solution_v2.1.csv"),
               (" (train landmarks)", known_landmark_solution(data)))  # fmt: skip
    for suffix, solution in subsets:
        for method in RETRIEVAL if not suffix else ("none", "discriminative"):
            r = evaluate(EvalConfig(queries=f"{e}/test.npz", index=f"{e}/index.npz",
                                    train=f"{e}/train.npz", rerank=method,
                                    solution=solution))  # fmt: skip
            rows[f"map@100 {method}{suffix}"] = {k: r[f"map@100{s}"] for k, s in
                                                 (("all", ""), ("public", "_public"),
                                                  ("private", "_private"))}  # fmt: skip
    for handling in RECOGNITION:
        extra = {} if handling == "none" else {"nonlandmark": f"{e}/nonlandmark.npz",
                                                "nonlandmark_method": handling}  # fmt: skip
        r = evaluate(EvalConfig(queries=f"{e}/test.npz", train=f"{e}/train.npz",
                                recognition_solution=f"{data}/recognition_solution_v2.1.csv",
                                **extra))  # fmt: skip
        row = {k: r[f"gap{s}"] for k, s in (("all", ""), ("public", "_public"),
                                           ("private", "_private"))}  # fmt: skip
        if handling != "none":
            row["lambda"] = r["nonlandmark_penalty_weight"]
            row["n"] = r["nonlandmark_penalty_neighbours"]
            row["g"] = r["nonlandmark_classifier_exponent"]
            row["val_gap"] = [r[f"nonlandmark_validation_gap{s}"] for s in ("_before", "")]
        rows[f"gap {handling}"] = row
    return rows


def print_table(results: dict[int, dict]) -> dict:
    """One line per lever: each seed's all/Public/Private, the mean gain over 'none' and the
    spread (max - min over seeds) of that gain."""
    seeds = sorted(results)
    summary = {}
    print(f"{'lever':<42}" + "".join(f"  seed {s}: all / Pub / Priv " for s in seeds)
          + "  mean gain  spread", file=sys.stderr)  # fmt: skip
    for name in results[seeds[0]]:
        base = "gap none" if name.startswith("gap") else "map@100 none"
        if name.endswith("(train landmarks)"):
            base = "map@100 none (train landmarks)"
        gains = [results[s][name]["all"] - results[s][base]["all"] for s in seeds]
        cells = "".join(f"  {results[s][name]['all']:.3f} / {results[s][name]['public']:.3f} / "
                        f"{results[s][name]['private']:.3f}    " for s in seeds)  # fmt: skip
        print(f"{name:<42}{cells}  {np.mean(gains):+.3f}     {np.ptp(gains):.3f}", file=sys.stderr)
        summary[name] = {"per_seed": {s: results[s][name] for s in seeds},
                         "mean_gain": round(float(np.mean(gains)), 4),
                         "spread": round(float(np.ptp(gains)), 4)}  # fmt: skip
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/levers")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    paths = []
    for seed in seeds:
        root = f"{args.workdir}/seed{seed}"
        p = prepare(seed, root)
        tag = f"b0_{args.steps}steps"  # one model per (seed, steps): reruns reuse it
        p.update(run=f"{root}/{tag}/run", export=f"{root}/{tag}/export",
                 embeddings=f"{root}/{tag}/embeddings")  # fmt: skip
        paths.append(p)
    t_train = train_and_embed(paths, args.steps)
    results = {seed: post_processing(p) for seed, p in zip(seeds, paths, strict=True)}
    summary = print_table(results)
    print(json.dumps({"steps": args.steps, "seeds": seeds, "train_seconds": round(t_train, 1),
                      "levers": summary}))  # fmt: skip


if __name__ == "__main__":
    main()
