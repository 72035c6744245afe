"""GLDv2 rows -> a conversion plan: drop rare landmarks, relabel, split, assign shards.

Everything here is pure Python and deterministic for a given seed (random.Random seeded with
strings hashes them with SHA-512, so no PYTHONHASHSEED dependence), so a Beam pipeline builds the
same plan as the local converter.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import random
from collections.abc import Iterable

from landmark_tf.data import provenance
from landmark_tf.data.gldv2 import UNLABELLED, Example, Row, read_csv
from landmark_tf.errors import UserError


def clean_flags(rows: list[Row], clean_rows: list[Row], clean_path: str) -> list[bool]:
    """Per row: is its id in the clean list? Raises UserError if the two files disagree on a
    landmark id (a clean list from another GLDv2 version would otherwise mislabel silently)."""
    clean = {r.image_id: r for r in clean_rows}
    flags = []
    for row in rows:
        match = clean.get(row.image_id)
        if match is not None and match.landmark_id != row.landmark_id:
            raise UserError(
                f"{clean_path}:{match.line}: image {row.image_id} has landmark "
                f"{match.landmark_id}, but line {row.line} of the main CSV says {row.landmark_id}"
            )
        flags.append(match is not None)
    return flags


def landmark_counts(rows: Iterable[Row]) -> collections.Counter:
    return collections.Counter(r.landmark_id for r in rows)


def label_map(rows: Iterable[Row], min_images_per_class: int) -> dict[int, int]:
    """landmark_id -> contiguous label 0..C-1 (ascending landmark id) for landmarks with at least
    `min_images_per_class` rows."""
    counts = landmark_counts(rows)
    kept = sorted(lm for lm, n in counts.items() if n >= min_images_per_class)
    return {lm: label for label, lm in enumerate(kept)}


def labelled_examples(
    rows: list[Row], is_clean: list[bool], labels: dict[int, int]
) -> list[Example]:
    """Examples of the rows whose landmark is in `labels`, in row order."""
    return [
        Example(r.image_id, labels[r.landmark_id], r.landmark_id, c)
        for r, c in zip(rows, is_clean, strict=True)
        if r.landmark_id in labels
    ]


def unlabelled_examples(rows: list[Row], is_clean: list[bool]) -> list[Example]:
    """Examples with label -1; the landmark id is kept when the CSV has one."""
    pairs = zip(rows, is_clean, strict=True)
    return [Example(r.image_id, UNLABELLED, r.landmark_id, c) for r, c in pairs]


def stratified_split(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Per landmark, floor(n * val_fraction) examples go to val, the rest to train.

    A landmark with fewer than 1/val_fraction images therefore keeps all of them in train, and
    every landmark keeps at least one train image. Which images go to val depends only on the
    seed and that landmark's ids. Both lists come back sorted by image id.
    """
    by_label: dict[int, list[Example]] = collections.defaultdict(list)
    for ex in examples:
        by_label[ex.label].append(ex)
    train, val = [], []
    for label in sorted(by_label):
        group = sorted(by_label[label])
        random.Random(f"{seed}:val:{label}").shuffle(group)
        n_val = int(len(group) * val_fraction)
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return sorted(train), sorted(val)


