"""Scale benchmark: peak RSS and wall time of the embed merge and landmark-evaluate vs N.

    .venv/bin/python bench/scale_bench.py                      # N = 100k, 400k, 1.6M + 760k index
    .venv/bin/python bench/scale_bench.py --sizes 100000 --index_size 0 --workdir /tmp/s

Every measured step runs in its own process under /usr/bin/time -v (peak RSS = its "Maximum
resident set size", faiss' own copy included); steps run one after another. Sets are synthetic,
landmark-like (knn_bench.make_data's model: scene + landmark + own direction, D = 512), written in
chunks. Reported: seconds, seconds per million rows (linear in N when constant), peak RSS in GB,
and peak RSS as a ratio of the raw float32 array (N x D x 4 bytes). Target (issue 12):
peak <= 1.3 x float32 bytes + 0.5 GB. The 760k index is written by plain np.savez (the old
format) to show such files stream too. Ends with the extrapolation to GLDv2 train at D = 1,536.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from landmark_tf.retrieval.embeddings import write_embeddings

GB = 1e9
GLDV2_TRAIN, GLDV2_INDEX, GLDV2_D = 4_132_914, 761_757, 1536
_BIN = os.path.dirname(sys.executable)


class Landmarks:
    """Rows drawn as in knn_bench.make_data, in chunks: `rows(n, seed)` -> (float32, labels)."""

    def __init__(self, d: int, landmarks: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.d = d
        self.scenes = _unit(rng.standard_normal((100, d), dtype=np.float32))
        self.scene_of = rng.integers(0, 100, landmarks)
        self.centres = _unit(rng.standard_normal((landmarks, d), dtype=np.float32))

    def labels(self, n: int, rng) -> np.ndarray:
        return rng.integers(0, len(self.centres), n).astype(np.int64)

    def rows(self, owner: np.ndarray, rng) -> np.ndarray:
        x = np.sqrt(0.3) * self.scenes[self.scene_of[owner]]
        x += np.sqrt(0.4) * self.centres[owner]
        x += np.sqrt(0.3) * _unit(rng.standard_normal((len(owner), self.d), dtype=np.float32))
        return _unit(x)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_set(path: str, gen: Landmarks, n: int, seed: int, prefix: str, old: bool = False):
    rng = np.random.default_rng(seed)
    ids = np.array([f"{prefix}{i:08d}" for i in range(n)])
    labels = gen.labels(n, rng)
    rows = (gen.rows(labels[s : s + 65536], rng) for s in range(0, n, 65536))
    if old:  # np.savez of whole arrays, as files written before the streaming writer
        np.savez(path, ids=ids, embeddings=np.concatenate(list(rows)), landmark_ids=labels)
    else:
        write_embeddings(path, ids, rows, n, gen.d, labels)


def write_parts(folder: str, gen: Landmarks, n: int, seed: int, chunk: int = 10_000) -> list:
    """Part files in landmark-embed's format (np.savez of one chunk each)."""
    from landmark_tf.serving import embed

    os.makedirs(folder, exist_ok=True)
    rng, names = np.random.default_rng(seed), []
    for k, s in enumerate(range(0, n, chunk)):
        m = min(chunk, n - s)
        lm = gen.labels(m, rng)
        x = gen.rows(lm, rng)
        names.append(embed._part_name(k))
        empty = np.array([], dtype=str)
        embed._write_npz(os.path.join(folder, names[-1]), {
            "ids": np.array([f"x{i:08d}" for i in range(s, s + m)]), "embeddings": x,
            "landmark_ids": lm, "skipped_ids": empty, "skipped_paths": empty,
            "skipped_reasons": empty,
        })  # fmt: skip
    return names


