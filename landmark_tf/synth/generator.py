"""A small synthetic dataset in the Google Landmarks v2 layout, made without any download.

Output (`output_dir`):
  train.csv                      id,url,landmark_id
  train_clean.csv                landmark_id,images (space-separated ids)
  index.csv, test.csv            id
  retrieval_solution_v2.1.csv    id,images,Usage   (images "None" and Usage "Ignored" for test
                                                    images with no match in the index)
  recognition_solution_v2.1.csv  id,landmarks,Usage (landmarks empty for test images of no
                                                    training landmark)
  nonlandmark.csv                id   (a separate set of images of no landmark, disjoint
                                      from train/index/test, for non-landmark handling)
  {train,index,test,nonlandmark}/a/b/c/<id>.jpg
  synth_config.json              the settings; a rerun with the same settings resumes
  train_noise.csv                id,landmark_id,shows_landmark_id of the train images that are
                                 noise: their label and what they really show (-1: no landmark);
                                 the truth for measuring landmark-clean, not a GLDv2 file
  train_attribution.csv          id,url,author,license,title: noisy web-style file titles naming
                                 what each train image shows (see titles.py)
  train_label_to_hierarchical.csv landmark_id,category,supercategory,hierarchical_label,
                                 natural_or_human_made (GLDv2's hierarchy file)

Every landmark is a procedural scene (`scenes`), every image a random view of it (`views`).
Train landmarks have a Zipf-like number of images from `max_images` down to `min_images`.
Index and test hold views of some train landmarks, of "novel" landmarks seen only there (as in
GLDv2, where retrieval landmarks need not be in train), and distractors of no landmark. A
`noisy_fraction` of each landmark's train images is left out of train_clean.csv, and those
images really are noise: views of an unrelated scene, like the mislabelled images in GLDv2.

Options that give the set more of GLDv2's phenomena (defaults off; README "Synthetic data"):
`facets` (several unrelated scenes under one landmark id, like a church's exterior, interior
and altar), `noise_other_landmarks` (noise that shows another landmark, not only none),
`nonlandmark_style="everyday"` (images of no landmark that are rooms, food, people and
documents, like most of GLDv2's test set) and a large `test_distractors` (GLDv2's test set is
mostly images of no landmark).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from landmark_tf import fileio
from landmark_tf.data import gldv2
from landmark_tf.errors import UserError
from landmark_tf.synth import scenes, titles, views
from landmark_tf.synth.plan import (
    NOISE_FILE,
    Item,
    SynthConfig,
    SynthPlan,
    csv_files,
    make_plan,
    noise_csv,
    noise_items,
)

CONFIG_FILE = "synth_config.json"
GENERATOR_VERSION = 1  # bump when the drawing changes, so a rerun never mixes two versions
SPLITS = ("train", "index", "test", "nonlandmark")


def image_path(root: str, split: str, image_id: str) -> str:
    """`root/split/a/b/c/<id>.jpg`, the GLDv2 tree."""
    return gldv2.image_path(fileio.join(root, split), image_id)  # refuses ids that escape root


def _scene(cfg: SynthConfig, plan: SynthPlan, index: int,
           words: list[str] | None = None) -> scenes.Scene:
    rng = np.random.default_rng([cfg.seed, 1, index])
    if index < plan.num_landmark_scenes:
        return scenes.make_scene(rng, words)
    if index in plan.everyday_scenes:
        return scenes.make_everyday(rng, words)
    return scenes.make_distractor(rng, words)


def scene_words(cfg: SynthConfig, plan: SynthPlan, index: int) -> list[str]:
    """What scene `index` shows, in words (see scenes.make_scene), for file titles."""
    words: list[str] = []
    _scene(cfg, plan, index, words)
    return words


def render_item(cfg: SynthConfig, plan: SynthPlan, item: Item, cache: dict | None = None) -> bytes:
    """JPEG bytes of one planned image; depends only on (cfg, item), so reruns are identical."""
    cache = {} if cache is None else cache
    if item.scene not in cache:
        scene = _scene(cfg, plan, item.scene)
        if item.scene >= plan.num_landmark_scenes:
            return _encode(cfg, item, scene)  # distractor scenes are used once: keep no copy
        cache[item.scene] = scene
    return _encode(cfg, item, cache[item.scene])


def _encode(cfg: SynthConfig, item: Item, scene: scenes.Scene) -> bytes:
    view_cfg = cfg.view.scaled(cfg.difficulty)
    rng = np.random.default_rng([cfg.seed, 2, item.serial])
    pixels = views.render_view(scene, rng, cfg.image_size, view_cfg)
    return views.encode_jpeg(rng, pixels, view_cfg)


def _claim_output_dir(cfg: SynthConfig, output_dir: str) -> bool:
    """Records the settings in output_dir; True when resuming a run with the same settings.

    Refuses a folder made with other settings, or one that holds GLDv2 files not made here.
    """
    path = fileio.join(output_dir, CONFIG_FILE)
    settings = json_roundtrip({"generator_version": GENERATOR_VERSION, **cfg.to_dict()})
    if fileio.exists(path):
        # Settings added later are absent from older folders: there they had their defaults.
        stored = {**json_roundtrip(SynthConfig().to_dict()), **fileio.read_json(path)}
        if stored != settings:
            changed = sorted(k for k in settings if stored.get(k) != settings[k])
            raise UserError(f"{output_dir} holds a synthetic dataset made with other settings "
                            f"({', '.join(changed) or 'unknown'}); choose a new --output_dir "
                            f"or delete that one")
        return True
    for name in ("train.csv", "index.csv", "test.csv", *SPLITS):
        if fileio.exists(fileio.join(output_dir, name)):
            raise UserError(f"{output_dir} already holds {name} but no {CONFIG_FILE}: not a "
                            f"landmark-synth folder; choose an empty --output_dir")
    fileio.makedirs(output_dir)
    fileio.write_json_atomic(path, settings)
    return False


def json_roundtrip(obj):
    """`obj` as it reads back from JSON (tuples become lists), for comparing settings."""
    return json.loads(json.dumps(obj))


def _remove_temporaries(output_dir: str) -> None:
    for split in SPLITS:
        root = fileio.join(output_dir, split)
        if tf.io.gfile.isdir(root):
            for folder, _, _ in tf.io.gfile.walk(root):
                fileio.remove_temporaries(folder)


def write_images(cfg: SynthConfig, plan: SynthPlan, output_dir: str, progress: bool = True) -> int:
    """Renders every planned image not already on disk; returns how many it wrote."""
    made_dirs, cache, written = set(), {}, 0
    for item in tqdm(plan.items, desc="landmark-synth", unit="img", disable=not progress):
        path = image_path(output_dir, item.split, item.id)
        if fileio.exists(path):
            continue  # a resumed run: same settings, same seed, so the same bytes
        folder = path.rsplit("/", 1)[0]
        if folder not in made_dirs:
            fileio.makedirs(folder)
            made_dirs.add(folder)
        fileio.write_bytes_atomic(path, render_item(cfg, plan, item, cache))
        written += 1
    return written


def generate(cfg: SynthConfig, output_dir: str, progress: bool = True) -> dict:
    """Writes the whole dataset into `output_dir` (resuming a run with the same settings).

    Returns the closing-JSON summary: images, landmarks (train landmarks = classes), per-split
    counts, and how many images this run wrote versus found already done.
    """
    cfg.validate()
    plan = make_plan(cfg)
    if _claim_output_dir(cfg, output_dir):
        _remove_temporaries(output_dir)
    written = write_images(cfg, plan, output_dir, progress)
    for name, text in csv_files(plan).items():
        fileio.write_text_atomic(fileio.join(output_dir, name), text)
    fileio.write_text_atomic(fileio.join(output_dir, NOISE_FILE), noise_csv(plan))
    words_of = functools.partial(scene_words, cfg, plan)
    fileio.write_text_atomic(fileio.join(output_dir, titles.ATTRIBUTION_FILE),
                             titles.attribution_csv(cfg.seed, plan, words_of))
    fileio.write_text_atomic(fileio.join(output_dir, titles.HIERARCHY_FILE),
                             titles.hierarchy_csv(cfg.seed, plan, words_of))
    counts = {split: len(plan.split(split)) for split in SPLITS}
    return {
        "output_dir": output_dir,
        "images": len(plan.items),
        "landmarks": len(plan.train_landmarks),
        "novel_landmarks": len(plan.novel_landmarks),
        "train_images": counts["train"],
        "clean_images": sum(len(v) for v in plan.clean.values()),
        "noise_images": len(noise_items(plan)),
        "index_images": counts["index"],
        "test_images": counts["test"],
        "distractors": sum(it.landmark_id < 0 and it.split != "nonlandmark" for it in plan.items),
        "nonlandmark_images": counts["nonlandmark"],
        "written": written,
        "reused": len(plan.items) - written,
    }
