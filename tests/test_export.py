"""landmark-export: Kaggle-format signatures, exactness against the embedding model, metadata,
fresh-process loading, atomic writes and refusals."""

import hashlib
import json
import os

import fixtures_export as fx
import numpy as np
import pytest
import tensorflow as tf

from landmark_tf.errors import UserError
from landmark_tf.serving import export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A B0 workdir exported by the CLI at 40 and 60 px (--image_size=40 --scales=1,1.5)."""
    return fx.shared(tmp_path_factory, "b0_export", fx.build_b0_export)


def test_closing_json_and_metadata(exported):
    result, export_dir = exported["result"], exported["dir"]
    assert result["export_dir"] == export_dir and result["embedding_dim"] == 16
    assert result["size_bytes"] == export.dir_size(export_dir) > 1_000_000
    assert result["exceeds_kaggle_limit"] is False
    assert f"{result['size_mb']:.1f} MB" in exported["stderr"]
    with open(os.path.join(export_dir, "metadata.json")) as f:
        meta = json.load(f)
    with open(os.path.join(exported["workdir"], "config.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert meta["format"] == "landmark-tf/savedmodel/v1" and meta["config_sha256"] == digest
    assert (meta["backbone"], meta["embedding_dim"], meta["step"]) == ("efficientnet-b0", 16, 5)
    assert (meta["image_size"], meta["trained_image_size"]) == (40, 32)
    assert meta["scales"] == [1.0, 1.5] and meta["input_sizes"] == [40, 60]
    assert not [n for n in os.listdir(os.path.dirname(export_dir)) if n.startswith(".tmp-")]


def test_loads_in_fresh_process_with_only_tensorflow(exported):
    r = exported["fresh"]
    assert r["signatures"] == ["serving_batch", "serving_default", "serving_padded"]
    assert r["inputs"] == ["input_image"] and r["outputs"] == ["global_descriptor"]
    assert r["shapes"] == [[16]] * 3 and r["dtypes"] == ["float32"]
    assert np.allclose(r["norms"], 1.0, atol=1e-5) and r["deterministic"] and r["distinct"]
    assert r["padded_max_diff"] < 1e-5 and r["batch_max_diff"] < 1e-5
    assert not r["landmark_tf_imported"]


def test_descriptor_equals_embedding_model(exported):
    """Multi-scale: mean of the model's outputs at 40 and 60 px, L2-normalised, within 1e-5."""
    got = np.load(os.path.join(exported["root"], "got.npz"))["default"]
    want = np.load(os.path.join(exported["root"], "want.npy"))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want[0] - want[1]).max() > 1e-4  # different images, different descriptors


def test_loads_in_tensorflow_2_2_with_the_same_descriptors(exported, tmp_path):
    """Kaggle GLR2020's rule: the submission loads in TF 2.2 (no warning), same descriptors."""
    assert exported["result"]["kaggle_contract_ok"] and exported["result"]["loads_in_tf"] == "2.2"
    r = fx.load_in_tf22(exported["dir"], fx.B0_SIZES, str(tmp_path / "tf22.npz"))
    assert r["signatures"] == ["serving_batch", "serving_default", "serving_padded"]
    assert r["padded_max_diff"] < 1e-5 and r["batch_max_diff"] < 1e-5
    want = np.load(os.path.join(exported["root"], "want.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "tf22.npz")["default"], want, atol=1e-4, rtol=0)


def test_refuses_to_overwrite_with_one_line(exported):
    before = os.stat(os.path.join(exported["dir"], "saved_model.pb")).st_mtime_ns
    proc = fx.run_cli("landmark-export", f"--workdir={exported['workdir']}",
                      f"--export_dir={exported['dir']}")  # fmt: skip
    fx.assert_one_line_error(proc, "already exists", "--overwrite")
    assert os.stat(os.path.join(exported["dir"], "saved_model.pb")).st_mtime_ns == before


def test_overwrite_replaces_whole_export(tmp_path):
    path = str(tmp_path / "e")
    fx.write_tiny_export(path, embedding_dim=8)
    with pytest.raises(UserError, match="--overwrite"):
        fx.write_tiny_export(path, embedding_dim=4)
    fx.write_tiny_export(path, embedding_dim=4, overwrite=True)
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["serving_default"](input_image=fx.random_image(40, 50, 0))
    assert out["global_descriptor"].shape == (4,)
    assert sorted(os.listdir(tmp_path)) == ["e"]  # no temporaries left beside


def test_overwrite_never_deletes_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not a SavedModel export"):
        export.check_target(str(tmp_path), overwrite=True)
    export.check_target(str(tmp_path / "missing"), overwrite=False)


def test_object_store_copy_writes_metadata_last(monkeypatch):
    """On stores without atomic rename (gs://; here TF's ram://), metadata.json comes last."""
    copied = []
    real_copy = tf.io.gfile.copy
    monkeypatch.setattr(tf.io.gfile, "copy", lambda s, d, overwrite=False: (
        copied.append(os.path.basename(d)), real_copy(s, d, overwrite))[1])  # fmt: skip
    path = "ram://landmark-export-test/e"
    fx.write_tiny_export(path)
    fx.write_tiny_export(path, embedding_dim=4, overwrite=True)
    assert copied[-1] == "metadata.json" and "saved_model.pb" in copied
    assert copied.count("metadata.json") == 2
    assert tf.io.gfile.listdir("ram://landmark-export-test/") in (["e"], ["e/"])
    assert export.read_metadata(path)["embedding_dim"] == 4


def test_warns_above_the_kaggle_limit(caplog):
    ok = {"ok": True, "tf_problems": [], "signature_problems": [], "loads_in_tf": "2.2"}
    big = export.summary("e", {"embedding_dim": 8, "kaggle": ok},
                         export.KAGGLE_GLR2020_LIMIT_BYTES + 1)
    assert big["exceeds_kaggle_limit"] and "above the 1000 MB Kaggle accepted" in caplog.text
    assert not big["kaggle_contract_ok"]
    bad = {**ok, "ok": False, "tf_problems": ["op DisableCopyOnRead is not in TensorFlow 2.2"]}
    small = export.summary("e", {"embedding_dim": 8, "kaggle": bad}, 10)
    assert not small["kaggle_contract_ok"] and small["loads_in_tf"] is None
    assert "not a valid Kaggle GLR2020 submission: op DisableCopyOnRead" in caplog.text
    assert not export.summary("e", {"embedding_dim": 8, "kaggle": ok}, 10)["exceeds_kaggle_limit"]


@pytest.mark.parametrize("scales", [[0.5], [0.0], [-1.0], [float("nan")], [float("inf")], []])
def test_bad_scales(scales):
    with pytest.raises(UserError, match="--scales"):
        export.scaled_sizes(32, scales)


def test_bad_flag_values_and_missing_workdir(tmp_path):
    with pytest.raises(UserError, match="--scales"):
        export.parse_float_list(["1", "x"], "--scales")
    cfg = export.ExportConfig(workdir=str(tmp_path / "nope"), export_dir=str(tmp_path / "e"))
    with pytest.raises(UserError, match="config.json"):
        export.export_model(cfg)
    with pytest.raises(UserError, match="not one of our exports|no metadata.json"):
        export.read_metadata(str(tmp_path))
