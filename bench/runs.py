"""The runner the landmark-synth training benches share (levers, frozen_bn, architectures_train,
tag_pretraining): make a synthetic set, its TFRecords, train, embed, score, measure cleaning,
start from the cached pretrained backbone, keep results per row and print a table.

Every stage resumes: landmark-synth and landmark-tfrecords reuse finished output, a training
workdir resumes from its checkpoint, an embedding file already written is reused, and a row
whose results file exists is skipped by the benches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

from landmark_tf import preprocess
from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.curation import clean
from landmark_tf.data import convert
from landmark_tf.modeling import model
from landmark_tf.retrieval import evaluation
from landmark_tf.retrieval.embeddings import save_embeddings
from landmark_tf.synth import generator
from landmark_tf.synth import plan as synth_plan
from landmark_tf.training import train

# The benches' model: EfficientNet-B0 at 64 px, batch 32, a 128-d descriptor (the demo's B0).
SIZE, BATCH, DIM = 64, 32, 128
TRAIN_KEYS = ("batch_classes",)  # row settings that are TrainConfig fields, not ModelConfig
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_SCRIPT = os.path.join(REPO, "scripts", "pretrain_synthetic.sh")


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_json(path: str, default=None):
    return json.loads(read_text(path)) if os.path.exists(path) else default


def write_json(path: str, obj) -> None:
    """Written whole then renamed, so an interrupted bench never leaves half a results file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def synth(root: str, seed: int, **settings) -> synth_plan.SynthConfig:
    """landmark-synth into root/gldv2 (difficulty 0.7, the demo's set, unless `settings` say)."""
    cfg = synth_plan.SynthConfig(**{"difficulty": 0.7, **settings, "seed": seed})
    generator.generate(cfg, os.path.join(root, "gldv2"), progress=False)
    return cfg


def records(root: str, name: str, image_dir: str, **kw) -> str:
    """landmark-tfrecords into root/records/name (2 shards, no val split)."""
    out = os.path.join(root, "records", name)
    convert.convert_dataset(convert.ConvertConfig(image_dir=image_dir, output_dir=out,
                                                  num_shards=2, **kw), progress=False)
    return out


def train_records(root: str) -> str:
    """TFRecords of root/gldv2's full (noisy) train.csv."""
    gldv2 = os.path.join(root, "gldv2")
    return records(root, "train", os.path.join(gldv2, "train"),
                   train_csv=os.path.join(gldv2, "train.csv"))


def fit(data_dir: str, workdir: str, steps: int, seed: int, init_from: str = "",
        batch_size: int = BATCH, learning_rate: float = 0.1, warmup_steps: int = 20, **kw) -> dict:
    """landmark-train (B0, SIZE px, DIM-d, SGD cosine) in-process; kw: ModelConfig fields and
    TRAIN_KEYS. Returns the closing JSON dict."""
    train_kw = {k: kw.pop(k) for k in TRAIN_KEYS if k in kw}
    cfg = ModelConfig(backbone="efficientnet-b0", image_size=SIZE, embedding_dim=DIM, **kw)
    tcfg = TrainConfig(data_dir=data_dir, workdir=workdir, train_steps=steps,
                       batch_size=batch_size, learning_rate=learning_rate, schedule="cosine",
                       warmup_steps=warmup_steps, val_split="", checkpoint_every=steps,
                       seed=seed, init_from=init_from, **train_kw)
    return train.train(cfg, tcfg)


def embed(workdir: str, gldv2: str, split: str, ids: list[str], labels=None, out="") -> str:
    """Embeds gldv2/split's images `ids` with workdir's model into `out` (.npz); reuses `out`."""
    if os.path.exists(out):
        return out
    net, _ = model.restore_embedding_model(workdir)
    vecs = []
    for s in range(0, len(ids), 64):
        batch = [preprocess.resize_for_model(tf.io.decode_jpeg(tf.io.read_file(
            generator.image_path(gldv2, split, i))), SIZE) for i in ids[s:s + 64]]
        vecs.append(net(tf.stack(batch), training=False).numpy())
    save_embeddings(out + ".tmp.npz", ids, np.concatenate(vecs), labels)
    os.replace(out + ".tmp.npz", out)
    return out


