"""landmark-tfrecords --runner beam (DirectRunner, 2 processes) next to --runner local (2 workers).

  .venv/bin/python bench/beam_bench.py [--images=1200 --small=300 --max_side=512 --rounds=2]
  .venv/bin/python bench/beam_bench.py --plan_rows=4132914   # also time GLDv2-size planning

Uses bench/tfrecords_bench.py's noisy 800x600 JPEGs (~100 kB, cached in --work_dir). Measures:
  bare       CPU seconds (process time) of the per-image work alone: read, images.convert,
             tf.train.Example - what every runner pays per image;
  local      `landmark-tfrecords --runner=local --num_workers=2`, a fresh process per run;
  beam       `landmark-tfrecords --runner=beam --beam_runner=DirectRunner --num_workers=2`
             (direct_num_workers=2, direct_running_mode=multi_processing);
each on the first --small and on all --images images, with both the conversion time the run
reports and the CPU seconds of the whole process tree (getrusage of the waited children: the
Beam SDK worker processes included). The differences between the two sizes give the per-image
marginal cost, free of start-up (TensorFlow imports, Beam's worker processes); CPU seconds are
also far less skewed than wall time by other jobs on a shared machine. The two runners' outputs
are checked byte-identical. Beam's marginal CPU per image predicts a Dataflow job:
images/s ~= workers x vCPUs / cpu_per_image (printed for --predict_vcpus).
Rounds are interleaved and the best of each counts; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import tfrecords_bench  # bench/ is sys.path[0] when this file runs as a script

from landmark_tf.data import beam_convert, gldv2, output_dir, planning, records, shards

GLDV2_TRAIN_IMAGES = 4_132_914  # train.csv rows of GLDv2
GLDV2_LANDMARKS = 203_094


def cpu_per_image(image_dir: str, ids: list[str], max_side: int, quality: int) -> float:
    """CPU seconds per image of shards.serialize alone, in this process."""
    options = shards.ImageOptions(max_side, quality)
    start = time.process_time()
    for image_id in ids:
        shards.serialize(gldv2.Example(image_id, 0, 0, True), image_dir, options)
    return (time.process_time() - start) / len(ids)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(runner: str, csv: str, image_dir: str, out: Path, a) -> dict:
    """One conversion in a fresh process; its closing JSON plus wall and CPU seconds."""
    args = [f"--train_csv={csv}", f"--image_dir={image_dir}", f"--output_dir={out}",
            f"--max_image_side={a.max_side}", f"--jpeg_quality={a.quality}",
            f"--num_shards={a.num_shards}", "--num_workers=2", f"--runner={runner}",
            "--overwrite", "--noprogress"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cpu, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "landmark_tf.cli.tfrecords", *args], env=env,
                          capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"{runner} run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["skipped"] == 0 and summary["shards_written"] == summary["shards"], summary
    return {**summary, "wall": wall, "cpu": cpu}


def outputs(out: Path) -> dict[str, bytes]:
    """Shards, dataset_info.json, label_map.csv and the per-shard reports."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def time_planning(root: Path, rows: int) -> dict:
    """Launcher-side work of a GLDv2-size run: read + plan + assign shards + write the plan."""
    csv = root / f"plan-{rows}.csv"
    if not csv.exists():
        lines = (f"{i * 2654435761 % (1 << 32):08x}{i:07x},http://x,{i % GLDV2_LANDMARKS}\n"
                 for i in range(rows))
        csv.write_text("id,url,landmark_id\n" + "".join(lines))
    start, cpu = time.perf_counter(), time.process_time()
    plan = planning.build_plan(train_csv=str(csv), min_images_per_class=1, val_fraction=0.05,
                            seed=0)
    planned = time.perf_counter()
    n = output_dir.shard_counts({k: len(v) for k, v in plan.splits.items()}, 0, 150.0, 120_000)
    tasks = [shards.ShardTask(f"{split}-{i}", "", ex, "", None) for split in plan.splits
             for i, ex in enumerate(planning.assign_shards(plan.splits[split], n[split], 0, split))]
    beam_convert.write_plan(str(root / "plan.jsonl"), tasks)
    done, cpu = time.perf_counter(), time.process_time() - cpu
    return {"rows": rows, "plan_seconds": round(planned - start, 1),
            "assign_and_plan_file_seconds": round(done - planned, 1),
            "cpu_seconds": round(cpu, 1),
            "plan_file_mb": round((root / "plan.jsonl").stat().st_size / 1e6),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--small", type=int, default=300)
    p.add_argument("--max_side", type=int, default=512)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--num_shards", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="repeat; the best of each counts")
    p.add_argument("--cpu_sample", type=int, default=200)
    p.add_argument("--predict_vcpus", type=int, default=100, help="Dataflow vCPUs to predict")
    p.add_argument("--plan_rows", type=int, default=0, help="also time planning of this many")
    p.add_argument("--work_dir", default="/tmp/beam_bench")
    a = p.parse_args()
    root = Path(a.work_dir)
    _, ids = tfrecords_bench.make_dataset(root, a.images, 800, 600, landmarks=50)
    image_dir, rows = str(root / "img"), (root / "train.csv").read_text().splitlines()
    csvs = {}
    for n in (a.small, a.images):
        csvs[n] = root / f"train-{n}.csv"
        csvs[n].write_text("\n".join(rows[: n + 1]) + "\n")
    load_before = os.getloadavg()
    bare = cpu_per_image(image_dir, ids[: a.cpu_sample], a.max_side, a.quality)
    runs: dict = {(r, n): [] for n in csvs for r in ("local", "beam")}
    identical = True
    for _ in range(a.rounds):  # interleaved, so a burst of load elsewhere hits both runners
        for n, csv in csvs.items():
            for runner in ("local", "beam"):
                out = root / f"out-{runner}-{n}"
                runs[runner, n].append(run_cli(runner, str(csv), image_dir, out, a))
            identical &= outputs(root / f"out-local-{n}") == outputs(root / f"out-beam-{n}")
    result = summarise(a, bare, runs, identical, root)
    result["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    if a.plan_rows:
        result["planning"] = time_planning(root, a.plan_rows)
    for runner in ("local", "beam"):
        r = result[runner]
        print(f"{runner:>6}: {r['images_per_second']:6.1f} images/s over {a.images} images, "
              f"marginal {r['marginal_images_per_second']:6.1f} images/s and "
              f"{r['marginal_cpu_ms_per_image']:5.1f} CPU ms/image, fixed {r['fixed_seconds']} s "
              f"and {r['fixed_cpu_seconds']} CPU s")
    print(json.dumps(result))


def _runner_figures(a, runs: dict, runner: str) -> dict:
    best = {n: min(runs[runner, n], key=lambda s: s["seconds"]) for n in (a.small, a.images)}
    cpu = {n: min(s["cpu"] for s in runs[runner, n]) for n in (a.small, a.images)}
    extra = a.images - a.small
    marginal = extra / (best[a.images]["seconds"] - best[a.small]["seconds"])
    cpu_per_image = (cpu[a.images] - cpu[a.small]) / extra
    return {
        "seconds": best[a.images]["seconds"],
        "images_per_second": round(a.images / best[a.images]["seconds"], 1),
        "marginal_images_per_second": round(marginal, 1),
        "fixed_seconds": round(best[a.images]["seconds"] - a.images / marginal, 1),
        "cpu_seconds": round(cpu[a.images], 1),
        "marginal_cpu_ms_per_image": round(1000 * cpu_per_image, 1),
        "fixed_cpu_seconds": round(cpu[a.images] - a.images * cpu_per_image, 1),
        "seconds_per_round": {n: [round(s["seconds"], 1) for s in runs[runner, n]]
                              for n in (a.small, a.images)},
    }


def summarise(a, bare: float, runs: dict, identical: bool, root: Path) -> dict:
    result = {"images": a.images, "small": a.small, "size": "800x600", "max_side": a.max_side,
              "bare_cpu_ms_per_image": round(1000 * bare, 1), "byte_identical": identical,
              "cpus": os.cpu_count(), "rounds": a.rounds}
    for runner in ("local", "beam"):
        result[runner] = _runner_figures(a, runs, runner)
    local, beam = result["local"], result["beam"]
    info = json.loads((root / f"out-beam-{a.images}" / records.DATASET_INFO).read_text())
    written = sum(s["bytes"] for s in _reports(root / f"out-beam-{a.images}"))
    cpu_per_image = beam["marginal_cpu_ms_per_image"] / 1000
    rate = a.predict_vcpus / cpu_per_image
    result.update({
        "beam_vs_local_wall": round(beam["images_per_second"] / local["images_per_second"], 2),
        "beam_vs_local_marginal_wall": round(beam["marginal_images_per_second"]
                                             / local["marginal_images_per_second"], 2),
        "beam_vs_local_cpu_per_image": round(beam["marginal_cpu_ms_per_image"]
                                             / local["marginal_cpu_ms_per_image"], 2),
        "bytes_per_example": round(written / info["splits"]["train"]["examples"]),
        "predicted": {"vcpus": a.predict_vcpus, "images_per_second": round(rate),
                      "gldv2_train_vcpu_hours": round(GLDV2_TRAIN_IMAGES * cpu_per_image / 3600),
                      "gldv2_train_hours": round(GLDV2_TRAIN_IMAGES / rate / 3600, 2)},
    })
    return result


def _reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / output_dir.STATE_DIR).glob("*.tfrec.json")]


if __name__ == "__main__":
    main()
