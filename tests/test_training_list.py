"""--exclude_landmarks: images of listed landmarks are skipped (local and Beam converters), the
list's path and sha256 land in dataset_info.json, travel through workdir/export/embedding set,
and landmark-evaluate prints them beside every revisitop score."""

import dataclasses
import hashlib
import importlib.util
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from landmark_tf.data import beam_convert, convert, provenance, records
from landmark_tf.errors import UserError
from landmark_tf.retrieval.embeddings import open_embeddings, write_embeddings
from landmark_tf.retrieval.evaluation import EvalConfig, evaluate

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_convert import COUNTS, _config, _read_split, make_dataset  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("excl"), COUNTS, bad=False)


def _list(tmp_path, text, name="exclude.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_exclusion_list_formats_and_bad_lines(tmp_path):
    plain = provenance.read_exclusion_list(_list(tmp_path, "# overlap\n301\n\n17\n"))
    assert plain.landmark_ids == {301, 17}
    table = provenance.read_exclusion_list(
        _list(tmp_path, "name,landmark_id\nRadcliffe Camera,4242\nLouvre,9\n", "t.csv"))
    assert table.landmark_ids == {4242, 9}
    assert table.sha256 == hashlib.sha256((tmp_path / "t.csv").read_bytes()).hexdigest()
    with pytest.raises(UserError, match=r"bad.txt:2: 'x12' is not a landmark id"):
        provenance.read_exclusion_list(_list(tmp_path, "1\nx12\n", "bad.txt"))
    with pytest.raises(UserError, match="lists no landmark id"):
        provenance.read_exclusion_list(_list(tmp_path, "# nothing\n", "empty.txt"))


def test_excluded_landmarks_are_skipped_counted_and_recorded(small, tmp_path):
    excl = _list(tmp_path, "301\n999\n")
    out = tmp_path / "out"
    summary = convert.convert_dataset(_config(small, out, exclude_landmarks=excl),
                                      progress=False)
    info = records.load_dataset_info(str(out))
    assert summary["classes"] == 2  # 17 and 4242 (5 has too few images)
    assert summary["skipped_by_reason"] == {"excluded landmark": COUNTS[301]}
    landmarks = {int(ex["image/class/landmark_id"]) for split in ("train", "val")
                 for ex in _read_split(out, info, split)}
    assert 301 not in landmarks and landmarks == {17, 4242}
    rec = info[provenance.KEY]
    assert rec["exclude_landmarks"] == {
        "path": excl, "sha256": hashlib.sha256(b"301\n999\n").hexdigest(),
        "landmarks_listed": 2, "landmarks_excluded": 1, "images_excluded": COUNTS[301]}
    assert rec["train_csv"].endswith("train.csv")
    # Another list's content at the same path is another conversion.
    _list(tmp_path, "17\n")
    with pytest.raises(UserError, match="other settings"):
        convert.convert_dataset(_config(small, out, exclude_landmarks=excl), progress=False)


def test_without_a_list_the_record_says_so(small, tmp_path):
    convert.convert_dataset(_config(small, tmp_path), progress=False)
    rec = provenance.find(str(tmp_path))
    assert rec["exclude_landmarks"] is None
    assert "no landmark exclusion list" in provenance.describe(rec)
    assert provenance.describe(None) == provenance.UNKNOWN


@pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                    reason="apache-beam not installed")
def test_beam_runner_honours_the_list(small, tmp_path):
    excl = _list(tmp_path, "301\n")
    local = tmp_path / "local"
    convert.convert_dataset(_config(small, local, exclude_landmarks=excl), progress=False)
    cfg = dataclasses.replace(_config(small, tmp_path / "beam", exclude_landmarks=excl))
    beam_convert.convert_dataset_beam(cfg, "DirectRunner", [], progress=False)
    a, b = (records.load_dataset_info(str(p)) for p in (local, tmp_path / "beam"))
    assert a[provenance.KEY] == b[provenance.KEY] and a["skipped"] == b["skipped"]
    assert a["splits"] == b["splits"]


def test_workdir_and_export_records_resolve(small, tmp_path):
    excl = _list(tmp_path, "301\n")
    data = tmp_path / "data"
    convert.convert_dataset(_config(small, data, exclude_landmarks=excl), progress=False)
    want = records.load_dataset_info(str(data))[provenance.KEY]
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": {}, "data": {"data_dir": str(data)}}))
    assert provenance.find(str(workdir)) == want  # a workdir from before the key: via data_dir
    export = tmp_path / "export"
    export.mkdir()
    (export / "metadata.json").write_text(json.dumps({provenance.KEY: want}))
    assert provenance.find(str(export)) == want
    assert provenance.combine([want, None]) == {"members": [want, None]}
    assert "member 1: " + provenance.UNKNOWN in provenance.describe({"members": [want, None]})


def _revisitop_files(tmp_path, record):
    rng = np.random.default_rng(0)
    db = rng.normal(size=(6, 4)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    names = [f"d{i}" for i in range(6)]
    gnd = {"imlist": names, "qimlist": ["q0"],
           "gnd": [{"easy": [0], "hard": [1], "junk": [], "bbx": [0, 0, 1, 1]}]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    index, queries = str(tmp_path / "db.npz"), str(tmp_path / "q.npz")
    write_embeddings(index, names, [db], 6, 4, training_list=record)
    write_embeddings(queries, ["q0"], [db[:1]], 1, 4, training_list=record)
    return dict(index=index, queries=queries, revisitop_gnd=str(tmp_path / "gnd.pkl"))


def test_evaluate_prints_the_list_beside_every_revisitop_score(tmp_path):
    rec = provenance.record("train.csv", "", provenance.ExclusionList(
        "rgldv2_overlap.txt", "ab" * 32, frozenset({1, 2})), 2, 40)
    files = _revisitop_files(tmp_path, rec)
    with open_embeddings(files["index"]) as es:
        assert es.training_list == rec
    cmd = [sys.executable, "-m", "landmark_tf.cli.evaluate"] + [
        f"--{k}={v}" for k, v in files.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "revisitop mAP" in ln]
    assert len(lines) == 3 and all("rgldv2_overlap.txt (sha256 abababababab" in ln
                                    for ln in lines)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["revisitop_training_record"] == rec
    (tmp_path / "unknown").mkdir()
    plain = _revisitop_files(tmp_path / "unknown", None)
    r = evaluate(EvalConfig(**plain))
    assert r["revisitop_training_list"] == provenance.UNKNOWN
    export = tmp_path / "export"
    export.mkdir()
    (export / "metadata.json").write_text(json.dumps({provenance.KEY: rec}))
    named = evaluate(EvalConfig(**plain, training_data=str(export)))
    assert named["revisitop_training_record"] == rec
    with pytest.raises(UserError, match="not a landmark-tfrecords output"):
        evaluate(EvalConfig(**plain, training_data=str(tmp_path / "unknown")))


def test_cli_flag_reaches_the_plan(small, tmp_path):
    bad = _list(tmp_path, "301\nRadcliffe\n")
    proc = subprocess.run(
        [sys.executable, "-m", "landmark_tf.cli.tfrecords",
         f"--train_csv={small['root']}/train.csv", f"--image_dir={small['root']}/img",
         f"--output_dir={tmp_path}/out",
         f"--exclude_landmarks={bad}", "--noprogress"],
        capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "landmark-tfrecords" in ln]
    assert proc.returncode == 2 and "exclude.txt:2: 'Radcliffe' is not a landmark id" in lines[-1]
