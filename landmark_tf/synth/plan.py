"""Which images a synthetic dataset holds, and its six GLDv2 CSV files; no pixels.

The plan decides, from the seed alone, every image id (16 hex digits, like GLDv2), every
landmark id (random, non-contiguous ints below 200k, so relabelling is exercised), which
landmark and which scene each image shows, the clean subset and the solutions' Usage column.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterator

import numpy as np

from landmark_tf.errors import UserError
from landmark_tf.synth import views

LANDMARK_ID_RANGE = 200_000  # GLDv2 landmark ids go up to ~203k
_FRACTIONS = ("retrieval_fraction", "noisy_fraction", "unclean_landmarks", "public_fraction",
              "noise_other_landmarks")
# What images of no landmark look like (test distractors, the non-landmark set, no-landmark
# train noise): "landmark_like" = one-off landmark-like scenes and open landscapes (what the
# index distractors always are), "everyday" = rooms, food, people, documents, close-ups.
NONLANDMARK_STYLES = ("landmark_like", "everyday")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Sizes and difficulty of the synthetic dataset (defaults: ~1.2k images, ~10 s to make)."""

    num_landmarks: int = 60  # landmarks with train images
    min_images: int = 8  # train images of the rarest landmark
    max_images: int = 40  # train images of the most frequent landmark
    image_size: int = 96
    seed: int = 0
    retrieval_fraction: float = 0.5  # share of train landmarks that also appear in index/test
    novel_landmarks: int = 10  # landmarks that appear only in index/test
    index_images: tuple[int, int] = (3, 8)  # index images per retrieval landmark (min, max)
    test_images: tuple[int, int] = (1, 3)  # test images per retrieval landmark (min, max)
    index_distractors: float = 0.5  # distractors in index, relative to its landmark images
    test_distractors: float = 0.3  # distractors in test, relative to its landmark images
    noisy_fraction: float = 0.1  # train images per landmark that are noise (not in clean)
    unclean_landmarks: float = 0.1  # share of train landmarks absent from train_clean.csv
    public_fraction: float = 0.3  # test images scored "Public" (the rest "Private")
    difficulty: float = 1.0  # scales every view knob; 0 = identical views
    # Images of no landmark in the separate non-landmark set, relative to the test set's size
    # (for non-landmark handling in recognition; ids disjoint from every other split).
    nonlandmark_images: float = 2.0
    # GLDv2 files the exterior, the interior and details of a place under one landmark id:
    # each landmark gets this many unrelated scenes ("facets"), each image shows one at random.
    facets: int = 1
    # Share of the noisy train images that show another train landmark (mislabelled); the rest
    # show no landmark. GLDv2's train noise holds both kinds.
    noise_other_landmarks: float = 0.0
    nonlandmark_style: str = "landmark_like"  # one of NONLANDMARK_STYLES
    view: views.ViewConfig = dataclasses.field(default_factory=views.ViewConfig)

    def validate(self) -> None:
        """Raises UserError naming the first setting that cannot make a dataset."""
        (index_lo, index_hi), (test_lo, test_hi) = self.index_images, self.test_images
        checks = [
            (self.num_landmarks >= 1, "num_landmarks must be >= 1"),
            (1 <= self.min_images <= self.max_images, "need 1 <= min_images <= max_images"),
            (16 <= self.image_size <= 2048, "image_size must be within 16..2048"),
            (self.novel_landmarks >= 0, "novel_landmarks must be >= 0"),
            (self.num_landmarks + self.novel_landmarks <= LANDMARK_ID_RANGE,
             f"num_landmarks + novel_landmarks must be <= {LANDMARK_ID_RANGE}"),
            (1 <= index_lo <= index_hi, "index_images needs 1 <= min <= max"),
            (0 <= test_lo <= test_hi, "test_images needs 0 <= min <= max"),
            (self.index_distractors >= 0, "index_distractors must be >= 0"),
            (self.test_distractors >= 0, "test_distractors must be >= 0"),
            (self.difficulty >= 0, "difficulty must be >= 0"),
            (self.nonlandmark_images >= 0, "nonlandmark_images must be >= 0"),
            (self.facets >= 1, "facets must be >= 1"),
            (self.nonlandmark_style in NONLANDMARK_STYLES,
             f"nonlandmark_style must be one of {', '.join(NONLANDMARK_STYLES)}, "
             f"got {self.nonlandmark_style!r}"),
            (self.noise_other_landmarks == 0 or self.num_landmarks >= 2,
             "noise_other_landmarks needs num_landmarks >= 2"),
        ]
        for name in _FRACTIONS:
            value = getattr(self, name)
            checks.append((0 <= value <= 1, f"{name} must be within 0..1, got {value}"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)




@dataclasses.dataclass(frozen=True)
class Item:
    """One planned image: split, id, landmark (-1 = none), the scene it shows, view serial."""

    split: str
    id: str
    landmark_id: int
    scene: int  # index into the plan's scene seeds; landmarks first, then one per distractor
    serial: int  # seeds this image's view


def zipf_counts(n: int, low: int, high: int) -> np.ndarray:
    """int64 [n]: count(rank r) = high * r^-a with a chosen so that count(n) = low."""
    if n == 1:
        return np.array([high])
    a = np.log(high / low) / np.log(n)
    return np.clip(np.round(high * np.arange(1, n + 1) ** -a), low, high).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SynthPlan:
    """Everything about the dataset except the pixels; cheap, and identical for one config."""

    items: tuple[Item, ...]
    train_landmarks: tuple[int, ...]
    novel_landmarks: tuple[int, ...]
    clean: dict[int, list[str]]  # landmark id -> ids of its clean train images
    usage: dict[str, str]  # test id -> "Public" or "Private"
    num_landmark_scenes: int  # scenes [0, num_landmark_scenes) are landmark facets
    # Landmark shown by each landmark scene: scene s shows scene_landmarks[s]; facet f of the
    # i-th landmark (train, then novel) is scene i + f * (number of landmarks).
    scene_landmarks: tuple[int, ...] = ()
    everyday_scenes: frozenset[int] = frozenset()  # scenes of no landmark drawn "everyday"

    def split(self, name: str) -> list[Item]:
        return [it for it in self.items if it.split == name]

    def shows(self, item: Item) -> int:
        """The landmark id `item`'s pixels show (-1: none), whatever its label says."""
        if item.scene < self.num_landmark_scenes:
            return self.scene_landmarks[item.scene]
        return -1


def _unique_ids(rng: np.random.Generator) -> Iterator[str]:
    seen = set()
    while True:
        image_id = rng.bytes(8).hex()
        if image_id not in seen:
            seen.add(image_id)
            yield image_id


def make_plan(cfg: SynthConfig) -> SynthPlan:
    """Decides ids, landmark ids, splits, clean subset and scoring usage from `cfg.seed`."""
    rng = np.random.default_rng([cfg.seed, 0])
    # Facet and noise-kind draws have streams of their own, consulted only when those options
    # are on, so that the default dataset stays byte-identical to earlier versions.
    facet_rng, noise_rng = (np.random.default_rng([cfg.seed, k]) for k in (5, 6))
    n_train, n_all = cfg.num_landmarks, cfg.num_landmarks + cfg.novel_landmarks
    lids = [int(v) for v in rng.choice(LANDMARK_ID_RANGE, n_all, replace=False)]
    scene_of = {lid: i for i, lid in enumerate(lids)}
    counts = zipf_counts(n_train, cfg.min_images, cfg.max_images)[rng.permutation(n_train)]
    ids, items = _unique_ids(rng), []
    next_scene = n_all * cfg.facets  # distractor and noise scenes come after the landmarks'
    everyday: set[int] = set()

    def facet(lid: int) -> int:
        if cfg.facets == 1:
            return scene_of[lid]
        return scene_of[lid] + n_all * int(facet_rng.integers(cfg.facets))

    def add(split: str, lid: int, scene: int) -> str:
        items.append(Item(split, next(ids), lid, scene, len(items)))
        return items[-1].id

    def add_nonlandmark(split: str, lid: int = -1) -> None:
        nonlocal next_scene
        if cfg.nonlandmark_style == "everyday" and split != "index":
            everyday.add(next_scene)
        add(split, lid, next_scene)
        next_scene += 1

    clean = {}
    for i, (lid, count) in enumerate(zip(lids[:n_train], counts, strict=True)):
        noisy = min(round(cfg.noisy_fraction * count), count - 1)
        clean[lid] = [add("train", lid, facet(lid)) for _ in range(count - noisy)]
        for _ in range(noisy):
            if cfg.noise_other_landmarks and noise_rng.random() < cfg.noise_other_landmarks:
                other = lids[(i + 1 + int(noise_rng.integers(n_train - 1))) % n_train]
                add("train", lid, facet(other))
            else:
                add_nonlandmark("train", lid)
    unclean = rng.choice(n_train, round(cfg.unclean_landmarks * n_train), replace=False)
    for i in unclean:
        del clean[lids[i]]
    n_shared = round(cfg.retrieval_fraction * n_train)
    retrieval = [lids[i] for i in sorted(rng.choice(n_train, n_shared, replace=False))]
    retrieval += lids[n_train:]
    for split, (low, high), share in (("index", cfg.index_images, cfg.index_distractors),
                                      ("test", cfg.test_images, cfg.test_distractors)):
        before = len(items)
        for lid in retrieval:
            for _ in range(rng.integers(low, high + 1)):
                add(split, lid, facet(lid))
        for _ in range(round(share * (len(items) - before))):
            add_nonlandmark(split)
    usage = {it.id: "Public" if rng.random() < cfg.public_fraction else "Private"
             for it in items if it.split == "test"}
    # Drawn after everything else, so the other splits are those of a plan without this set.
    for _ in range(round(cfg.nonlandmark_images * len(usage))):
        add_nonlandmark("nonlandmark")
    return SynthPlan(tuple(items), tuple(lids[:n_train]), tuple(lids[n_train:]), clean, usage,
                     n_all * cfg.facets, tuple(lids) * cfg.facets, frozenset(everyday))


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def csv_files(plan: SynthPlan) -> dict[str, str]:
    """File name -> text of the six GLDv2 CSV files and nonlandmark.csv (id); rows sorted by id
    like the Kaggle files."""
    train = sorted(plan.split("train"), key=lambda it: it.id)
    index = sorted(plan.split("index"), key=lambda it: it.id)
    test = sorted(plan.split("test"), key=lambda it: it.id)
    nonlandmark = sorted(plan.split("nonlandmark"), key=lambda it: it.id)
    matches: dict[int, list[str]] = {}
    for it in index:
        matches.setdefault(it.landmark_id, []).append(it.id)
    known = set(plan.train_landmarks)
    retrieval, recognition = [], []
    for it in test:
        if it.landmark_id in matches and it.landmark_id >= 0:
            retrieval.append([it.id, " ".join(matches[it.landmark_id]), plan.usage[it.id]])
        else:
            retrieval.append([it.id, "None", "Ignored"])
        lid = str(it.landmark_id) if it.landmark_id in known else ""
        recognition.append([it.id, lid, plan.usage[it.id]])
    url = "https://synthetic.invalid/train/{}.jpg"
    return {
        "train.csv": _csv(["id", "url", "landmark_id"],
                          [[it.id, url.format(it.id), it.landmark_id] for it in train]),
        "train_clean.csv": _csv(["landmark_id", "images"],
                                [[k, " ".join(sorted(v))] for k, v in sorted(plan.clean.items())]),
        "index.csv": _csv(["id"], [[it.id] for it in index]),
        "nonlandmark.csv": _csv(["id"], [[it.id] for it in nonlandmark]),
        "test.csv": _csv(["id"], [[it.id] for it in test]),
        "retrieval_solution_v2.1.csv": _csv(["id", "images", "Usage"], retrieval),
        "recognition_solution_v2.1.csv": _csv(["id", "landmarks", "Usage"], recognition),
    }


NOISE_FILE = "train_noise.csv"


def noise_items(plan: SynthPlan) -> list[Item]:
    """The train images that are noise: labelled with a landmark but showing no landmark or
    another one (the truth behind train_clean.csv, for measuring landmark-clean)."""
    return [it for it in plan.split("train") if plan.shows(it) != it.landmark_id]


def noise_csv(plan: SynthPlan) -> str:
    """Text of train_noise.csv: id,landmark_id,shows_landmark_id of every noise train image
    (its label, and the landmark its pixels show, -1 for none), sorted by id."""
    rows = sorted((it.id, it.landmark_id, plan.shows(it)) for it in noise_items(plan))
    return _csv(["id", "landmark_id", "shows_landmark_id"], [list(r) for r in rows])
