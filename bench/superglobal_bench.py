"""SuperGlobal re-ranking (and pooling) against none / aqe / dba / discriminative, same embeddings.

    PYTHONPATH=$PWD .venv/bin/python bench/superglobal_bench.py synthetic [--seeds 0,1]
    PYTHONPATH=$PWD .venv/bin/python bench/superglobal_bench.py scale [--n 1000000]

synthetic: bench/runs.py's CLI pipeline (landmark-synth difficulty 0.7 -> tfrecords -> B0 at 64 px,
--steps CPU steps -> export -> embed; one model per seed, reused by reruns), then each
--rerank method is scored by `python -m landmark_tf.cli.evaluate` in its own process under
/usr/bin/time -v: mAP@100 (all / Public / Private), wall seconds and peak RSS. The same model is
also exported with --inference_pooling=superglobal and its index/test re-embedded (pooling row).
scale: bench/scale_bench.py's landmark-like set (D = 512, 100k landmarks) at --n index rows and
--queries queries, flat index, each method timed the same way (dba: exact N^2 self-search, left
out above --dba_max).
The last stdout line is one JSON object. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import runs
import scale_bench

GB = 1e9
SYNTHETIC = ("none", "aqe", "dba", "dba+aqe", "discriminative", "superglobal", "superglobal+aqe",
             "superglobal+dba", "discriminative+superglobal")
SCALE = ("none", "aqe", "superglobal", "superglobal+aqe", "dba", "superglobal+dba")


def evaluate(args: list[str]) -> dict:
    """`python -m landmark_tf.cli.evaluate ARGS` under /usr/bin/time -v: closing JSON plus
    seconds and peak_gb (its maximum resident set)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "landmark_tf.cli.evaluate", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "seconds": round(seconds, 1),
            "peak_gb": round(kb * 1024 / GB, 3)}


def synthetic(a) -> dict:
    seeds = [int(s) for s in a.seeds.split(",")]
    paths = []
    for seed in seeds:
        root = f"{a.workdir}/seed{seed}"
        p = runs.prepare(seed, root)
        tag = f"b0_{a.steps}steps"
        p.update(run=f"{root}/{tag}/run", export=f"{root}/{tag}/export",
                 embeddings=f"{root}/{tag}/embeddings")  # fmt: skip
        paths.append(p)
    runs.train_and_embed(paths, a.steps)
    out = {}
    for seed, p in zip(seeds, paths, strict=True):
        e, data = p["embeddings"], p["data"]
        common = [f"--queries={e}/test.npz", f"--index={e}/index.npz",
                  f"--solution={data}/retrieval_solution_v2.1.csv"]
        train = [f"--train={e}/train.npz"]  # only where used: it adds recognition otherwise
        rows = {m: evaluate([*common, f"--rerank={m}", *(train if "discrim" in m else [])])
                for m in SYNTHETIC}
        sg = _superglobal_pooling_embeddings(p)
        rows["superglobal pooling, none"] = evaluate(
            [f"--queries={sg}/test.npz", f"--index={sg}/index.npz",
             f"--solution={data}/retrieval_solution_v2.1.csv"])
        rows["superglobal pooling, superglobal"] = evaluate(
            [f"--queries={sg}/test.npz", f"--index={sg}/index.npz", "--rerank=superglobal",
             f"--solution={data}/retrieval_solution_v2.1.csv"])
        out[seed] = rows
    _table(out)
    return out


def _superglobal_pooling_embeddings(p: dict) -> str:
    """The seed's model exported with --inference_pooling=superglobal; index/test embedded."""
    export, folder = p["export"] + "_superglobal", p["embeddings"] + "_superglobal"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if not os.path.exists(f"{export}/metadata.json"):
        subprocess.run([sys.executable, "-m", "landmark_tf.cli.export", f"--workdir={p['run']}",
                        f"--export_dir={export}", "--inference_pooling=superglobal",
                        "--overwrite"], check=True, capture_output=True, env=env)  # fmt: skip
    for split in ("index", "test"):
        if not os.path.exists(f"{folder}/{split}.npz"):
            subprocess.run([sys.executable, "-m", "landmark_tf.cli.embed", f"--model={export}",
                            f"--csv={p['data']}/{split}.csv", f"--image_dir={p['data']}/{split}",
                            f"--output={folder}/{split}.npz"], check=True, capture_output=True,
                           env=env)  # fmt: skip
    return folder


def _table(out: dict) -> None:
    seeds = sorted(out)
    print(f"{'method':<34}" + "".join(f" seed {s}: all/Pub/Priv   s   GB " for s in seeds)
          + "  mean gain", file=sys.stderr)  # fmt: skip
    for name in out[seeds[0]]:
        cells, gains = "", []
        for s in seeds:
            r, base = out[s][name], out[s]["none"]
            cells += (f"  {r['map@100']:.3f}/{r.get('map@100_public', 0):.3f}/"
                      f"{r.get('map@100_private', 0):.3f} {r['seconds']:5.1f} {r['peak_gb']:.2f}")
            gains.append(r["map@100"] - base["map@100"])
        print(f"{name:<34}{cells}  {np.mean(gains):+.3f}", file=sys.stderr)


def scale(a) -> dict:
    os.makedirs(a.workdir, exist_ok=True)
    gen = scale_bench.Landmarks(512, 100_000)
    queries, index = f"{a.workdir}/queries.npz", f"{a.workdir}/index{a.n}.npz"
    if not os.path.exists(queries):
        scale_bench.write_set(queries, gen, a.queries, 99, "q")
    if not os.path.exists(index):
        scale_bench.write_set(index, gen, a.n, a.n, "x")
    rows = {}
    for method in (a.methods.split(",") if a.methods else SCALE):
        if "dba" in method and a.n > a.dba_max:
            continue
        r = evaluate([f"--index={index}", f"--queries={queries}", f"--rerank={method}"])
        rows[method] = {k: r.get(k) for k in ("map@100", "seconds", "peak_gb", "rerank_seconds",
                                              "search_queries_per_second")}
        print(f"{method:<22} n={a.n:,} q={a.queries:,} mAP@100={r['map@100']:.4f} "
              f"{r['seconds']:7.1f} s peak {r['peak_gb']:.2f} GB", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=("synthetic", "scale"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dba_max", type=int, default=100_000)
    ap.add_argument("--methods", default="", help="scale: comma list (default: all)")
    a = ap.parse_args()
    a.workdir = a.workdir or f"/tmp/superglobal_bench_{a.set}"
    result = synthetic(a) if a.set == "synthetic" else scale(a)
    print(json.dumps({"set": a.set, "results": result}))


if __name__ == "__main__":
    main()