def score(workdir: str, root: str, plan, tag: str, splits=("index", "test")) -> dict:
    """Embeds train (with labels) and `splits`, then test->index mAP@100 and test GAP (kNN over
    train). Returns {"map@100", "gap", "embeddings": {split: path}}."""
    gldv2, emb = os.path.join(root, "gldv2"), os.path.join(root, "emb", tag)
    paths = {s: embed(workdir, gldv2, s, [it.id for it in plan.split(s)],
                      out=os.path.join(emb, f"{s}.npz")) for s in splits}
    train_items = plan.split("train")
    paths["train"] = embed(workdir, gldv2, "train", [it.id for it in train_items],
                           [it.landmark_id for it in train_items], os.path.join(emb, "train.npz"))
    r = evaluation.evaluate(evaluation.EvalConfig(
        queries=paths["test"], index=paths["index"], train=paths["train"],
        solution=os.path.join(gldv2, "retrieval_solution_v2.1.csv"),
        recognition_solution=os.path.join(gldv2, "recognition_solution_v2.1.csv")))
    return {"map@100": r["map@100"], "gap": r["gap"], "embeddings": paths}


def clean_quality(root: str, plan, train_npz: str, quantile: float = 0.99,
                  name: str = "train_clean_levers.csv") -> tuple[str, dict]:
    """landmark-clean on `train_npz` into root/name; precision and recall of the images it
    drops against the plan's noise images (what train_noise.csv lists)."""
    gldv2 = os.path.join(root, "gldv2")
    out = os.path.join(root, name)
    summary = clean.clean(clean.CleanConfig(train_npz, os.path.join(gldv2, "train.csv"), out,
                                            os.path.join(root, name + ".report.csv"),
                                            auto_quantile=quantile))
    noise = {it.id for it in synth_plan.noise_items(plan)}
    kept = {i for line in read_text(out).splitlines()[1:] for i in line.split(",")[1].split()}
    dropped = {it.id for it in plan.split("train")} - kept
    tp = len(dropped & noise)
    # Dropped images that are no noise, and those of them on another scene than their class's
    # most common one (a landmark's other facets: a largest-group rule drops them too).
    items = {it.id: it for it in plan.split("train")}
    main_scene = {}
    for it in items.values():
        if it.id not in noise:
            main_scene.setdefault(it.landmark_id, []).append(it.scene)
    main_scene = {k: max(set(v), key=v.count) for k, v in main_scene.items()}
    true_dropped = [items[i] for i in dropped - noise]
    return out, {"true_dropped": len(true_dropped),
                 "true_dropped_other_facets": sum(it.scene != main_scene[it.landmark_id]
                                                  for it in true_dropped),
                 "noise_recall": tp / max(1, len(noise)),
                 "noise_precision": tp / max(1, len(dropped)),
                 "dropped": len(dropped), "noise": len(noise), "quantile": quantile,
                 "threshold": summary["threshold"], "classes_kept": summary["classes"]}


def pretrain(out: str, **env: str) -> str:
    """The pretrained start (scripts/pretrain_synthetic.sh OUT, cached there); returns the
    workdir to pass as init_from. env: PRETRAIN_* settings of the script."""
    path = os.environ.get("PATH", "")
    full_env = {**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "2",
                # the landmark-* commands of this interpreter, importing this checkout
                "PATH": os.path.dirname(sys.executable) + os.pathsep + path,
                "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH"))
                                              if p)}
    done = subprocess.run(["bash", PRETRAIN_SCRIPT, out], env=full_env, stdout=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{PRETRAIN_SCRIPT} failed (exit {done.returncode}); see {out}/logs")
    return json.loads(done.stdout.strip().splitlines()[-1])["init_from"]


def run_rows(path: str, seed: int, rows, run_row) -> dict:
    """Runs `run_row(row) -> dict` for each row not yet in the results file `path` (a JSON
    {seed: {row: result}}), saving after each and printing one JSON line per row."""
    results = read_json(path, {})
    done = results.setdefault(str(seed), {})
    for row in rows:
        if row in done:
            continue
        start = time.time()
        done[row] = {**run_row(row), "seconds": round(time.time() - start)}
        print(json.dumps({"seed": seed, "row": row, **done[row]}), flush=True)
        write_json(path, results)
    return results


def per_seed_table(results: dict, rows, keys=("map@100", "gap")) -> str:
    """Markdown: per row, each key's value per seed and its spread (max - min over seeds)."""
    head = " | ".join(f"{k} per seed | spread" for k in keys)
    lines = [f"| row | {head} |", "|---" * (1 + 2 * len(keys)) + "|"]
    for row in rows:
        got = [results[s][row] for s in sorted(results) if row in results[s]]
        if not got:
            continue
        cells = []
        for key in keys:
            v = [g[key] for g in got]
            cells += [" / ".join(f"{x:.3f}" for x in v), f"{max(v) - min(v):.3f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The CLI pipeline (landmark-* commands, exported SavedModels), for benches that score the
# exported model as a user would (superglobal_bench): per seed, landmark-synth (difficulty 0.7)
# -> landmark-tfrecords -> landmark-train (the demo's B0) side by side -> export -> embed.
BIN = os.path.dirname(sys.executable)
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
