"""gldv2: CSV formats and their errors, clean flags, filtering, relabelling, split, shards."""

import collections

import pytest

from landmark_tf.data import gldv2, planning
from landmark_tf.errors import UserError


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _ids(n, prefix="a"):
    return [f"{prefix}{i:05x}" for i in range(n)]


def test_train_csv_with_bom_and_quoted_commas(tmp_path):
    path = _write(tmp_path, "train.csv",
                  '\ufeffid,url,landmark_id\nabc001,"http://x/a,b.jpg",12\n\nabc002,u,7\n')
    kind, rows = gldv2.read_csv(path)
    assert kind == "train"
    assert [(r.image_id, r.landmark_id, r.line) for r in rows] == [
        ("abc001", 12, 2), ("abc002", 7, 4)]


def test_clean_csv_expands_image_lists(tmp_path):
    path = _write(tmp_path, "train_clean.csv", "landmark_id,images\n5,abc001 abc002\n9,abc003\n")
    kind, rows = gldv2.read_csv(path)
    assert kind == "clean"
    assert [(r.image_id, r.landmark_id) for r in rows] == [
        ("abc001", 5), ("abc002", 5), ("abc003", 9)]


def test_index_csv_is_unlabelled(tmp_path):
    kind, rows = gldv2.read_csv(_write(tmp_path, "index.csv", "id,url\nabc001,u\nabc002,u\n"))
    assert kind == "unlabelled" and {r.landmark_id for r in rows} == {-1}


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("image,label\nabc001,3\n", ":1:", "header"),
        ("id,url,landmark_id\nabc001,u,3\nabc002,u\n", ":3:", "expected 3 fields"),
        ("id,url,landmark_id\nabc001,u,3\nabc002,u,x7\n", ":3:", "not an integer"),
        ("id,url,landmark_id\nabc001,u,-4\n", ":2:", "negative"),
        ("id,url,landmark_id\nab,u,3\n", ":2:", "bad image id"),
        ("id,url,landmark_id\na/b/c,u,3\n", ":2:", "bad image id"),
        ("id,url,landmark_id\nabc001,u,3\nabc001,u,4\n", ":3:", "duplicate image id abc001"),
        ("landmark_id,images\n3,abc001 ab\n", ":2:", "bad image id"),
        ('id,url,landmark_id\nabc001,"u,3\n', ":", "expected 3 fields"),
        ("id,url,landmark_id\n", "", "no images"),
        ("", ":1:", "header"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, text, where, what):
    path = _write(tmp_path, "train.csv", text)
    with pytest.raises(UserError) as e:
        gldv2.read_csv(path)
    assert f"{path}{where}" in str(e.value) and what in str(e.value)


def test_missing_csv(tmp_path):
    with pytest.raises(UserError, match="not found"):
        gldv2.read_csv(str(tmp_path / "nope.csv"))


def test_clean_flags_and_landmark_mismatch(tmp_path):
    train = _write(tmp_path, "train.csv",
                   "id,url,landmark_id\nabc001,u,5\nabc002,u,5\nabc003,u,9\n")
    clean = _write(tmp_path, "clean.csv", "landmark_id,images\n5,abc002\n9,abc003 zzz999\n")
    plan = planning.build_plan(train_csv=train, clean_csv=clean)
    assert {ex.image_id: ex.is_clean for ex in plan.splits["train"]} == {
        "abc001": False, "abc002": True, "abc003": True}
    assert plan.stats["clean_ids_not_in_csv"] == 1
    bad = _write(tmp_path, "bad_clean.csv", "landmark_id,images\n5,abc001\n7,abc003\n")
    with pytest.raises(UserError, match=r"bad_clean.csv:3: image abc003 has landmark 7"):
        planning.build_plan(train_csv=train, clean_csv=bad)
    with pytest.raises(UserError, match="train_clean.csv header"):
        planning.build_plan(train_csv=train, clean_csv=train)


def _rows(counts):
    rows, n = [], 0
    for landmark, count in counts.items():
        for _ in range(count):
            rows.append(gldv2.Row(f"img{n:05d}", landmark, n + 2))
            n += 1
    return rows