def assign_shards(examples: list[Example], num_shards: int, seed: int, split: str) -> list[list]:
    """Shuffles (seeded, independent of input order) and cuts into `num_shards` contiguous runs
    whose sizes differ by at most one, so no shard holds a single landmark."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    order = sorted(examples)
    random.Random(f"{seed}:shuffle:{split}").shuffle(order)
    n = len(order)
    return [order[i * n // num_shards : (i + 1) * n // num_shards] for i in range(num_shards)]


@dataclasses.dataclass
class ConversionPlan:
    """What to write: examples per split (each sorted by id), the label map, input statistics."""

    splits: dict[str, list[Example]]
    label_map: dict[int, int]  # landmark id -> contiguous label; empty when unlabelled
    stats: dict[str, int]
    # Inputs left out before planning ({"id", "path", "reason"}, as shard reports list them).
    skipped: list[dict] = dataclasses.field(default_factory=list)
    training_list: dict | None = None  # provenance.record of a labelled plan

    def split_order(self) -> list[str]:
        return sorted(self.splits, key=lambda s: ({"train": 0, "val": 1}.get(s, 2), s))

    def digest(self) -> str:
        """SHA-256 of every planned example: equal digests mean equal inputs to the shards."""
        h = hashlib.sha256()
        for split in self.split_order():
            h.update(f"[{split}]\n".encode())
            for ex in self.splits[split]:
                tags = "" if ex.tags is None else f",{ex.tags.hex()}"  # unchanged without tags
                h.update(f"{ex.image_id},{ex.label},{ex.landmark_id},{int(ex.is_clean)}{tags}\n"
                         .encode())
        return h.hexdigest()


def build_plan(
    *,
    train_csv: str = "",
    csv: str = "",
    split: str = "",
    clean_csv: str = "",
    exclude_landmarks: str = "",
    min_images_per_class: int = 1,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> ConversionPlan:
    """Reads the CSV(s) and plans the splits. `train_csv`: labelled train (+ val) splits;
    `csv`: one split named `split` with label -1. `exclude_landmarks`: a list of landmark ids
    whose images are left out (reported as skipped). Raises UserError for any bad input."""
    path = train_csv or csv
    kind, rows = read_csv(path)
    if train_csv and kind == "unlabelled":
        raise UserError(f"{path}: no landmark_id column; unlabelled sets go through --csv/--split")
    flags, stats = [True] * len(rows), {"csv_rows": len(rows)}
    if clean_csv:
        flags, stats["clean_ids_not_in_csv"] = _clean(rows, clean_csv)
        stats["clean_rows"] = sum(flags)
    exclusion = provenance.read_exclusion_list(exclude_landmarks) if exclude_landmarks else None
    rows, flags, skipped = _exclude(rows, flags, exclusion)
    if exclusion is not None:
        stats["excluded_images"] = len(skipped)
        stats["excluded_landmarks"] = len({s["landmark_id"] for s in skipped})
    training_list = provenance.record(train_csv, clean_csv, exclusion,
                                      stats.get("excluded_landmarks", 0), len(skipped))
    skipped = [{k: s[k] for k in ("id", "path", "reason")} for s in skipped]
    if not train_csv:
        return ConversionPlan({split: sorted(unlabelled_examples(rows, flags))}, {}, stats,
                              skipped)
    labels = label_map(rows, min_images_per_class)
    if not labels:
        raise UserError(f"{path}: no landmark has at least {min_images_per_class} images")
    examples = labelled_examples(rows, flags, labels)
    stats["classes_dropped"] = len(landmark_counts(rows)) - len(labels)
    stats["rows_dropped"] = len(rows) - len(examples)
    train, val = stratified_split(examples, val_fraction, seed)
    return ConversionPlan({"train": train, "val": val} if val else {"train": train}, labels, stats,
                          skipped, training_list)


def _exclude(rows: list[Row], flags: list[bool], exclusion) -> tuple[list, list, list[dict]]:
    """Rows and clean flags without the excluded landmarks' images, and those images as
    skipped entries (with their landmark id for counting)."""
    if exclusion is None:
        return rows, flags, []
    out_rows, out_flags, skipped = [], [], []
    for row, flag in zip(rows, flags, strict=True):
        if row.landmark_id != UNLABELLED and row.landmark_id in exclusion.landmark_ids:
            skipped.append({"id": row.image_id, "path": "", "landmark_id": row.landmark_id,
                            "reason": f"excluded landmark: {row.landmark_id} is listed in "
                                      f"{exclusion.path}"})
        else:
            out_rows.append(row)
            out_flags.append(flag)
    return out_rows, out_flags, skipped


def _clean(rows: list[Row], clean_csv: str) -> tuple[list[bool], int]:
    kind, clean_rows = read_csv(clean_csv)
    if kind != "clean":
        raise UserError(f"{clean_csv}:1: a clean list needs the train_clean.csv header "
                        "landmark_id,images")
    flags = clean_flags(rows, clean_rows, clean_csv)
    return flags, len(clean_rows) - sum(flags)
