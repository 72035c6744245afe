"""landmark-tfrecords throughput: the converter with 1 and 2 workers next to a bare loop.

  .venv/bin/python bench/tfrecords_bench.py [--images=3000 --max_side=512 --shard_size_mb=10]

Makes `--images` noisy 800x600 JPEGs (smooth colour fields plus noise, ~100 kB each, cached in
--work_dir), then times, one after the other in this process:
  bare     for each image: read the file, images.convert (decode, resize, re-encode) - the
           per-image work with nothing around it (no CSV, plan, records, shards, processes);
  1 worker convert_dataset(num_workers=1), the whole converter (CSV, plan, size estimate,
           shard writing, reports, dataset_info);
  2 workers the same with num_workers=2 (forked pool), checked byte-identical to 1 worker.
Targets: 2 workers >= 1.7x one worker; one worker within 10% of the bare loop.
With --rounds=R the three are run R times interleaved and the best time of each counts. CPU
seconds (this process, workers) are printed too: unlike wall time they hardly move with load
from other processes, show whether the converter does extra work, and give the speed-up two free
cores would allow (two_vs_one_if_cores_free: Amdahl with the parent's CPU as the serial part).
Prints a table and one JSON line. Other processes on the machine skew the ratios: the load
average before and after is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from landmark_tf import fileio
from landmark_tf.data import convert, gldv2, images


def _make_image(args: tuple[str, int, int, int]) -> None:
    path, width, height, seed = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    noisy = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(buf.getvalue())


def make_dataset(root: Path, n: int, width: int, height: int, landmarks: int) -> tuple[str, list]:
    """Images under root/img and root/train.csv; reused when a previous run made the same set."""
    stamp = root / f"stamp-{n}-{width}x{height}-{landmarks}"
    ids = [f"{i * 2654435761 % (1 << 32):08x}{i:06x}" for i in range(n)]
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        jobs = [(gldv2.image_path(str(root / "img"), image_id), width, height, i)
                for i, image_id in enumerate(ids)]
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pool.map(_make_image, jobs, chunksize=32)
        rows = [f"{image_id},http://x,{i % landmarks}" for i, image_id in enumerate(ids)]
        (root / "train.csv").write_text("id,url,landmark_id\n" + "\n".join(rows) + "\n")
        stamp.write_text("ok\n")
    return str(root / "train.csv"), ids


def bare_loop(image_dir: str, ids: list[str], max_side: int, quality: int) -> float:
    start = time.perf_counter()
    for image_id in ids:
        images.convert(fileio.read_bytes(gldv2.image_path(image_dir, image_id)), max_side, quality)
    return time.perf_counter() - start


def converter(cfg: convert.ConvertConfig) -> float:
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    start = time.perf_counter()
    summary = convert.convert_dataset(cfg, progress=False)
    seconds = time.perf_counter() - start
    assert summary["skipped"] == 0 and summary["shards_written"] == summary["shards"], summary
    return seconds


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU of this process, and of its reaped children (the forked workers)."""
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


def _shards(out: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("train-*.tfrec"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--max_side", type=int, default=512)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--shard_size_mb", type=float, default=10.0,
                   help="small, so the default set gives ~16 shards (estimated as in real runs)")
    p.add_argument("--work_dir", default="/tmp/tfrecords_bench")
    p.add_argument("--rounds", type=int, default=1, help="repeat; the best time of each counts")
    a = p.parse_args()
    root = Path(a.work_dir)
    train_csv, ids = make_dataset(root, a.images, a.width, a.height, landmarks=50)
    image_dir = str(root / "img")
    load_before = os.getloadavg()
    cfg = convert.ConvertConfig(image_dir=image_dir, output_dir="", train_csv=train_csv,
                                max_image_side=a.max_side, jpeg_quality=a.quality,
                                shard_size_mb=a.shard_size_mb)
    runs = {
        "bare": lambda: bare_loop(image_dir, ids, a.max_side, a.quality),
        "1 worker": lambda: converter(dataclasses.replace(
            cfg, output_dir=str(root / "out1"), num_workers=1)),
        "2 workers": lambda: converter(dataclasses.replace(
            cfg, output_dir=str(root / "out2"), num_workers=2)),
    }
    rounds = {k: [] for k in runs}
    cpu = {k: [] for k in runs}  # (this process, workers) CPU seconds
    for _ in range(a.rounds):  # interleaved, so a burst of load elsewhere hits all three
        for k, run in runs.items():
            before = _cpu_seconds()
            rounds[k].append(run())
            after = _cpu_seconds()
            cpu[k].append((after[0] - before[0], after[1] - before[1]))
    seconds = {k: min(v) for k, v in rounds.items()}
    parent2, workers2 = min(cpu["2 workers"], key=sum)
    identical = _shards(str(root / "out1")) == _shards(str(root / "out2"))
    rate = {k: a.images / v for k, v in seconds.items()}
    result = {
        "images": a.images, "size": f"{a.width}x{a.height}", "max_side": a.max_side,
        "shards": len(_shards(str(root / "out1"))),
        "images_per_second": {k: round(v, 1) for k, v in rate.items()},
        "two_vs_one_worker": round(rate["2 workers"] / rate["1 worker"], 2),
        "one_worker_vs_bare": round(rate["1 worker"] / rate["bare"], 3),
        "byte_identical": identical,
        "seconds_per_round": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
        "cpu_seconds_self_workers": {k: [[round(x, 2) for x in r] for r in v]
                                     for k, v in cpu.items()},
        # What 2 free cores would give: all CPU of 1 worker over (serial parent + half the workers)
        "two_vs_one_if_cores_free": round(min(map(sum, cpu["1 worker"])) /
                                          (parent2 + workers2 / 2), 2),
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }
    for k, v in rate.items():
        print(f"{k:>10}: {v:7.1f} images/s  ({seconds[k]:.1f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
