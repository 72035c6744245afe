"""The output folder of a conversion: what makes a rerun resume, and what is written last.

`prepare` checks the folder against the settings and input (a manifest from another conversion
is an error unless overwrite) and fixes the shard counts in the manifest before the first shard;
`finished_shards` lists the shards a rerun keeps; `dataset_info` and `write_label_map` write the
files that mark the conversion complete.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.data import provenance, records
from landmark_tf.data.planning import ConversionPlan
from landmark_tf.data.shards import ImageOptions, check_shard, record_size
from landmark_tf.data.tags import TAG_VOCAB
from landmark_tf.data.workers import Workers
from landmark_tf.errors import UserError

if TYPE_CHECKING:
    from landmark_tf.data.convert import ConvertConfig

STATE_DIR = ".landmark-tfrecords"
MANIFEST = "manifest.json"
ESTIMATE_SAMPLE = 64  # images converted to estimate bytes per example
MB = 10**6


def shard_counts(
    split_sizes: dict[str, int], num_shards: int, shard_size_mb: float, example_bytes: float
) -> dict[str, int]:
    """Shards per split. With `num_shards` > 0 the largest split gets that many and the others
    proportionally many; otherwise ceil(examples * example_bytes / shard size). Always at least
    one shard and never more shards than examples."""
    largest = max(split_sizes.values())
    out = {}
    for split, n in split_sizes.items():
        if num_shards > 0:
            want = round(num_shards * n / largest)
        else:
            want = math.ceil(n * example_bytes / (shard_size_mb * MB))
        out[split] = max(1, min(n, want))
    return out


def estimate_example_bytes(plan: ConversionPlan, cfg: ConvertConfig, workers: Workers) -> float:
    """Mean bytes per written record over a seeded sample of converted images (0 if none of the
    sample converts). Deterministic, so a rerun or another worker count picks the same counts."""
    everything = [ex for split in sorted(plan.splits) for ex in plan.splits[split]]
    sample = random.Random(f"{cfg.seed}:estimate").sample(
        everything, min(ESTIMATE_SAMPLE, len(everything))
    )
    options = ImageOptions(cfg.max_image_side, cfg.jpeg_quality)
    sizes = workers.map(record_size, [(ex, cfg.image_dir, options) for ex in sample])
    sizes = [s for s in sizes if s]
    return sum(sizes) / len(sizes) if sizes else 0.0


def prepare(cfg: ConvertConfig, source: dict, plan: ConversionPlan, workers: Workers) -> dict:
    """Checks the output folder against `source`; writes the manifest on a fresh start."""
    out, state = cfg.output_dir, fileio.join(cfg.output_dir, STATE_DIR)
    manifest_path = fileio.join(state, MANIFEST)
    check_folder(out)
    if cfg.overwrite:
        _clear(out, state)
    if fileio.exists(manifest_path):
        fileio.remove_temporaries(out)
        fileio.remove_temporaries(state)
        manifest = fileio.read_json(manifest_path)
        if not isinstance(manifest, dict) or "source" not in manifest:
            raise UserError(f"{manifest_path}: not a landmark-tfrecords manifest; use another "
                            "--output_dir, or --overwrite to replace it")
        _check_same_source(out, manifest["source"], source)
        return manifest
    if tf.io.gfile.isdir(out):
        _check_no_foreign_output(out)  # before anything is written: a refusal leaves no trace
        fileio.remove_temporaries(out)
    fileio.makedirs(state)
    sizes = {split: len(examples) for split, examples in plan.splits.items()}
    example_bytes = 0.0 if cfg.num_shards else estimate_example_bytes(plan, cfg, workers)
    manifest = {
        "source": source,
        "example_bytes_estimate": round(example_bytes, 1),
        "num_shards": shard_counts(sizes, cfg.num_shards, cfg.shard_size_mb, example_bytes),
    }
    fileio.write_json_atomic(manifest_path, manifest)
    return manifest


def check_folder(out: str) -> None:
    """UserError when --output_dir names a file, or a path through one."""
    with fileio.writing(out):
        if fileio.exists(out) and not tf.io.gfile.isdir(out):
            raise UserError(f"--output_dir {out}: is a file, expected a folder")


# Manifest keys that are not flags of landmark-tfrecords, as the refusal names them.
_NOT_FLAGS = {"plan_sha256": "the CSV rows", "pillow_version": "the Pillow version"}


def _check_same_source(out: str, old: dict, new: dict) -> None:
    diff = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            name = _NOT_FLAGS.get(k, f"--{k}")
            diff.append(name if k == "plan_sha256" else f"{name} {old.get(k)!r} -> {new.get(k)!r}")
    if diff:
        raise UserError(
            f"--output_dir {out} holds a conversion with other settings or input "
            f"({'; '.join(diff)}); use another --output_dir, or --overwrite to replace it"
        )


def _check_no_foreign_output(out: str) -> None:
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(out)]
    ours = [n for n in names if records.parse_shard_name(n) or n == records.DATASET_INFO]
    if ours:
        raise UserError(
            f"{out} already holds {ours[0]} but no {STATE_DIR}/{MANIFEST}, so it cannot be resumed "
            "safely; use another --output_dir, or --overwrite to replace it"
        )


def _clear(out: str, state: str) -> None:
    """Deletes what a conversion writes (shards, info, label map, state) and nothing else."""
    if not tf.io.gfile.isdir(out):
        return
    for name in tf.io.gfile.listdir(out):
        name = name.rstrip("/")
        if records.parse_shard_name(name) or name in (records.DATASET_INFO, records.LABEL_MAP,
                                                      TAG_VOCAB):
            tf.io.gfile.remove(fileio.join(out, name))
    if tf.io.gfile.isdir(state):
        tf.io.gfile.rmtree(state)
    fileio.remove_temporaries(out)


def finished_shards(out: str) -> tuple[set[str], dict[str, str]]:
    """(names of complete shards, {name: why not} for shards to rewrite).

    A shard is complete when its final name exists (its report is written before the rename;
    one listing each instead of an existence check per shard, which is slow on GCS) and the file
    still matches its report: byte count, and the CRC of its last bytes (`shards.check_shard`),
    so a shard cut short or overwritten since is written again instead of kept.
    """
    state = fileio.join(out, STATE_DIR)
    shards = {n.rstrip("/") for n in tf.io.gfile.listdir(out)}
    reports = {n[: -len(".json")] for n in tf.io.gfile.listdir(state) if n.endswith(".json")}
    good, bad = set(), {}
    for name in sorted(shards & reports):
        if not records.parse_shard_name(name):
            continue
        try:
            report = fileio.read_json(fileio.join(state, f"{name}.json"))
            problem = check_shard(fileio.join(out, name), report)
        except UserError as e:
            problem = f"its report is unreadable ({e})"
        if problem:
            bad[name] = problem
        else:
            good.add(name)
    return good, bad


def dataset_info(plan: ConversionPlan, source: dict, reports: list[dict]) -> dict:
    num_classes = len(plan.label_map)
    splits: dict[str, dict] = {}
    skipped = list(plan.skipped)  # left out by the plan (excluded landmarks), then per shard
    for report in reports:
        split = records.parse_shard_name(report["shard"])[0]
        entry = splits.setdefault(split, {"examples": 0, "shards": [],
                                          "class_counts": [0] * num_classes})
        entry["examples"] += report["examples"]
        entry["shards"].append(report["shard"])
        if "untagged" in report:
            entry["untagged_examples"] = entry.get("untagged_examples", 0) + report["untagged"]
            entry["max_tags"] = max(entry.get("max_tags", 0), report["max_tags"])
        if num_classes:
            for label, count in report["label_counts"].items():
                entry["class_counts"][int(label)] += count
            # Reports of shards written before this count existed lack it: then the split
            # has no not_clean_class_counts (training refuses a not_clean_weight that needs it).
            if "not_clean_label_counts" not in report:
                entry["incomplete"] = True
            elif not entry.get("incomplete"):
                nc = entry.setdefault("not_clean_class_counts", [0] * num_classes)
                for label, count in report["not_clean_label_counts"].items():
                    nc[int(label)] += count
        skipped.extend(report["skipped"])
    for entry in splits.values():
        if entry.pop("incomplete", False):
            entry.pop("not_clean_class_counts", None)
    train = splits.get("train", {"class_counts": []})
    return {
        "format_version": 1,
        "num_classes": num_classes,
        "class_counts": train["class_counts"],
        "splits": splits,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "source": {**source, **plan.stats},
        provenance.KEY: plan.training_list,
    }


def write_label_map(out: str, plan: ConversionPlan, train_counts: list[int]) -> None:
    lines = ["label,landmark_id,count"]
    for landmark, label in sorted(plan.label_map.items(), key=lambda kv: kv[1]):
        lines.append(f"{label},{landmark},{train_counts[label]}")
    fileio.write_text_atomic(fileio.join(out, records.LABEL_MAP), "\n".join(lines) + "\n")