def measure(cmd: list[str]) -> dict:
    """Runs cmd under /usr/bin/time -v; {seconds, peak_gb, json (its last stdout line)}."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{p.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return {"seconds": seconds, "peak_gb": kb * 1024 / GB,
            "json": json.loads(lines[-1]) if lines else {}}  # fmt: skip


def row(what: str, n: int, d: int, r: dict, extra: str = "") -> dict:
    raw = n * d * 4 / GB
    target = 1.3 * raw + 0.5
    print(f"{what:<34} {n:>9,} {r['seconds']:>8.1f} {r['seconds'] / n * 1e6:>8.1f} "
          f"{r['peak_gb']:>7.2f} {r['peak_gb'] / raw:>6.2f}x {target:>7.2f} "
          f"{'ok' if r['peak_gb'] <= target else 'OVER':>4} {extra}", flush=True)  # fmt: skip
    return {"what": what, "n": n, "raw_gb": raw, **{k: r[k] for k in ("seconds", "peak_gb")}}


def evaluate_cmd(index: str, queries: str, index_type: str, rerank: str, nlist: int) -> list[str]:
    return [os.path.join(_BIN, "landmark-evaluate"), f"--index={index}", f"--queries={queries}",
            f"--index_type={index_type}", f"--rerank={rerank}", "--recall_sample=500",
            f"--nlist={nlist}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,400000,1600000")
    p.add_argument("--index_size", type=int, default=760_000, help="0: skip")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--dba_flat_max", type=int, default=0,
                   help="largest N for flat dba+aqe (an exact N^2 self-search)")
    p.add_argument("--dba_ivf_max", type=int, default=400_000)
    p.add_argument("--workdir", default="/tmp/scale_bench")
    p.add_argument("--nlist", type=int, default=1024,
                   help="IVF lists, fixed so that IVF cost stays linear in N (0: 4 sqrt(N))")
    a = p.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    gen = Landmarks(a.d, 100_000)
    queries = os.path.join(a.workdir, "queries.npz")
    write_set(queries, gen, a.queries, 99, "q")
    print(f"D={a.d}, {a.queries} queries, k=100, IVF nlist={a.nlist or '4 sqrt(N)'} nprobe=16; "
          "machine shared with other jobs (2 cores)")
    print(f"{'step':<34} {'N':>9} {'s':>8} {'s/1M':>8} {'peak GB':>7} {'ratio':>7} "
          f"{'target':>7} {'':>4}")  # fmt: skip
    results = []
    sets = [(int(n), False) for n in a.sizes.split(",") if n]
    if a.index_size:
        sets.append((a.index_size, True))
    for n, old in sorted(sets):
        path = os.path.join(a.workdir, f"x{n}.npz")
        if old:
            write_set(path, gen, n, n, "x", old=True)
        else:
            parts = os.path.join(a.workdir, f"x{n}.parts")
            names = write_parts(parts, gen, n, n)
            code = ("import sys; from landmark_tf.serving import embed; "
                    f"embed._merge({parts!r}, {names!r}, {path!r}, None, {a.d})")
            results.append(row("embed merge", n, a.d, measure([sys.executable, "-c", code])))
            shutil.rmtree(parts)
        label = "np.savez file" if old else "streamed file"
        for index_type in ("flat", "ivf"):
            for rerank in ("none", "dba+aqe"):
                limit = a.dba_flat_max if index_type == "flat" else a.dba_ivf_max
                if rerank != "none" and n > limit:
                    continue
                r = measure(evaluate_cmd(path, queries, index_type, rerank, a.nlist))
                j = r["json"]
                extra = f"{label} mAP@100={j.get('map@100')}"
                if index_type == "ivf":
                    extra += f" recall@100={j.get('ivf_recall@100')}"
                results.append(row(f"evaluate {index_type} {rerank}", n, a.d, r, extra))
        os.remove(path)
    extrapolate(results, a.d)


def extrapolate(results: list[dict], d: int) -> None:
    """Peak RSS = a + b * float32 bytes, fitted per step over N; applied to GLDv2 at D=1,536."""
    print("\nExtrapolation (least squares peak = a + b x float32 GB, seconds = c x N x D):")
    for what in dict.fromkeys(r["what"] for r in results):
        rs = [r for r in results if r["what"] == what]
        raw = np.array([r["raw_gb"] for r in rs])
        peak = np.array([r["peak_gb"] for r in rs])
        secs = np.array([r["seconds"] for r in rs])
        b, a = np.polyfit(raw, peak, 1) if len(rs) > 1 else (peak[0] / raw[0], 0.0)
        rate = float(np.sum(secs * raw) / np.sum(raw * raw))  # seconds per float32 GB
        for name, n in (("GLDv2 index", GLDV2_INDEX), ("GLDv2 train", GLDV2_TRAIN)):
            big = n * GLDV2_D * 4 / GB
            print(f"  {what:<26} {name} {n:,} x {GLDV2_D}: {big:5.1f} GB float32 -> peak "
                  f"~{a + b * big:5.1f} GB, ~{rate * big / 60:6.1f} min on these 2 shared cores"
                  f" (from {len(rs)} sizes)")  # fmt: skip


if __name__ == "__main__":
    main()
