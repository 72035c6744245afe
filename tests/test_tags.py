"""Title tags: synthetic titles and hierarchy, keyword extraction, vocabulary, records with tags."""

import collections
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from landmark_tf.data import convert, records, tags
from landmark_tf.errors import UserError
from landmark_tf.synth import generator, scenes, titles
from landmark_tf.synth import plan as synth_plan

TINY = generator.SynthConfig(num_landmarks=6, min_images=6, max_images=12, image_size=32,
                             novel_landmarks=0, noisy_fraction=0.2, nonlandmark_images=0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generator.generate(TINY, str(root), progress=False)
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_recording_words_leaves_the_scene_unchanged():
    words = []
    a = scenes.make_scene(np.random.default_rng(5), words)
    b = scenes.make_scene(np.random.default_rng(5))
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.colors, b.colors)
    assert sum(w in titles.ROOF_HIERARCHY for w in words) == 1  # the main building's roof only
    assert any(w in scenes.COLOR_NAMES + ("white", "black", "grey") for w in words)


def test_titles_carry_noisy_scene_words(synth):
    plan = synth_plan.make_plan(TINY)
    rows = {r["id"]: r for r in _rows(synth / titles.ATTRIBUTION_FILE)}
    train = plan.split("train")
    assert sorted(rows) == sorted(it.id for it in train)
    assert list(rows.values())[0].keys() == {"id", "url", "author", "license", "title"}
    hits = total = 0
    for it in train:
        true = set(generator.scene_words(TINY, plan, it.scene))
        found = set(tags.keywords(rows[it.id]["title"]))
        hits += len(true & found)
        total += len(true)
    assert 0.5 < hits / total < 0.9  # most true words are there, some missing (MISSING = 0.3)
    wrong = [set(tags.keywords(r["title"])) & set(titles.WRONG_WORDS) for r in rows.values()]
    assert any(w - set(generator.scene_words(TINY, plan, it.scene)) for w, it
               in zip(wrong, sorted(train, key=lambda it: it.id), strict=True))  # some wrong


def test_hierarchy_lists_every_train_landmark_by_its_roof(synth):
    plan = synth_plan.make_plan(TINY)
    rows = _rows(synth / titles.HIERARCHY_FILE)
    assert [int(r["landmark_id"]) for r in rows] == sorted(plan.train_landmarks)
    names = {h for pair in titles.ROOF_HIERARCHY.values() for h in pair}
    assert all(r["supercategory"] in names and r["hierarchical_label"] in names for r in rows)


def test_keywords_drop_digits_stop_words_and_file_parts():
    assert tags.keywords("File:DSC01234 View of the Red Dome, Köln 2009.JPG") == [
        "view", "red", "dome", "köln"]
    assert tags.keywords("IMG_2001_x.jpg") == []


def test_vocabulary_keeps_the_document_frequency_window():
    counts = collections.Counter({"a1": 1, "bb": 3, "cc": 5, "dd": 9, "ee": 3})
    vocab = tags.vocabulary(counts, 10, min_df=3, max_df=0.5)
    assert vocab == [("cc", 5), ("bb", 3), ("ee", 3)]
    with pytest.raises(UserError):
        tags.vocabulary(counts, 10, min_df=0, max_df=0.5)


def _attribution(path, titles_by_id):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "url", "author", "license", "title"])
        for image_id, title in titles_by_id.items():
            w.writerow([image_id, "u", "a", "l", title])


def test_tag_table_maps_ids_in_any_order_and_refuses_duplicates(tmp_path):
    path = tmp_path / "a.csv"
    _attribution(path, {"zz1": "red dome", "aa2": "dome, fence", "mm3": "nothing 12"})
    vocab = [("dome", 2), ("red", 1), ("fence", 1)]
    table = tags.TagTable.from_csv(str(path), vocab)
    got = table.lookup(["aa2", "mm3", "zz1", "missing"])
    decoded = [None if g is None else np.frombuffer(g, "<i4").tolist() for g in got]
    assert decoded == [[0, 2], [], [1, 0], None]
    with open(path, "a") as f:
        f.write("aa2,u,a,l,again\n")
    with pytest.raises(UserError, match="aa2"):
        tags.TagTable.from_csv(str(path), vocab)
    (tmp_path / "bad.csv").write_text("id,url\nx,y\n")
    with pytest.raises(UserError, match="title"):
        tags.document_frequency(str(tmp_path / "bad.csv"))


