"""GLDv2 CSV + image tree -> sharded TFRecords, dataset_info.json and label_map.csv.

Order of work, so that bad input fails before anything is written and a rerun resumes:
  1. fork the worker processes (before any file is opened; see workers.py);
  2. read and validate the CSVs, build the plan (filter, relabel, split) - pure, seeded;
  3. check the output folder (output_dir.py): a manifest from a run with other settings is an error
     (unless overwrite); the shard counts are fixed in the manifest before the first shard,
     estimated from a seeded sample of converted images when --num_shards is not given;
  4. write the shards that do not exist yet under their final name (temporary name, then
     rename), each with a JSON report in the state folder;
  5. from all reports, write label_map.csv and dataset_info.json (the "complete" marker).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import PIL
from tqdm import tqdm

from landmark_tf import fileio
from landmark_tf.data import images, output_dir, planning, records, tags
from landmark_tf.data.planning import ConversionPlan
from landmark_tf.data.shards import ImageOptions, ShardTask, write_shard
from landmark_tf.data.workers import Workers
from landmark_tf.errors import UserError

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Settings of one conversion. Exactly one of `train_csv` (labelled: filter, relabel, split
    into train/val) and `csv` (one split named `split`, label -1) is set."""

    image_dir: str
    output_dir: str
    train_csv: str = ""
    csv: str = ""
    split: str = ""
    clean_csv: str = ""
    exclude_landmarks: str = ""
    min_images_per_class: int = 1
    val_fraction: float = 0.0
    seed: int = 0
    max_image_side: int = images.DEFAULT_MAX_SIDE
    jpeg_quality: int = images.DEFAULT_QUALITY
    shard_size_mb: float = 150.0
    num_shards: int = 0
    num_workers: int = 1
    overwrite: bool = False
    # Title keywords as per-image tags (data/tags.py): GLDv2's train_attribution.csv, and the
    # document-frequency window of a kept keyword: in >= tag_min_df titles and in at most a
    # tag_max_df share of them (WeChat's WT-Set drops the most and least common words).
    attribution_csv: str = ""
    tag_min_df: int = 3
    tag_max_df: float = 0.5

    def source(self) -> dict[str, Any]:
        """The settings that define the output (not num_workers/overwrite), plus Pillow's version
        because it defines the JPEG bytes."""
        out = dataclasses.asdict(self)
        for key in ("output_dir", "num_workers", "overwrite"):
            out.pop(key)
        if not self.attribution_csv:  # a conversion without tags keeps its older manifest
            for key in ("attribution_csv", "tag_min_df", "tag_max_df"):
                out.pop(key)
        out["pillow_version"] = PIL.__version__
        return out

    def validate(self) -> None:
        """Raises UserError naming the flag for settings that cannot work together."""
        checks = [
            (bool(self.train_csv) != bool(self.csv), "give exactly one of --train_csv and --csv"),
            (bool(self.image_dir), "--image_dir is required"),
            (bool(self.output_dir), "--output_dir is required"),
            (self.min_images_per_class >= 1, "--min_images_per_class must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "--val_fraction must be in [0, 1)"),
            (self.max_image_side >= 0, "--max_image_side must be >= 0 (0 keeps the size)"),
            (1 <= self.jpeg_quality <= 100, "--jpeg_quality must be in 1..100"),
            (self.shard_size_mb > 0, "--shard_size_mb must be > 0"),
            (self.num_shards >= 0, "--num_shards must be >= 0 (0: from --shard_size_mb)"),
            (self.num_workers >= 1, "--num_workers must be >= 1"),
            (self.tag_min_df >= 1, "--tag_min_df must be >= 1"),
            (0 < self.tag_max_df <= 1, "--tag_max_df must be in (0, 1]"),
        ]
        if self.csv:
            checks += [
                (bool(_SPLIT_RE.match(self.split)), "--split must be a name like index or test"),
                (self.split not in ("train", "val"), "--split train/val come from --train_csv"),
                (not self.clean_csv, "--clean_csv only applies to --train_csv"),
                (self.val_fraction == 0, "--val_fraction only applies to --train_csv"),
                (self.min_images_per_class == 1, "--min_images_per_class needs --train_csv"),
            ]
        elif self.split:
            checks.append((False, "--split only applies to --csv (--train_csv writes train/val)"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def convert_dataset(
    cfg: ConvertConfig,
    progress: bool = True,
    write_shards: Callable[[list[ShardTask]], Any] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes, or confirms) a conversion; returns the summary dict the CLI prints.

    `write_shards`, when given, writes the unfinished shards instead of the local process pool
    (beam_convert passes its pipeline here); it must leave each task's shard and report exactly
    as shards.write_shard does. Everything else (plan, manifest, resume, dataset_info) is shared.

    Raises UserError for bad CSVs, bad settings or an output folder holding another conversion.
    """
    start = time.perf_counter()
    cfg.validate()
    output_dir.check_folder(cfg.output_dir)  # before the plan, which takes a while at full size
    with Workers(cfg.num_workers) as workers:
        plan = planning.build_plan(
            train_csv=cfg.train_csv, csv=cfg.csv, split=cfg.split, clean_csv=cfg.clean_csv,
            exclude_landmarks=cfg.exclude_landmarks,
            min_images_per_class=cfg.min_images_per_class, val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )
        vocab = _attach_tags(cfg, plan) if cfg.attribution_csv else None
        source = {**cfg.source(), "plan_sha256": plan.digest()}
        excluded = (plan.training_list or {}).get("exclude_landmarks")
        if excluded:  # the list's content, not only its path, defines the output
            source["exclude_landmarks_sha256"] = excluded["sha256"]
        manifest = output_dir.prepare(cfg, source, plan, workers)
        tasks = _tasks(cfg, plan, manifest["num_shards"])
        finished, damaged = output_dir.finished_shards(cfg.output_dir)
        for name, problem in damaged.items():
            print(f"landmark-tfrecords: warning: rewriting {name}: {problem}", file=sys.stderr)
        todo = [t for t in tasks if os.path.basename(t.path) not in finished]
        info_path = fileio.join(cfg.output_dir, records.DATASET_INFO)
        if not todo and fileio.exists(info_path):
            summary = _summary(cfg, fileio.read_json(info_path), start, 0, 0, resumed=len(tasks))
            return {**summary, "shards_damaged": []}
        planned = sum(len(t.examples) for t in todo)
        if write_shards is not None:
            write_shards(todo)
            written = []  # the hook leaves the reports in the state folder
        else:
            written = _write_local(workers, todo, planned, progress)
    new_reports = {r["shard"]: r for r in written}
    reports = [new_reports.get(os.path.basename(t.path)) or fileio.read_json(t.report_path)
               for t in tasks]
    info = output_dir.dataset_info(plan, source, reports)
    output_dir.write_label_map(cfg.output_dir, plan, info["class_counts"])
    if vocab is not None:
        info["tags"] = _tag_info(cfg, vocab, info)
        fileio.write_text_atomic(fileio.join(cfg.output_dir, tags.TAG_VOCAB), tags.vocab_csv(vocab))
    fileio.write_json_atomic(info_path, info)
    summary = _summary(cfg, info, start, len(todo), planned, resumed=len(tasks) - len(todo))
    return {**summary, "shards_damaged": sorted(damaged)}


def _attach_tags(cfg: ConvertConfig, plan: ConversionPlan) -> list[tuple[str, int]]:
    """Reads the attribution CSV twice (document frequencies, then tag ids), sets every planned
    example's tags (b"" without an attribution row) and returns the vocabulary."""
    counts, num_titles = tags.document_frequency(cfg.attribution_csv)
    vocab = tags.vocabulary(counts, num_titles, cfg.tag_min_df, cfg.tag_max_df)
    del counts
    table = tags.TagTable.from_csv(cfg.attribution_csv, vocab)
    missing = 0
    for split, examples in plan.splits.items():
        found = table.lookup([ex.image_id for ex in examples])
        missing += sum(t is None for t in found)
        plan.splits[split] = [ex._replace(tags=t or b"") for ex, t in zip(examples, found,
                                                                         strict=True)]
    plan.stats.update(attribution_rows=num_titles, examples_without_attribution=missing)
    return vocab


def _tag_info(cfg: ConvertConfig, vocab: list[tuple[str, int]], info: dict) -> dict:
    """dataset_info.json's "tags": vocabulary size, filter settings and sha256 of tag_vocab.csv,
    the longest tag list (max_tags: the width training pads to) and images without tags."""
    splits = info["splits"].values()
    return {
        "vocab_size": len(vocab), "vocab_file": tags.TAG_VOCAB,
        "vocab_sha256": tags.vocab_sha256(vocab),
        "min_df": cfg.tag_min_df, "max_df": cfg.tag_max_df,
        "attribution_csv": cfg.attribution_csv,
        "max_tags": max((s.get("max_tags", 0) for s in splits), default=0),
        "untagged_examples": sum(s.get("untagged_examples", 0) for s in splits),
        "examples_without_attribution": info["source"]["examples_without_attribution"],
    }


def _write_local(
    workers: Workers, todo: list[ShardTask], planned: int, progress: bool
) -> list[dict]:
    """Writes `todo` with the local workers under a progress bar; returns their reports."""
    with tqdm(total=planned, unit="img", desc="landmark-tfrecords", disable=not progress,
              dynamic_ncols=True) as bar:
        return workers.map(write_shard, [(t,) for t in todo], on_progress=bar.update)


def _tasks(cfg: ConvertConfig, plan: ConversionPlan, num_shards: dict[str, int]) -> list[ShardTask]:
    options = ImageOptions(cfg.max_image_side, cfg.jpeg_quality)
    state = fileio.join(cfg.output_dir, output_dir.STATE_DIR)
    tasks = []
    for split in plan.split_order():
        n = num_shards[split]
        shard_examples = planning.assign_shards(plan.splits[split], n, cfg.seed, split)
        for i, examples in enumerate(shard_examples):
            name = records.shard_name(split, i, n)
            tasks.append(ShardTask(fileio.join(cfg.output_dir, name),
                                   fileio.join(state, f"{name}.json"), examples, cfg.image_dir,
                                   options))
    return tasks


def _summary(cfg, info: dict, start: float, shards_written: int, processed: int,
             resumed: int) -> dict[str, Any]:
    """The closing JSON line; `shards_kept` counts shards found complete from an earlier run."""
    seconds = time.perf_counter() - start
    reasons: dict[str, int] = {}
    for s in info["skipped"]:
        category = s["reason"].split(":")[0]
        reasons[category] = reasons.get(category, 0) + 1
    return {
        "examples": sum(s["examples"] for s in info["splits"].values()),
        "classes": info["num_classes"],
        "skipped": info["num_skipped"],
        "skipped_by_reason": reasons,
        "splits": {k: v["examples"] for k, v in info["splits"].items()},
        "shards": sum(len(v["shards"]) for v in info["splits"].values()),
        "shards_written": shards_written,
        "shards_kept": resumed,
        "up_to_date": shards_written == 0,
        "output_dir": cfg.output_dir,
        "seconds": round(seconds, 2),
        "images_per_second": round(processed / seconds, 1) if seconds > 0 else 0.0,
    }
