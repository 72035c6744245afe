"""landmark-embed: exactness against serving_default, ids/labels, skipped images, determinism,
resume after a kill, records and CSV sources, bad input."""

import io
import json
import os

import fixtures_export as fx
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from landmark_tf.data import images
from landmark_tf.errors import UserError
from landmark_tf.retrieval.embeddings import load_embeddings
from landmark_tf.serving import embed

# id -> (height, width): mixed sizes and aspect ratios, so batches need padding.
SIZES = {f"{i:x}{i:x}ab{i:04x}": (24 + 13 * i % 70, 30 + 29 * i % 90) for i in range(1, 15)}
BROKEN, MISSING, SHORT = "fffbroken0", "eeemissing0", "ab"


@pytest.fixture(scope="module")
def model():
    return fx.tiny_export("embed_model", image_size=32, embedding_dim=8, scales=(1.0, 1.5),
                          seed=3)[0]  # fmt: skip


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    """A CSV (id,landmark_id) over a GLDv2 image tree, with a truncated JPEG, a missing file and
    an id too short for the a/b/c layout."""
    root = tmp_path_factory.mktemp("set")
    image_dir = str(root / "images")
    fx.write_image_tree(image_dir, SIZES)
    broken = os.path.join(image_dir, "f", "f", "f")
    os.makedirs(broken)
    with open(os.path.join(broken, f"{BROKEN}.jpg"), "wb") as f:
        f.write(fx.jpeg(fx.random_image(40, 40, 0))[:300])
    ids = list(SIZES)
    ids[3:3] = [BROKEN, MISSING]
    ids.append(SHORT)
    labels = {image_id: (str(100 + i % 3) if i % 4 else "") for i, image_id in enumerate(ids)}
    csv_path = str(root / "set.csv")
    with open(csv_path, "w") as f:
        f.write("id,landmark_id\n" + "".join(f"{i},{labels[i]}\n" for i in ids))
    return {"csv": csv_path, "image_dir": image_dir, "ids": ids, "labels": labels}