def _examples(out):
    info = json.loads((out / "dataset_info.json").read_text())
    files = records.split_files(str(out), info, "train")
    spec = {"image/id": tf.io.FixedLenFeature([], tf.string),
            records.TAGS_FEATURE: tf.io.VarLenFeature(tf.int64)}
    got = {}
    for raw in tf.data.TFRecordDataset(files):
        ex = tf.io.parse_single_example(raw, spec)
        got[ex["image/id"].numpy().decode()] = tf.sparse.to_dense(ex[records.TAGS_FEATURE]).numpy()
    return info, got


def test_conversion_writes_tags_vocab_and_info(synth, tmp_path):
    rows = _rows(synth / titles.ATTRIBUTION_FILE)
    dropped = rows[0]["id"]
    _attribution(tmp_path / "attr.csv", {r["id"]: r["title"] for r in rows[1:]})
    cfg = convert.ConvertConfig(image_dir=str(synth / "train"), output_dir=str(tmp_path / "out"),
                                train_csv=str(synth / "train.csv"), num_shards=2,
                                attribution_csv=str(tmp_path / "attr.csv"), tag_min_df=2)
    convert.convert_dataset(cfg, progress=False)
    info, got = _examples(tmp_path / "out")
    vocab = _rows(tmp_path / "out" / tags.TAG_VOCAB)
    words = [v["tag"] for v in vocab]
    assert all(int(v["document_frequency"]) >= 2 for v in vocab)
    for r in rows[1:]:
        want = [words.index(w) for w in tags.keywords(r["title"]) if w in words]
        assert got[r["id"]].tolist() == want
    assert got[dropped].tolist() == []
    t = info["tags"]
    assert t["vocab_size"] == len(vocab) and t["min_df"] == 2
    assert t["examples_without_attribution"] == 1 and t["untagged_examples"] >= 1
    assert t["max_tags"] == max(len(v) for v in got.values())
    assert t["vocab_sha256"] == tags.vocab_sha256([(v["tag"], int(v["document_frequency"]))
                                                   for v in vocab])


def test_conversion_without_attribution_has_no_tags(synth, tmp_path):
    cfg = convert.ConvertConfig(image_dir=str(synth / "train"), output_dir=str(tmp_path / "o"),
                                train_csv=str(synth / "train.csv"), num_shards=1)
    convert.convert_dataset(cfg, progress=False)
    info = json.loads((tmp_path / "o" / "dataset_info.json").read_text())
    assert "tags" not in info and "tag_min_df" not in info["source"]
    assert not (tmp_path / "o" / tags.TAG_VOCAB).exists()
    raw = next(iter(tf.data.TFRecordDataset(records.split_files(str(tmp_path / "o"), info,
                                                                 "train"))))
    assert records.TAGS_FEATURE not in tf.train.Example.FromString(raw.numpy()).features.feature


def test_cli_bad_attribution_and_beam_are_one_line(synth, tmp_path):
    base = [sys.executable, "-m", "landmark_tf.cli.tfrecords", f"--train_csv={synth}/train.csv",
            f"--image_dir={synth}/train", f"--output_dir={tmp_path}/o", "--progress=false"]
    for extra in (["--attribution_csv=/nonexistent.csv"],
                  [f"--attribution_csv={synth}/train.csv"],
                  [f"--attribution_csv={synth}/{titles.ATTRIBUTION_FILE}", "--runner=beam"]):
        r = subprocess.run(base + extra, capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert "attribution" in last and "Traceback" not in r.stderr
