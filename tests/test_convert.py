"""convert: round trip, skipped inputs, reruns, resume after kill -9, worker-count invariance."""

import collections
import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from landmark_tf.data import convert, gldv2, images, output_dir, records
from landmark_tf.data.workers import WorkerDied, Workers
from landmark_tf.errors import UserError

# landmark id -> number of CSV rows; 5 has too few images for min_images_per_class=3.
COUNTS = {301: 12, 17: 9, 4242: 8, 5: 2}
BAD = {"trunc": "corrupt", "empty": "empty", "missing": "missing", "text": "not_an_image"}
BAD_LANDMARK = 17


def _jpeg(rng, h, w, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _put(image_dir: Path, image_id: str, data: bytes) -> None:
    path = Path(gldv2.image_path(str(image_dir), image_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_dataset(root: Path, counts: dict, size=(24, 32), bad=True, seed=0) -> dict:
    """Images at root/img/a/b/c/<id>.jpg, root/train.csv and root/train_clean.csv (every second
    image). With `bad`, four images of BAD_LANDMARK are broken (see BAD)."""
    rng = np.random.default_rng(seed)
    rows, clean = [], collections.defaultdict(list)
    for landmark, n in counts.items():
        for i in range(n):
            image_id = f"{landmark:04x}{i:03x}{rng.integers(1 << 32):08x}"
            rows.append(f"{image_id},http://x/{image_id}.jpg,{landmark}")
            if i % 2 == 0:
                clean[landmark].append(image_id)
            _put(root / "img", image_id, _jpeg(rng, *size, quality=90))
    ids = [r.split(",")[0] for r in rows if r.endswith(f",{BAD_LANDMARK}")]
    if bad:
        _put(root / "img", ids[0], _jpeg(rng, 40, 40)[:-200])  # truncated
        _put(root / "img", ids[1], b"")
        os.remove(gldv2.image_path(str(root / "img"), ids[2]))
        _put(root / "img", ids[3], b"<html>404 not found</html>")
        buf = io.BytesIO()  # valid, but PNG bytes behind .jpg, and grayscale: both kept
        Image.new("L", (20, 10), 90).save(buf, "PNG")
        _put(root / "img", ids[4], buf.getvalue())
    (root / "train.csv").write_text("id,url,landmark_id\n" + "\n".join(rows) + "\n")
    (root / "train_clean.csv").write_text(
        "landmark_id,images\n" + "".join(f"{k},{' '.join(v)}\n" for k, v in clean.items()))
    return {"root": root, "bad_ids": dict(zip(BAD, ids[:4], strict=bad)), "rows": rows,
            "clean": {i for v in clean.values() for i in v}}


def _config(data, out, **kw) -> convert.ConvertConfig:
    settings = dict(
        train_csv=str(data["root"] / "train.csv"), clean_csv=str(data["root"] / "train_clean.csv"),
        image_dir=str(data["root"] / "img"), output_dir=str(out), min_images_per_class=3,
        val_fraction=0.25, seed=7, max_image_side=20, jpeg_quality=80, num_shards=3,
    )
    return convert.ConvertConfig(**{**settings, **kw})


def _read_split(out: Path, info: dict, split: str) -> list[dict]:
    files = records.split_files(str(out), info, split)
    return [{k: v.numpy() for k, v in records.parse_example(r).items()}
            for r in tf.data.TFRecordDataset(files)]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("small"), COUNTS)


def test_round_trip_counts_split_and_skips(small, tmp_path):
    summary = convert.convert_dataset(_config(small, tmp_path), progress=False)
    info = records.load_dataset_info(str(tmp_path))
    assert summary["classes"] == info["num_classes"] == 3 and summary["skipped"] == 4
    assert {s["id"]: s["reason"].split(":")[0] for s in info["skipped"]} == {
        small["bad_ids"][k]: v for k, v in BAD.items()}
    assert all(s["path"].endswith(f"/{s['id']}.jpg") for s in info["skipped"])
    landmarks = {int(r.split(",")[2]) for r in small["rows"]} - {5}
    label_of = {lm: i for i, lm in enumerate(sorted(landmarks))}  # contiguous, ascending ids
    source_of = {r.split(",")[0]: int(r.split(",")[2]) for r in small["rows"]}
    per_split = {}
    for split in ("train", "val"):
        examples = _read_split(tmp_path, info, split)
        assert len(examples) == info["splits"][split]["examples"]
        for ex in examples:
            image_id = ex["image/id"].decode()
            raw = Path(gldv2.image_path(str(small["root"] / "img"), image_id)).read_bytes()
            assert (ex["image/encoded"], ex["image/height"], ex["image/width"]) == \
                images.convert(raw, 20, 80)
            assert ex["image/class/landmark_id"] == source_of[image_id]
            assert ex["image/class/label"] == label_of[source_of[image_id]]
            assert ex["image/is_clean"] == (image_id in small["clean"])
        counts = collections.Counter(int(ex["image/class/label"]) for ex in examples)
        assert [counts[c] for c in range(3)] == info["splits"][split]["class_counts"]
        not_clean = collections.Counter(int(ex["image/class/label"]) for ex in examples
                                        if not ex["image/is_clean"])
        assert sum(not_clean.values()) > 0  # the weights of --not_clean_weight need these
        assert [not_clean[c] for c in range(3)] == \
            info["splits"][split]["not_clean_class_counts"]
        per_split[split] = counts
    assert info["class_counts"] == info["splits"]["train"]["class_counts"]
    for lm, n in COUNTS.items():  # stratified: floor(n * 0.25) of every landmark in val
        if lm in label_of and lm != BAD_LANDMARK:
            c = label_of[lm]
            assert (per_split["val"][c], per_split["train"][c]) == (n // 4, n - n // 4)
    c = label_of[BAD_LANDMARK]
    assert per_split["val"][c] + per_split["train"][c] == COUNTS[BAD_LANDMARK] - 4
    label_map = (tmp_path / "label_map.csv").read_text().splitlines()
    assert label_map[0] == "label,landmark_id,count"
    assert label_map[1:] == [f"{label_of[lm]},{lm},{per_split['train'][label_of[lm]]}"
                             for lm in sorted(label_of)]


def test_rerun_same_flags_does_nothing_other_flags_error(small, tmp_path):
    convert.convert_dataset(_config(small, tmp_path), progress=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    again = convert.convert_dataset(_config(small, tmp_path), progress=False)
    assert again["up_to_date"] and again["shards_written"] == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    with pytest.raises(UserError, match=r"other settings.*--max_image_side 20 -> 16"):
        convert.convert_dataset(_config(small, tmp_path, max_image_side=16), progress=False)
    changed = convert.convert_dataset(
        _config(small, tmp_path, num_shards=2, overwrite=True), progress=False)
    assert changed["shards"] == 3  # train 2 + val 1; the old 3 train shards are gone
    assert sorted(p.name for p in tmp_path.glob("*.tfrec")) == [
        "train-00000-of-00002.tfrec", "train-00001-of-00002.tfrec", "val-00000-of-00001.tfrec"]


def test_resume_rewrites_only_missing_shards_and_cleans_temporaries(small, tmp_path):
    reference, out = tmp_path / "ref", tmp_path / "out"
    convert.convert_dataset(_config(small, reference), progress=False)
    convert.convert_dataset(_config(small, out), progress=False)
    (out / "train-00001-of-00003.tfrec").unlink()  # as if killed before its rename
    (out / "dataset_info.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in out.glob("*.tfrec")}
    (out / ".tmp-0123456789ab-train-00001-of-00003.tfrec").write_bytes(b"partial")
    summary = convert.convert_dataset(_config(small, out), progress=False)
    assert (summary["shards_written"], summary["shards_kept"]) == (1, 3)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert _snapshot(out) == _snapshot(reference)


def test_bad_csv_fails_before_writing(small, tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text((small["root"] / "train.csv").read_text() + "abc999,http://x\n")
    with pytest.raises(UserError, match=rf"{bad}:\d+: expected 3 fields"):
        convert.convert_dataset(_config(small, tmp_path / "out", train_csv=str(bad)))
    assert not (tmp_path / "out").exists()


def test_foreign_output_and_bad_settings(small, tmp_path):
    (tmp_path / "train-00000-of-00001.tfrec").write_bytes(b"")
    with pytest.raises(UserError, match="no .landmark-tfrecords/manifest.json"):
        convert.convert_dataset(_config(small, tmp_path), progress=False)
    for bad in (dict(val_fraction=1.0), dict(jpeg_quality=0), dict(csv="x.csv"),
                dict(split="index")):
        with pytest.raises(UserError):
            convert.convert_dataset(_config(small, tmp_path / "o", **bad), progress=False)


def test_unlabelled_split(small, tmp_path):
    index = tmp_path / "index.csv"
    index.write_text("id,url\n" + "".join(f"{r.split(',')[0]},u\n" for r in small["rows"][:6]))
    cfg = _config(small, tmp_path / "out", train_csv="", clean_csv="", csv=str(index),
                  split="index", min_images_per_class=1, val_fraction=0.0, num_shards=0)
    summary = convert.convert_dataset(cfg, progress=False)
    info = records.load_dataset_info(str(tmp_path / "out"))
    assert (summary["examples"], info["num_classes"], info["class_counts"]) == (6, 0, [])
    assert info["splits"]["index"]["shards"] == ["index-00000-of-00001.tfrec"]
    examples = _read_split(tmp_path / "out", info, "index")
    assert {(int(e["image/class/label"]), int(e["image/class/landmark_id"])) for e in examples} \
        == {(-1, -1)}
    assert (tmp_path / "out" / "label_map.csv").read_text() == "label,landmark_id,count\n"


def test_shard_counts_and_size_estimate(small, tmp_path):
    counts = output_dir.shard_counts
    assert counts({"train": 1000, "val": 100}, 0, 1.0, 5000) == {"train": 5, "val": 1}
    assert counts({"train": 1000, "val": 100}, 8, 1.0, 0) == {"train": 8, "val": 1}
    assert output_dir.shard_counts({"train": 3}, 10, 1.0, 0) == {"train": 3}
    assert output_dir.shard_counts({"train": 3}, 0, 1.0, 0.0) == {"train": 1}
    target = 3000  # bytes: a few examples per shard
    cfg = _config(small, tmp_path, num_shards=0, val_fraction=0.0, shard_size_mb=target / 1e6)
    convert.convert_dataset(cfg, progress=False)
    sizes = [p.stat().st_size for p in tmp_path.glob("train-*.tfrec")]
    assert len(sizes) > 3 and 0.5 * target < sum(sizes) / len(sizes) < 1.5 * target


def _square_or_fail(x, progress=None):
    if x == 3:
        raise UserError("three is bad")
    if x == 4:
        os._exit(7)  # as if killed for memory
    if progress:
        progress()
    return x * x


def test_workers_keep_order_and_report_errors_and_deaths():
    ticks, xs = [], [i for i in range(20) if i not in (3, 4)]
    with Workers(2) as workers:
        squares = workers.map(_square_or_fail, [(x,) for x in xs], on_progress=ticks.append)
        assert squares == [x * x for x in xs] and sum(ticks) == len(xs)
        with pytest.raises(UserError, match="three is bad"):
            workers.map(_square_or_fail, [(1,), (3,)])
    with Workers(2) as workers, pytest.raises(WorkerDied, match="exit code 7"):
        workers.map(_square_or_fail, [(4,), (1,)])


# --- subprocess runs: 2 workers, and kill -9 then resume -------------------------------------

HEAVY = {11: 12, 22: 12, 33: 12, 44: 12}


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """Larger noise images (~10 ms each to convert), so a run lasts long enough to be killed."""
    data = make_dataset(tmp_path_factory.mktemp("heavy"), HEAVY, size=(360, 480), bad=False)
    reference = data["root"] / "reference"
    convert.convert_dataset(_heavy_config(data, reference, num_workers=1), progress=False)
    return data, _snapshot(reference)


def _heavy_config(data, out, **kw):
    return _config(data, out, clean_csv="", max_image_side=240, num_shards=8, **kw)


def _cli(data, out, workers):
    cfg = _heavy_config(data, out)
    args = [f"--train_csv={cfg.train_csv}", f"--image_dir={cfg.image_dir}",
            f"--output_dir={out}", f"--min_images_per_class={cfg.min_images_per_class}",
            f"--val_fraction={cfg.val_fraction}", f"--seed={cfg.seed}",
            f"--max_image_side={cfg.max_image_side}", f"--jpeg_quality={cfg.jpeg_quality}",
            f"--num_shards={cfg.num_shards}", f"--num_workers={workers}", "--noprogress"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", "landmark_tf.cli.tfrecords", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_give_identical_bytes(heavy, tmp_path):
    data, reference = heavy
    proc = _cli(data, tmp_path, workers=2)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["shards_written"] == summary["shards"] == _num_shards(reference) == 11
    assert _snapshot(tmp_path) == reference
    proc = _cli(data, tmp_path, workers=2)  # the same command again: nothing to do, and says so
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "nothing to do" in stderr
    assert json.loads(stdout.splitlines()[-1])["up_to_date"] is True


def _finished_shards(out: Path) -> list[str]:
    return [n for n in os.listdir(out) if records.parse_shard_name(n)]  # not .tmp-* names


def _num_shards(snapshot: dict) -> int:
    return sum(1 for name in snapshot if records.parse_shard_name(name))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_kill_9_then_rerun_equals_uninterrupted_run(heavy, tmp_path):
    data, reference = heavy
    proc = _cli(data, tmp_path, workers=2)
    deadline = time.monotonic() + 300
    while not _finished_shards(tmp_path) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    while any(_alive(int(c)) for c in children):  # workers die with the parent (PDEATHSIG)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    done = len(_finished_shards(tmp_path))
    assert 1 <= done < _num_shards(reference) and not (tmp_path / "dataset_info.json").exists()
    summary = convert.convert_dataset(_heavy_config(data, tmp_path, num_workers=1),
                                      progress=False)
    assert summary["shards_kept"] == done and summary["shards_written"] == 11 - done
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    assert _snapshot(tmp_path) == reference


def test_dataset_info_has_not_clean_counts_only_when_every_report_has_them():
    plan = types.SimpleNamespace(label_map={10: 0, 11: 1}, stats={}, skipped=[],
                                 training_list=None)
    new = {"shard": "train-00000-of-00002.tfrec", "examples": 3, "skipped": [],
           "label_counts": {"0": 2, "1": 1}, "not_clean_label_counts": {"0": 1}}
    also_new = {**new, "shard": "train-00001-of-00002.tfrec", "not_clean_label_counts": {"1": 1}}
    info = output_dir.dataset_info(plan, {}, [new, also_new])
    assert info["splits"]["train"]["not_clean_class_counts"] == [1, 1]
    old = {k: v for k, v in also_new.items() if k != "not_clean_label_counts"}
    info = output_dir.dataset_info(plan, {}, [new, old])
    assert "not_clean_class_counts" not in info["splits"]["train"]
    assert info["splits"]["train"]["class_counts"] == [4, 2]