def _cfg(model, image_set, output, **kw):
    return embed.EmbedConfig(model=model, output=str(output), csv=image_set["csv"],
                             image_dir=image_set["image_dir"], batch_size=4, chunk_size=5,
                             num_threads=2, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def first_run(model, image_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1") / "set.npz"
    return out, embed.embed_set(_cfg(model, image_set, out))


def test_embeds_every_readable_image_in_order_with_labels(first_run, image_set):
    out, result = first_run
    good = [i for i in image_set["ids"] if i in SIZES]
    assert (result["count"], result["dim"], result["skipped"]) == (len(good), 8, 3)
    es = load_embeddings(str(out))
    assert list(es.ids) == good
    want = [int(image_set["labels"][i] or -1) for i in good]
    assert es.landmark_ids is not None and list(es.landmark_ids) == want
    np.testing.assert_allclose(np.linalg.norm(es.embeddings, axis=1), 1.0, atol=1e-5)
    assert not os.path.exists(str(out) + ".parts")
    with open(result["skipped_list"]) as f:
        skipped = {s["id"]: s["reason"] for s in json.load(f)["skipped"]}
    assert set(skipped) == {BROKEN, MISSING, SHORT}
    assert "decode" in skipped[BROKEN] and "not found" in skipped[MISSING]
    assert "refused" in skipped[SHORT] and "3+ characters" in skipped[SHORT]


def test_rows_equal_serving_default_on_the_canonical_images(model, first_run, image_set):
    es = load_embeddings(str(first_run[0]))
    single = tf.saved_model.load(model).signatures["serving_default"]
    for image_id, row in zip(es.ids, es.embeddings, strict=True):
        path = os.path.join(image_set["image_dir"], *image_id[:3], f"{image_id}.jpg")
        with open(path, "rb") as f:
            image = tf.io.decode_jpeg(images.canonical_jpeg(f.read()), channels=3)
        want = single(input_image=image)["global_descriptor"].numpy()
        np.testing.assert_allclose(row, want, atol=1e-5, rtol=0)
    assert np.abs(es.embeddings[0] - es.embeddings[1]).max() > 1e-4


def test_second_run_and_resume_after_kill_give_the_same_file(model, image_set, first_run,
                                                             tmp_path, monkeypatch):  # fmt: skip
    reference = load_embeddings(str(first_run[0]))
    out = tmp_path / "set.npz"
    real_write = embed._write_npz
    writes = []

    def killed_at_third_part(path, arrays):
        if len(writes) == 2:
            raise KeyboardInterrupt  # as if killed while embedding chunk 3
        writes.append(path)
        real_write(path, arrays)

    monkeypatch.setattr(embed, "_write_npz", killed_at_third_part)
    with pytest.raises(KeyboardInterrupt):
        embed.embed_set(_cfg(model, image_set, out))
    parts = tmp_path / "set.npz.parts"
    assert sorted(os.listdir(parts)) == ["manifest.json", "part-000000.npz", "part-000001.npz"]
    (parts / ".tmp-0123456789ab-part-000002.npz").write_bytes(b"half a part")  # killed mid-write
    monkeypatch.setattr(embed, "_write_npz", real_write)
    embedded = []
    real_call = embed.Embedder.__call__
    monkeypatch.setattr(embed.Embedder, "__call__",
                        lambda self, images: (embedded.extend(images), real_call(self, images))[1])
    result = embed.embed_set(_cfg(model, image_set, out))
    assert len(embedded) == len(SIZES) - 8  # chunks 0 and 1 (10 rows, 2 skipped) were not redone
    resumed = load_embeddings(str(out))
    for key in ("ids", "embeddings", "landmark_ids"):
        assert np.array_equal(getattr(resumed, key), getattr(reference, key)), key
    assert result["count"] == len(reference) and result["skipped"] == 3
    assert not os.path.exists(parts)


def test_resume_with_other_settings_is_refused(model, image_set, tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "_merge", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        embed.embed_set(_cfg(model, image_set, tmp_path / "o.npz"))
    with pytest.raises(UserError, match="batch_size"):
        cfg = _cfg(model, image_set, tmp_path / "o.npz")
        cfg.batch_size = 3
        embed.embed_set(cfg)


def test_records_source_via_cli(model, tmp_path):
    """Two shards, one undecodable record; unlabelled (-1) records give no landmark_ids."""
    rows = [(f"rec{i:03d}", -1, fx.jpeg(fx.random_image(30 + 7 * i, 50 - 3 * i, i)))
            for i in range(7)]  # fmt: skip
    rows[4] = ("rec004", -1, b"not an image")
    fx.write_records(str(tmp_path / "index-00000-of-00002.tfrec"), rows[:3])
    fx.write_records(str(tmp_path / "index-00001-of-00002.tfrec"), rows[3:])
    out = tmp_path / "out" / "index.npz"
    proc = fx.run_cli("landmark-embed", f"--model={model}", f"--records={tmp_path}/index-*.tfrec",
                      f"--output={out}", "--batch_size=3", "--chunk_size=4")  # fmt: skip
    result = fx.closing_json(proc)
    assert (result["count"], result["dim"], result["skipped"]) == (6, 8, 1)
    assert result["images_per_second"] > 0
    es = load_embeddings(str(out))
    assert list(es.ids) == [r[0] for r in rows if r[0] != "rec004"] and es.landmark_ids is None
    single = tf.saved_model.load(model).signatures["serving_default"]
    image0 = tf.io.decode_image(rows[0][2], channels=3).numpy()
    want = single(input_image=image0)["global_descriptor"].numpy()
    np.testing.assert_allclose(es.embeddings[0], want, atol=1e-5, rtol=0)


def test_cli_bad_input_is_one_line_exit_2(model, tmp_path):
    proc = fx.run_cli("landmark-embed", f"--model={model}", f"--csv={tmp_path}/nope.csv",
                      f"--image_dir={tmp_path}", f"--output={tmp_path}/o.npz")  # fmt: skip
    fx.assert_one_line_error(proc, "nope.csv", "not found")


def test_foreign_kaggle_model_without_padded_signature(image_set, tmp_path):
    """Someone else's Kaggle-format SavedModel: embedded image by image via serving_default."""
    module = tf.Module()
    module.v = tf.Variable(tf.random.stateless_normal([3, 5], seed=[1, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="input_image")])
    def serve(input_image):
        x = tf.image.resize(tf.cast(input_image, tf.float32), [16, 16])
        pooled = tf.concat([tf.reduce_mean(x, [0, 1]), tf.math.reduce_std(x, [0, 1])], 0)
        mixed = tf.tensordot(pooled[:3], module.v, 1) + pooled[3]
        return {"global_descriptor": tf.math.l2_normalize(mixed)}

    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": serve})
    cfg = _cfg(str(tmp_path / "m"), image_set, tmp_path / "f.npz")
    result = embed.embed_set(cfg)
    assert (result["count"], result["dim"]) == (len(SIZES), 5)


@pytest.mark.parametrize("change, message", [
    ({"csv": None}, "either --records or --csv"),
    ({"records": "x*.tfrec"}, "not both"),
    ({"image_dir": None}, "--csv needs --image_dir"),
    ({"output": "out.txt"}, "must end with .npz"),
    ({"chunk_size": 0}, "--chunk_size"),
    ({"model": "/nonexistent/model"}, "not a SavedModel"),
])  # fmt: skip
def test_bad_config(model, image_set, tmp_path, change, message):
    cfg = _cfg(model, image_set, tmp_path / "o.npz")
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(UserError, match=message):
        embed.embed_set(cfg)


@pytest.mark.parametrize("text, message", [
    ("image,landmark_id\nabc,1\n", "no 'id' column"),
    ("id,landmark_id\nabc,1\nabd,x\n", ":3: landmark_id 'x'"),
    ("id\nabc\nabd\nabc\n", ":4: id abc already on line 2"),
])  # fmt: skip
def test_bad_csv_names_file_and_line(model, tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    cfg = embed.EmbedConfig(model=model, output=str(tmp_path / "o.npz"),
                            csv=str(tmp_path / "bad.csv"), image_dir=str(tmp_path))
    with pytest.raises(UserError, match=message):
        embed.embed_set(cfg)


@pytest.mark.slow
def test_efficientnet_export(tmp_path_factory, image_set, tmp_path):
    """The CSV set through a real B0 export (two scales): rows equal serving_default."""
    b0 = fx.shared(tmp_path_factory, "b0_export", fx.build_b0_export)
    result = embed.embed_set(_cfg(b0["dir"], image_set, tmp_path / "b0.npz"))
    assert (result["count"], result["dim"], result["skipped"]) == (len(SIZES), 16, 3)
    es = load_embeddings(str(tmp_path / "b0.npz"))
    single = tf.saved_model.load(b0["dir"]).signatures["serving_default"]
    for image_id, row in zip(es.ids, es.embeddings, strict=True):
        path = os.path.join(image_set["image_dir"], *image_id[:3], f"{image_id}.jpg")
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        want = single(input_image=image)["global_descriptor"].numpy()
        np.testing.assert_allclose(row, want, atol=1e-5, rtol=0)


def _exif_rotated_jpeg(height: int, width: int) -> bytes:
    """A photo stored sideways, as cameras do: pixels [width, height] plus EXIF orientation 6
    (display rotated 90 degrees clockwise), larger than the converter's 800 px."""
    upright = fx.random_image(height, width, seed=11)
    upright[: height // 3] = (250, 30, 30)  # a red sky: which way is up matters to the model
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # as the sensor saw
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_exif_rotated_photo_gets_the_same_descriptor_from_records_and_csv(model, tmp_path):
    """Train and serve see the same pixels: the converter's record of the photo (--records) and
    the original file (--csv) give the same descriptor; a plain decode of the file would not."""
    raw = _exif_rotated_jpeg(900, 1200)
    image_id = "abc0123rotated"
    folder = tmp_path / "images" / "a" / "b" / "c"
    folder.mkdir(parents=True)
    (folder / f"{image_id}.jpg").write_bytes(raw)
    (tmp_path / "set.csv").write_text(f"id\n{image_id}\n")
    encoded, height, width = images.convert(raw, 800, 90)  # what landmark-tfrecords stores
    assert (height, width) == (600, 800)
    fx.write_records(str(tmp_path / "index-00000-of-00001.tfrec"), [(image_id, -1, encoded)])
    rows = {}
    for name, source in (("records", dict(records=str(tmp_path / "index-*.tfrec"))),
                         ("csv", dict(csv=str(tmp_path / "set.csv"),
                                      image_dir=str(tmp_path / "images")))):
        out = tmp_path / f"{name}.npz"
        embed.embed_set(embed.EmbedConfig(model=model, output=str(out), batch_size=2,
                                          num_threads=1, **source))
        rows[name] = load_embeddings(str(out)).embeddings[0]
    np.testing.assert_allclose(rows["csv"], rows["records"], atol=1e-5, rtol=0)
    single = tf.saved_model.load(model).signatures["serving_default"]
    plain = single(input_image=tf.io.decode_jpeg(raw, channels=3))["global_descriptor"].numpy()
    assert np.abs(plain - rows["records"]).max() > 1e-3  # sideways and unshrunk: not the same


def test_revisitop_queries_are_cropped_to_bbx_and_evaluate_reports_it(model, tmp_path):
    """The published protocol: each qimlist image is described from its bbx crop (PIL rounding);
    the database images whole. landmark-evaluate counts the cropped queries."""
    import pickle

    from landmark_tf.retrieval.evaluation import EvalConfig, evaluate

    jpg = tmp_path / "jpg"
    jpg.mkdir()
    images = {name: fx.random_image(48 + 5 * i, 64 - 3 * i, i)
              for i, name in enumerate(["all_souls_1", "q_a", "q_b", "db_c"])}  # fmt: skip
    for name, image in images.items():
        (jpg / f"{name}.jpg").write_bytes(fx.jpeg(image))
    gnd = {"imlist": ["all_souls_1", "db_c"], "qimlist": ["q_a", "q_b"],
           "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [3.4, 5.6, 40.5, 33.0]},
                   {"easy": [1], "hard": [], "junk": [1], "bbx": [0.0, 2.0, 30.2, 41.7]}]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    common = dict(model=model, revisitop_gnd=str(tmp_path / "gnd.pkl"), image_dir=str(jpg))
    q = embed.embed_set(embed.EmbedConfig(output=str(tmp_path / "q.npz"), **common))
    embed.embed_set(embed.EmbedConfig(output=str(tmp_path / "db.npz"), revisitop_set="database",
                                      **common))  # fmt: skip
    assert q["count"] == 2
    single = tf.saved_model.load(model).signatures["serving_default"]
    es = load_embeddings(str(tmp_path / "q.npz"))
    for name, row, (x1, y1, x2, y2) in zip(es.ids, es.embeddings, ([3, 6, 40, 33], [0, 2, 30, 42]),
                                          strict=True):  # fmt: skip
        decoded = tf.io.decode_image((jpg / f"{name}.jpg").read_bytes(), channels=3).numpy()
        want = single(input_image=decoded[y1:y2, x1:x2])["global_descriptor"].numpy()
        np.testing.assert_allclose(row, want, atol=1e-5, rtol=0)
        whole = single(input_image=decoded)["global_descriptor"].numpy()
        assert np.abs(row - whole).max() > 1e-3  # the crop matters
    assert np.load(tmp_path / "q.npz")["cropped"].tolist() == [True, True]
    assert "cropped" not in np.load(tmp_path / "db.npz").files
    r = evaluate(EvalConfig(queries=str(tmp_path / "q.npz"), index=str(tmp_path / "db.npz"),
                            revisitop_gnd=str(tmp_path / "gnd.pkl")))  # fmt: skip
    assert r["revisitop_queries_cropped"] == 2 and r["revisitop_queries_uncropped"] == 0
