"""beam_convert: the Beam runner writes what the local converter writes, byte for byte."""

import dataclasses
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from landmark_tf.data import beam_convert, convert, gldv2, output_dir, planning, records
from landmark_tf.errors import UserError

needs_beam = pytest.mark.skipif(
    importlib.util.find_spec("apache_beam") is None,
    reason="apache-beam not installed (pip install landmark-tf[beam])")

COUNTS = {301: 9, 17: 7, 4242: 6, 5: 2}  # landmark 5 is dropped by min_images_per_class=3
BAD = {"corrupt": b"", "empty": b"", "missing": None, "not_an_image": b"<html>404</html>"}


def _jpeg(rng, h, w) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _put(image_dir: Path, image_id: str, data: bytes) -> None:
    path = Path(gldv2.image_path(str(image_dir), image_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """train.csv + image tree; four images of landmark 17 are broken (one per BAD reason) and
    one is a grayscale PNG behind .jpg (kept)."""
    root, rng = tmp_path_factory.mktemp("beam"), np.random.default_rng(0)
    rows = []
    for landmark, n in COUNTS.items():
        for i in range(n):
            image_id = f"{landmark:04x}{i:03x}{rng.integers(1 << 32):08x}"
            rows.append((image_id, landmark))
            _put(root / "img", image_id, _jpeg(rng, 24, 32))
    broken = [image_id for image_id, lm in rows if lm == 17][:5]
    bad = dict(zip(BAD, broken, strict=False))
    _put(root / "img", bad["corrupt"], _jpeg(rng, 40, 40)[:-200])  # truncated
    _put(root / "img", bad["empty"], b"")
    os.remove(gldv2.image_path(str(root / "img"), bad["missing"]))
    _put(root / "img", bad["not_an_image"], BAD["not_an_image"])
    png = io.BytesIO()
    Image.new("L", (20, 10), 90).save(png, "PNG")
    _put(root / "img", broken[4], png.getvalue())
    random.Random(0).shuffle(rows)  # CSV order must not matter
    (root / "train.csv").write_text(
        "id,url,landmark_id\n" + "".join(f"{i},http://x/{i}.jpg,{lm}\n" for i, lm in rows))
    cfg = convert.ConvertConfig(
        train_csv=str(root / "train.csv"), image_dir=str(root / "img"), output_dir="",
        min_images_per_class=3, val_fraction=0.25, seed=3, max_image_side=20, jpeg_quality=85,
        num_shards=3)
    reference = root / "local"
    convert.convert_dataset(dataclasses.replace(cfg, output_dir=str(reference)), progress=False)
    return {"root": root, "cfg": cfg, "bad": bad, "reference": reference}


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _contents(out: Path) -> dict[str, set]:
    """Per split, the set of (id, label, encoded image) read back through records.py."""
    info = records.load_dataset_info(str(out))
    contents = {}
    for split in info["splits"]:
        parsed = (records.parse_example(r) for r in
                  tf.data.TFRecordDataset(records.split_files(str(out), info, split)))
        contents[split] = {(p["image/id"].numpy().decode(), int(p["image/class/label"]),
                            p["image/encoded"].numpy()) for p in parsed}
    return contents


def _beam(data, out, **kw) -> dict:
    cfg = dataclasses.replace(data["cfg"], output_dir=str(out), **kw)
    return beam_convert.convert_dataset_beam(cfg, "DirectRunner", [], progress=False)


@needs_beam
def test_direct_runner_equals_local_converter(data, tmp_path):
    summary = _beam(data, tmp_path)
    assert summary["beam"]["state"] == "DONE" and summary["shards_written"] == 4  # 3 + 1 val
    assert _contents(tmp_path) == _contents(data["reference"])
    info = records.load_dataset_info(str(tmp_path))
    assert {s["id"]: s["reason"].split(":")[0] for s in info["skipped"]} == {
        image_id: reason for reason, image_id in data["bad"].items()}
    assert summary["skipped_by_reason"] == dict.fromkeys(BAD, 1)
    # Stronger than the contract: every file, shard bytes, reports, manifest, label map.
    assert _snapshot(tmp_path) == _snapshot(data["reference"])
    assert not list(tmp_path.rglob(".tmp-*")) and not list(tmp_path.rglob(beam_convert.PLAN_FILE))


@needs_beam
def test_rerun_resume_and_cross_runner(data, tmp_path):
    _beam(data, tmp_path)
    again = _beam(data, tmp_path)
    assert again["up_to_date"] and again["beam"]["state"] == "NOT_RUN"
    local = convert.convert_dataset(dataclasses.replace(data["cfg"], output_dir=str(tmp_path)),
                                    progress=False)
    assert local["up_to_date"]  # one manifest: the local runner accepts the Beam output
    (tmp_path / "train-00002-of-00003.tfrec").unlink()
    (tmp_path / "dataset_info.json").unlink()
    (tmp_path / ".tmp-0123456789ab-train-00002-of-00003.tfrec").write_bytes(b"partial")
    resumed = _beam(data, tmp_path)
    assert (resumed["shards_written"], resumed["shards_kept"]) == (1, 3)
    assert _snapshot(tmp_path) == _snapshot(data["reference"])
    with pytest.raises(UserError, match="other settings"):
        _beam(data, tmp_path, jpeg_quality=50)
    changed = _beam(data, tmp_path, num_shards=2, overwrite=True)
    assert changed["shards"] == 3 and len(list(tmp_path.glob("*.tfrec"))) == 3


def _group(data, tmp_path):
    """The (shard, values) a GroupByKey hands the writer for the reference's first shard."""
    cfg = data["cfg"]
    plan = planning.build_plan(train_csv=cfg.train_csv, min_images_per_class=3, val_fraction=0.25,
                            seed=cfg.seed)
    examples = planning.assign_shards(plan.splits["train"], 3, cfg.seed, "train")[0]
    options = beam_convert.ImageOptions(cfg.max_image_side, cfg.jpeg_quality)
    lines = [json.dumps([0, i, e.image_id, e.label, e.landmark_id, int(e.is_clean)])
             for i, e in enumerate(examples)]
    import PIL

    values = [beam_convert.convert_line(line, cfg.image_dir, options, PIL.__version__)[1]
              for line in lines]
    name = records.shard_name("train", 0, 3)
    table = {0: (str(tmp_path / name), str(tmp_path / f"{name}.json"), len(values))}
    return values, table, name


@needs_beam
def test_shard_writer_is_idempotent_and_order_free(data, tmp_path):
    values, table, name = _group(data, tmp_path)
    state = data["reference"] / output_dir.STATE_DIR
    for seed in (1, 2):  # a retried bundle sees the group in another order: same bytes
        random.Random(seed).shuffle(values)
        assert beam_convert.write_grouped_shard((0, iter(values)), table) == name
        assert (tmp_path / name).read_bytes() == (data["reference"] / name).read_bytes()
        assert (tmp_path / f"{name}.json").read_bytes() == (state / f"{name}.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, f"{name}.json"]
    with pytest.raises(RuntimeError, match="expected 0"):
        beam_convert.write_grouped_shard((0, values + values[:1]), table)
    with pytest.raises(RuntimeError, match="the launcher 0.0"):
        beam_convert.convert_line("[0,0,\"abc\",0,1,1]", "x", None, "0.0")


@needs_beam
def test_bad_pipeline_options_fail_before_anything_is_written(data, tmp_path):
    out = tmp_path / "out"
    cfg = dataclasses.replace(data["cfg"], output_dir=str(out))
    bad = [
        ("DirectRunner", ["--regoin=x"], "unknown pipeline option --regoin"),
        ("DirectRunner", ["project=x"], "not a pipeline option"),
        ("DirectRunner", ["--runner=DataflowRunner"], "set by --beam_runner"),
        ("NoSuchRunner", [], "--beam_runner=NoSuchRunner"),
        ("DataflowRunner", ["--region=r --temp_location=gs://b/t"], "--project"),
        ("DataflowRunner", ["--project=p --region=r --temp_location=gs://b/t"], "gs:// path"),
    ]
    for runner, options, message in bad:
        with pytest.raises(UserError, match=message):
            beam_convert.convert_dataset_beam(cfg, runner, options, progress=False)
    gcs = dataclasses.replace(cfg, image_dir="gs://b/img", output_dir="gs://b/out")
    with pytest.raises(UserError, match="--sdk_container_image"):
        beam_convert.convert_dataset_beam(
            gcs, "DataflowRunner", ["--project=p --region=r --temp_location=gs://b/t"])
    assert not out.exists()


def test_missing_beam_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"pip install landmark-tf\[beam\]"):
        beam_convert.import_beam()


def _cli(data, out, *extra):
    cfg = data["cfg"]
    args = [f"--train_csv={cfg.train_csv}", f"--image_dir={cfg.image_dir}", f"--output_dir={out}",
            "--min_images_per_class=3", "--val_fraction=0.25", "--seed=3", "--max_image_side=20",
            "--jpeg_quality=85", "--num_shards=3", "--noprogress", *extra]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "landmark_tf.cli.tfrecords", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@needs_beam
def test_cli_runner_beam(data, tmp_path):
    proc = _cli(data, tmp_path, "--runner=beam", "--num_workers=1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert (summary["examples"], summary["skipped"], summary["beam"]["state"]) == (18, 4, "DONE")
    assert _snapshot(tmp_path) == _snapshot(data["reference"])


def test_cli_beam_flags_need_runner_beam(tmp_path):
    from landmark_tf.cli import tfrecords as cli

    try:
        cli.FLAGS(["landmark-tfrecords", "--beam_options=--project=p", "--train_csv=t.csv",
                   f"--image_dir={tmp_path}", f"--output_dir={tmp_path}"])
        with pytest.raises(UserError, match="--beam_options needs --runner=beam"):
            cli.main(["landmark-tfrecords"])
    finally:
        cli.FLAGS.unparse_flags()


@needs_beam
@pytest.mark.slow
def test_cli_direct_runner_two_processes(data, tmp_path):
    proc = _cli(data, tmp_path, "--runner=beam", "--num_workers=2")
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(tmp_path) == _snapshot(data["reference"])