def test_filter_and_contiguous_relabel():
    rows = _rows({1000: 5, 3: 2, 77: 4, 5: 1})
    assert planning.label_map(rows, 1) == {3: 0, 5: 1, 77: 2, 1000: 3}
    labels = planning.label_map(rows, 3)
    assert labels == {77: 0, 1000: 1}
    examples = planning.labelled_examples(rows, [True] * len(rows), labels)
    assert len(examples) == 9 and {ex.label for ex in examples} == {0, 1}


def test_stratified_split_per_landmark():
    counts = {10: 40, 11: 20, 12: 9, 13: 1, 14: 10}
    rows = _rows(counts)
    labels = planning.label_map(rows, 1)
    examples = planning.labelled_examples(rows, [True] * len(rows), labels)
    train, val = planning.stratified_split(examples, 0.1, seed=3)
    val_counts = collections.Counter(ex.landmark_id for ex in val)
    train_counts = collections.Counter(ex.landmark_id for ex in train)
    assert dict(val_counts) == {10: 4, 11: 2, 14: 1}  # floor(n * 0.1); 9 and 1 stay in train
    assert train_counts == {k: v - val_counts[k] for k, v in counts.items()}
    assert {ex.image_id for ex in train}.isdisjoint(ex.image_id for ex in val)
    assert planning.stratified_split(list(reversed(examples)), 0.1, seed=3) == (train, val)
    assert planning.stratified_split(examples, 0.1, seed=4)[1] != val
    assert planning.stratified_split(examples, 0.0, seed=3) == (sorted(examples), [])


def test_assign_shards_shuffles_and_balances():
    rows = _rows({1: 30, 2: 30, 3: 30})
    examples = planning.labelled_examples(rows, [True] * 90, planning.label_map(rows, 1))
    shards = planning.assign_shards(examples, 4, seed=0, split="train")
    assert sorted(len(s) for s in shards) == [22, 22, 23, 23]
    assert sorted(ex for s in shards for ex in s) == sorted(examples)
    assert all(len({ex.label for ex in s}) == 3 for s in shards)  # no shard is one landmark
    assert planning.assign_shards(list(reversed(examples)), 4, 0, "train") == shards
    assert planning.assign_shards(examples, 4, 1, "train") != shards


def test_build_plan_labelled_and_unlabelled(tmp_path):
    lines = [f"{i},u,{lm}" for lm, n in ((8, 30), (9, 12), (4, 3)) for i in _ids(n, f"l{lm}")]
    train = _write(tmp_path, "train.csv", "id,url,landmark_id\n" + "\n".join(lines) + "\n")
    plan = planning.build_plan(train_csv=train, min_images_per_class=5, val_fraction=0.1, seed=0)
    assert plan.label_map == {8: 0, 9: 1}
    assert (len(plan.splits["train"]), len(plan.splits["val"])) == (38, 4)
    assert plan.stats == {"csv_rows": 45, "classes_dropped": 1, "rows_dropped": 3}
    again = planning.build_plan(train_csv=train, min_images_per_class=5, val_fraction=0.1, seed=0)
    assert again.digest() == plan.digest()
    other = planning.build_plan(train_csv=train, min_images_per_class=5, val_fraction=0.1, seed=1)
    assert other.digest() != plan.digest()
    with pytest.raises(UserError, match="no landmark has at least 50"):
        planning.build_plan(train_csv=train, min_images_per_class=50)
    index = _write(tmp_path, "index.csv", "id,url\nabc001,u\nabc002,u\n")
    plan = planning.build_plan(csv=index, split="index")
    assert [ex.label for ex in plan.splits["index"]] == [-1, -1] and plan.label_map == {}
    with pytest.raises(UserError, match="no landmark_id column"):
        planning.build_plan(train_csv=index)


def test_image_path():
    assert gldv2.image_path("gs://b/train", "abcdef12") == "gs://b/train/a/b/c/abcdef12.jpg"
