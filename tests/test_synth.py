"""landmark-synth: GLDv2 layout and CSV formats, solution consistency, long tail, determinism."""

import csv
import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from landmark_tf.errors import UserError
from landmark_tf.synth import generator, scenes, views
from landmark_tf.synth import plan as synth_plan

TINY = generator.SynthConfig(
    num_landmarks=8, min_images=2, max_images=9, image_size=32, novel_landmarks=2,
    index_images=(1, 3), test_images=(1, 2), noisy_fraction=0.3, unclean_landmarks=0.25,
    index_distractors=0.5, test_distractors=0.5,
)


def read(root, name):
    with open(os.path.join(root, name), newline="") as f:
        return list(csv.reader(f))


def tree(root):
    """Relative path -> bytes of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    summary = generator.generate(TINY, root, progress=False)
    return root, summary


def test_csv_formats_and_image_tree(tiny):
    root, summary = tiny
    headers = {"train.csv": ["id", "url", "landmark_id"],
               "train_clean.csv": ["landmark_id", "images"],
               "index.csv": ["id"], "test.csv": ["id"], "nonlandmark.csv": ["id"],
               "retrieval_solution_v2.1.csv": ["id", "images", "Usage"],
               "recognition_solution_v2.1.csv": ["id", "landmarks", "Usage"]}
    for name, header in headers.items():
        rows = read(root, name)
        assert rows[0] == header, name
        assert all(len(r) == len(header) for r in rows[1:]), name
    ids = {s: [r[0] for r in read(root, f"{s}.csv")[1:]] for s in generator.SPLITS}
    every = [i for v in ids.values() for i in v]
    assert len(every) == len(set(every)) == summary["images"]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in every)
    files = tree(root)
    for split, split_ids in ids.items():
        jpgs = {p for p in files if p.startswith(split + os.sep)}
        assert jpgs == {os.path.join(split, i[0], i[1], i[2], i + ".jpg") for i in split_ids}
    last = ids["test"][-1]
    image = Image.open(io.BytesIO(files[os.path.join("test", *last[:3], last + ".jpg")]))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
    lids = sorted({int(r[2]) for r in read(root, "train.csv")[1:]})
    assert len(lids) == summary["landmarks"] == TINY.num_landmarks
    assert lids != list(range(lids[0], lids[0] + len(lids)))  # non-contiguous, like GLDv2


def test_solutions_list_exactly_the_true_matches(tiny):
    root, _ = tiny
    plan = synth_plan.make_plan(TINY)
    landmark = {it.id: it.landmark_id for it in plan.items}
    index_ids = [r[0] for r in read(root, "index.csv")[1:]]
    train_lids = set(plan.train_landmarks)
    recognition = {r[0]: r[1:] for r in read(root, "recognition_solution_v2.1.csv")[1:]}
    kinds = set()
    for test_id, images, usage in read(root, "retrieval_solution_v2.1.csv")[1:]:
        lid = landmark[test_id]
        if lid < 0:
            kinds.add("distractor")
            assert (images, usage) == ("None", "Ignored")
            assert recognition[test_id][0] == ""
            continue
        kinds.add("train landmark" if lid in train_lids else "novel landmark")
        assert usage in ("Public", "Private") and recognition[test_id][1] == usage
        assert set(images.split()) == {i for i in index_ids if landmark[i] == lid} != set()
        assert recognition[test_id][0] == (str(lid) if lid in train_lids else "")
    assert kinds == {"distractor", "train landmark", "novel landmark"}
    assert any(landmark[i] < 0 for i in index_ids)


def test_nonlandmark_set_is_separate_and_leaves_the_other_splits_unchanged(tiny):
    root, summary = tiny
    plan = synth_plan.make_plan(TINY)
    nonlandmark = [r[0] for r in read(root, "nonlandmark.csv")[1:]]
    assert len(nonlandmark) == summary["nonlandmark_images"] == round(
        TINY.nonlandmark_images * len(plan.split("test"))) > 0
    items = {it.id: it for it in plan.items}
    assert all(items[i].split == "nonlandmark" and items[i].landmark_id == -1 for i in nonlandmark)
    assert all(items[i].scene >= plan.num_landmark_scenes for i in nonlandmark)  # no landmark
    scenes_elsewhere = {it.scene for it in plan.items if it.split != "nonlandmark"}
    assert not scenes_elsewhere & {items[i].scene for i in nonlandmark}
    solutions = {r[0] for name in ("retrieval_solution_v2.1.csv", "recognition_solution_v2.1.csv")
                 for r in read(root, name)[1:]}  # fmt: skip
    assert not solutions & set(nonlandmark)
    # Without the set, every other split keeps the same ids, landmarks and scenes.
    bare = synth_plan.make_plan(dataclasses.replace(TINY, nonlandmark_images=0))
    assert bare.items == tuple(it for it in plan.items if it.split != "nonlandmark")
    assert bare.usage == plan.usage


def test_clean_subset_drops_noise_and_some_landmarks(tiny):
    root, summary = tiny
    train = {r[0]: int(r[2]) for r in read(root, "train.csv")[1:]}
    clean = {int(r[0]): r[1].split() for r in read(root, "train_clean.csv")[1:]}
    assert all(train[i] == lid for lid, ids in clean.items() for i in ids)
    assert 0 < len(clean) < len(set(train.values()))
    assert sum(map(len, clean.values())) == summary["clean_images"] < len(train)
    plan = synth_plan.make_plan(TINY)
    for it in plan.split("train"):  # the images left out of the clean list are real noise
        if it.landmark_id in clean:
            shows_its_landmark = plan.shows(it) == it.landmark_id
            assert shows_its_landmark == (it.id in clean[it.landmark_id])


def test_images_per_landmark_are_long_tailed():
    counts = synth_plan.zipf_counts(60, 8, 40)
    assert counts[0] == 40 and counts[-1] == 8 and np.all(np.diff(counts) <= 0)
    assert np.median(counts) < counts.mean() < (8 + 40) / 2
    assert list(synth_plan.zipf_counts(1, 3, 5)) == [5]
    plan = synth_plan.make_plan(TINY)
    per = np.unique([it.landmark_id for it in plan.split("train")], return_counts=True)[1]
    assert per.min() == TINY.min_images and per.max() == TINY.max_images


def test_same_seed_same_bytes_other_seed_other_ids(tmp_path, tiny):
    cfg = dict(num_landmarks=3, min_images=2, max_images=3, image_size=24, novel_landmarks=1)
    a, b, c = (str(tmp_path / n) for n in "abc")
    generator.generate(generator.SynthConfig(**cfg), a, progress=False)
    generator.generate(generator.SynthConfig(**cfg), b, progress=False)
    generator.generate(generator.SynthConfig(seed=1, **cfg), c, progress=False)
    assert tree(a) == tree(b)
    ids = lambda root: {r[0] for r in read(root, "train.csv")[1:]}  # noqa: E731
    assert not ids(a) & ids(c)


def test_rerun_resumes_and_guards_the_folder(tmp_path):
    cfg = generator.SynthConfig(num_landmarks=3, min_images=2, max_images=4, image_size=24,
                            novel_landmarks=1)
    root = str(tmp_path / "out")
    generator.generate(cfg, root, progress=False)
    before = tree(root)
    jpgs = sorted(p for p in before if p.endswith(".jpg"))[:2]
    for p in jpgs:
        os.remove(os.path.join(root, p))
    stale = os.path.join(root, os.path.dirname(jpgs[0]), ".tmp-0123456789ab-x.jpg")
    open(stale, "wb").close()
    summary = generator.generate(cfg, root, progress=False)
    assert (summary["written"], summary["reused"]) == (2, summary["images"] - 2)
    assert tree(root) == before
    with pytest.raises(UserError, match="seed"):
        small = generator.SynthConfig(seed=7, num_landmarks=3, min_images=2, max_images=4,
                                      image_size=24, novel_landmarks=1)
        generator.generate(small, root, progress=False)
    foreign = tmp_path / "gldv2"
    foreign.mkdir()
    (foreign / "train.csv").write_text("id,url,landmark_id\n")
    with pytest.raises(UserError, match="not a landmark-synth folder"):
        generator.generate(cfg, str(foreign), progress=False)


@pytest.mark.parametrize("bad", [dict(min_images=5, max_images=4), dict(num_landmarks=0),
                                 dict(index_images=(0, 2)), dict(noisy_fraction=1.5),
                                 dict(facets=0), dict(nonlandmark_style="indoor"),
                                 dict(noise_other_landmarks=1.2),
                                 dict(num_landmarks=1, noise_other_landmarks=0.5)])
def test_rejects_settings_that_cannot_work(bad, tmp_path):
    with pytest.raises(UserError):
        generator.generate(generator.SynthConfig(**bad), str(tmp_path), progress=False)
    assert not os.listdir(tmp_path)


def test_views_keep_geometry_and_change_appearance():
    scene, other = (scenes.make_scene(np.random.default_rng(i)) for i in (0, 1))
    same = views.ViewConfig().scaled(0)
    a, b = (views.render_view(scene, np.random.default_rng(s), 64, same) for s in (1, 2))
    np.testing.assert_array_equal(a, b)  # difficulty 0: the canonical photo, whatever the seed
    c = views.render_view(other, np.random.default_rng(1), 64, same)
    assert np.abs(a.astype(int) - c).mean() > 20  # two landmarks look different
    d = views.render_view(scene, np.random.default_rng(3), 64, views.ViewConfig())
    assert np.abs(a.astype(int) - d).mean() > 10  # a default view changes the photo a lot


def test_cameras_keep_the_world_in_front():
    src = np.array([[0.1, 0.2], [0.9, 0.1], [1.0, 0.8], [0.0, 1.0]])
    dst = np.array([[0.0, 0], [1, 0], [1, 1], [0, 1]])
    np.testing.assert_allclose(views.project(views.homography(src, dst), src), dst, atol=1e-9)
    lo, hi = scenes.WORLD_MIN, scenes.WORLD_MAX
    grid = np.stack(np.meshgrid(np.linspace(lo, hi, 9), np.linspace(lo, hi, 9)), -1).reshape(-1, 2)
    cfg = views.ViewConfig().scaled(3)
    for seed in range(200):
        h = views.random_camera(np.random.default_rng(seed), cfg)
        depth = np.c_[grid, np.ones(len(grid))] @ h[2]
        assert np.all(depth > 0)


def _cli(tmp_path, *extra):
    """Runs the installed console script, as a user would (TF import: a few seconds)."""
    exe = os.path.join(os.path.dirname(sys.executable), "landmark-synth")
    args = [exe, f"--output_dir={tmp_path / 'out'}", "--num_landmarks=3", "--min_images=2",
            "--max_images=3", "--image_size=24", "--novel_landmarks=1", "--index_images=1,2",
            "--noprogress", *extra]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def test_cli_prints_the_summary_last(tmp_path):
    done = _cli(tmp_path, "--facets=2", "--noise_other_landmarks=0.5",
                "--nonlandmark_style=everyday")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["landmarks"] == 3
    settings = json.loads((tmp_path / "out" / generator.CONFIG_FILE).read_text())
    assert (settings["facets"], settings["noise_other_landmarks"],
            settings["nonlandmark_style"]) == (2, 0.5, "everyday")
    assert result["images"] == sum(p.endswith(".jpg") for p in tree(tmp_path / "out"))


@pytest.mark.slow
def test_cli_bad_flag_is_one_line_and_exit_2(tmp_path):
    bad = _cli(tmp_path, "--index_images=1,x")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "landmark-synth: error: --index_images must be MIN,MAX integers, got '1,x'")
    assert not (tmp_path / "out").exists()


def test_noise_truth_lists_exactly_the_images_of_unrelated_scenes(tiny):
    root, summary = tiny
    noise = {r[0]: int(r[1]) for r in read(root, "train_noise.csv")[1:]}
    assert read(root, "train_noise.csv")[0] == ["id", "landmark_id", "shows_landmark_id"]
    assert {r[2] for r in read(root, "train_noise.csv")[1:]} == {"-1"}  # by default: no landmark
    assert len(noise) == summary["noise_images"] > 0
    plan = synth_plan.make_plan(TINY)
    for it in plan.split("train"):
        assert (it.id in noise) == (it.scene >= plan.num_landmark_scenes)
        assert noise.get(it.id, it.landmark_id) == it.landmark_id
    clean = {i for r in read(root, "train_clean.csv")[1:] for i in r[1].split()}
    assert not clean & set(noise)


PHENOMENA = dataclasses.replace(TINY, facets=3, noisy_fraction=0.4, noise_other_landmarks=0.5,
                                nonlandmark_style="everyday", test_distractors=3.0, seed=5)


def test_facets_file_unrelated_scenes_under_one_landmark():
    plan = synth_plan.make_plan(PHENOMENA)
    n = len(plan.train_landmarks) + len(plan.novel_landmarks)
    assert plan.num_landmark_scenes == 3 * n
    facets_seen: dict[int, set[int]] = {}
    for it in plan.items:
        if it.landmark_id >= 0 and plan.shows(it) == it.landmark_id:
            facets_seen.setdefault(it.landmark_id, set()).add(it.scene)
    assert all(len(s) <= 3 for s in facets_seen.values())
    assert sum(len(s) > 1 for s in facets_seen.values()) > len(facets_seen) / 2
    # Two facets of one landmark are different scenes, as different as two landmarks.
    lid, scenes_of = next((k, sorted(v)) for k, v in facets_seen.items() if len(v) > 1)
    same = views.ViewConfig().scaled(0)
    a, b = (views.render_view(generator._scene(PHENOMENA, plan, s), np.random.default_rng(1),
                              48, same) for s in scenes_of[:2])
    assert np.abs(a.astype(int) - b).mean() > 20
    # The solution lists every index image of the landmark, whichever facet it shows.
    files = synth_plan.csv_files(plan)
    matches = {r[0]: set(r[1].split()) for r in csv.reader(io.StringIO(
        files["retrieval_solution_v2.1.csv"])) if r[1] not in ("images", "None")}
    index_of = {}
    for it in plan.split("index"):
        index_of.setdefault(it.landmark_id, set()).add(it.id)
    for it in plan.split("test"):
        if it.id in matches:
            assert matches[it.id] == index_of[it.landmark_id]


def test_noise_of_both_kinds_with_its_truth(tmp_path):
    cfg = dataclasses.replace(PHENOMENA, nonlandmark_images=0.5)
    generator.generate(cfg, str(tmp_path), progress=False)
    plan = synth_plan.make_plan(cfg)
    rows = read(tmp_path, "train_noise.csv")[1:]
    shows = {r[0]: int(r[2]) for r in rows}
    labels = {it.id: it.landmark_id for it in plan.split("train")}
    other = [i for i, s in shows.items() if s >= 0]
    assert other and len(other) < len(shows)  # both kinds
    assert all(shows[i] != labels[i] and shows[i] in plan.train_landmarks for i in other)
    for it in plan.split("train"):  # every image not in the truth shows its own landmark
        assert (it.id in shows) == (plan.shows(it) != it.landmark_id)
    clean = {i for r in read(tmp_path, "train_clean.csv")[1:] for i in r[1].split()}
    assert not clean & set(shows)


def test_everyday_nonlandmarks_replace_landmark_like_ones_outside_the_index():
    plan = synth_plan.make_plan(PHENOMENA)
    nonlandmark_scenes = {it.split: set() for it in plan.items}
    for it in plan.items:
        if plan.shows(it) == -1:
            nonlandmark_scenes[it.split].add(it.scene)
    assert not nonlandmark_scenes["index"] & plan.everyday_scenes  # the index stays landmark-like
    for split in ("test", "nonlandmark", "train"):
        assert nonlandmark_scenes[split] and nonlandmark_scenes[split] <= plan.everyday_scenes
    # A majority of the test set shows no landmark, as in GLDv2.
    assert len(nonlandmark_scenes["test"]) > len(plan.split("test")) / 2
    for seed in range(20):  # each fills the frame: no sky, horizon or building in any view
        scene = scenes.make_everyday(np.random.default_rng(seed))
        np.testing.assert_array_equal(
            scene.points[:4], scenes.rect(scenes.WORLD_MIN, scenes.WORLD_MIN,
                                          scenes.WORLD_MAX, scenes.WORLD_MAX))


def test_the_phenomena_options_change_only_what_images_show():
    plain = synth_plan.make_plan(TINY)
    assert plain.everyday_scenes == frozenset()
    assert plain.num_landmark_scenes == len(plain.train_landmarks) + len(plain.novel_landmarks)
    # Without the options, each landmark is one scene and noise shows no landmark.
    assert all(plain.shows(it) in (it.landmark_id, -1) for it in plain.items)
    rich = synth_plan.make_plan(dataclasses.replace(
        TINY, facets=3, noise_other_landmarks=0.5, nonlandmark_style="everyday"))
    def key(it):
        return it.split, it.id, it.landmark_id, it.serial
    assert [key(it) for it in rich.items] == [key(it) for it in plain.items]
    assert (rich.usage, rich.clean) == (plain.usage, plain.clean)
    assert [it.scene for it in rich.items] != [it.scene for it in plain.items]
