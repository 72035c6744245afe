"""Noisy web-style file titles and a landmark hierarchy for the synthetic set.

GLDv2 ships `train_attribution.csv` (id,url,author,license,title: the Wikimedia file title of every
train image) and `train_label_to_hierarchical.csv` (landmark_id,category,supercategory,
hierarchical_label,natural_or_human_made). WeChat AI's tag pretraining ("Rethinking Model
Pretraining for Noisy Image Classification", GLD2019) learns from such titles; these files let that
stage run and be measured on the synthetic set.

A title names what its image's scene shows (`scenes.make_scene(words=...)`: the main building's
colour, roof and facade, road, mountains or skyline, foreground structure), as a photographer's
title would, and is noisy the way web titles are: each true word is missing with probability
`MISSING`, wrong words (other scene words) appear at rate `WRONG_RATE`, the landmark's own name
appears with probability `NAME_RATE`, and filler (camera names, years, "view of the") surrounds
them. Noise train images (views of an unrelated scene) are titled by the scene they show. Every
title depends only on (seed, image serial), from its own random stream, so the images and the other
CSVs are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from landmark_tf.synth.plan import SynthPlan, _csv

ATTRIBUTION_FILE = "train_attribution.csv"
HIERARCHY_FILE = "train_label_to_hierarchical.csv"
MISSING = 0.3  # chance a true scene word is left out of a title
WRONG_RATE = 0.6  # mean number of wrong scene words per title (Poisson)
NAME_RATE = 0.3  # chance the landmark's (made-up) name is in a title
WRONG_WORDS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white",
               "black", "grey", "flat", "gable", "dome", "spire", "stepped", "battlements",
               "windows", "columns", "bands", "tiles", "road", "mountains", "skyline",
               "colonnade", "obelisk", "fence", "trees", "landscape")
FILLER = ("view", "of", "the", "from", "and", "in", "photo", "panorama", "img", "dsc", "jpg",
          "picture", "summer", "winter", "trip", "day", "taken", "near")
# The main building's roof decides the synthetic landmark's place in the hierarchy.
ROOF_HIERARCHY = {
    "dome": ("mosque", "religious building"), "spire": ("church", "religious building"),
    "battlements": ("castle", "fortification"), "stepped": ("tower", "tower"),
    "gable": ("house", "building"), "flat": ("office building", "building"),
}
_SYLLABLES = ("ka", "lo", "vi", "ren", "sa", "mor", "tel", "qu", "an", "bri", "do", "zen")


def landmark_name(seed: int, landmark_id: int) -> str:
    """A made-up place name for a landmark, e.g. 'Kalovi'; fixed by (seed, landmark_id)."""
    rng = np.random.default_rng([seed, 4, landmark_id])
    return "".join(rng.choice(_SYLLABLES, rng.integers(2, 4))).capitalize()


def title(seed: int, serial: int, true_words: list[str], name: str) -> str:
    """One noisy title 'File:<words> <year>.jpg' for the image of view serial `serial`."""
    rng = np.random.default_rng([seed, 3, serial])
    words = [w for w in dict.fromkeys(true_words) if rng.random() >= MISSING]
    words += [str(w) for w in rng.choice(WRONG_WORDS, rng.poisson(WRONG_RATE))]
    if rng.random() < NAME_RATE:
        words.append(name)
    words += [str(w) for w in rng.choice(FILLER, rng.integers(1, 4))]
    words = [words[i] for i in rng.permutation(len(words))]
    if rng.random() < 0.5:
        words.insert(0, f"DSC{rng.integers(10_000):05d}")
    return f"File:{' '.join(w.capitalize() for w in words)} {rng.integers(1995, 2020)}.jpg"


def attribution_csv(seed: int, plan: SynthPlan, words_of: Callable[[int], list[str]]) -> str:
    """Text of train_attribution.csv (id,url,author,license,title; rows sorted by id) for every
    train image; `words_of(scene index)` lists what a scene shows."""
    words: dict[int, list[str]] = {}
    rows = []
    for it in sorted(plan.split("train"), key=lambda it: it.id):
        if it.scene not in words:
            words[it.scene] = words_of(it.scene)
        name = landmark_name(seed, it.landmark_id)
        rows.append([it.id, f"https://synthetic.invalid/wiki/File:{it.id}.jpg",
                     f"Photographer {it.serial % 97}", "CC BY-SA 3.0",
                     title(seed, it.serial, words[it.scene], name)])
    return _csv(["id", "url", "author", "license", "title"], rows)


def hierarchy_csv(seed: int, plan: SynthPlan, words_of: Callable[[int], list[str]]) -> str:
    """Text of train_label_to_hierarchical.csv for the train landmarks (sorted by landmark id):
    category (a Commons category URL of the landmark's name), supercategory and
    hierarchical_label from its main building's roof, natural_or_human_made."""
    # A landmark's first facet is its main scene (scene i for the i-th landmark).
    scene_of = {lid: i for i, lid in enumerate(plan.train_landmarks)}
    rows = []
    for lid in sorted(plan.train_landmarks):
        roof = next(w for w in words_of(scene_of[lid]) if w in ROOF_HIERARCHY)
        supercategory, hierarchical = ROOF_HIERARCHY[roof]
        category = f"http://commons.wikimedia.org/wiki/Category:{landmark_name(seed, lid)}"
        rows.append([lid, category, supercategory, hierarchical, "human-made"])
    return _csv(["landmark_id", "category", "supercategory", "hierarchical_label",
                 "natural_or_human_made"], rows)
