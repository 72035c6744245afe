"""The head-variant training options end to end on tiny records: dynamic margins from the data's
class counts, the factorised head and the n-pairs loss train, report head memory, and stage."""

import keras
import numpy as np
import pytest
from tiny_dataset import make_dataset

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import head_variants, model
from landmark_tf.training import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    make_dataset(out, train_counts=(16, 8, 8, 4), val_counts=(0, 0, 0, 0), size=32)
    return out


def _run(data, workdir, steps=12, **model_kw):
    cfg = ModelConfig(image_size=32, embedding_dim=16, **model_kw)
    tcfg = TrainConfig(data_dir=data, workdir=workdir, train_steps=steps, batch_size=8,
                       learning_rate=0.05, schedule="constant", val_split="",
                       checkpoint_every=steps)
    return train.train(cfg, tcfg)


def test_head_variants_train_and_report_head_memory(data, tmp_path, capsys):
    r = _run(data, str(tmp_path / "a"), head="dynamic_arcface", subcenters=3, scale=45.0,
             head_rank=4, npairs_weight=0.5)
    assert r["step"] == 12 and np.isfinite(r["loss"])
    assert r["head_bytes_full_gldv2"] == 4 * 203_094 * 3 * 16
    assert r["head_bytes_this_gldv2"] == 4 * (16 * 4 + 4 * 203_094 * 3)
    assert r["head_bytes_this"] == 4 * (16 * 4 + 4 * 4 * 3)
    assert "head memory (float32 weights)" in capsys.readouterr().out


def test_dynamic_margins_come_from_the_train_counts(data):
    cfg = ModelConfig(image_size=32, embedding_dim=16, head="dynamic_arcface", num_classes=4)
    models = model.build_models(cfg, class_counts=[16, 8, 8, 4])
    np.testing.assert_allclose(models.head.margins, head_variants.dynamic_margins([16, 8, 8, 4]))
    assert models.head.margins[3] == pytest.approx(0.5)  # the rarest class: a + b


def _tiny_backbone(name, weights_path=None):
    image = keras.Input((None, None, 3))
    return keras.Model(image, keras.layers.Conv2D(8, 3, strides=4)(image), name="tiny_backbone")


def test_npairs_loss_enters_the_train_model_losses(monkeypatch):
    # What is tested is the head's loss wiring, not the backbone: a stand-in keeps it seconds.
    monkeypatch.setattr(model.backbones, "build_backbone", _tiny_backbone)
    cfg = ModelConfig(image_size=32, embedding_dim=16, num_classes=4, npairs_weight=0.5)
    models = model.build_models(cfg)
    batch = {"image": np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32"),
             "label": np.array([0, 0, 1, 1], "int32")}
    models.train_model(batch, training=True)
    assert len(models.train_model.losses) == 1 and float(models.train_model.losses[0]) > 0
    models.train_model(batch, training=False)
    assert not models.train_model.losses


def test_bad_head_variant_settings_are_user_errors(data, tmp_path):
    with pytest.raises(UserError, match="head_rank"):
        _run(data, str(tmp_path / "x"), head="adacos", head_rank=4)
    with pytest.raises(UserError, match="npairs_weight"):
        _run(data, str(tmp_path / "y"), npairs_weight=-1.0)


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory):
    """40 classes of one image each: i.i.d. batches of 8 never hold two of one class."""
    out = str(tmp_path_factory.mktemp("singletons"))
    make_dataset(out, train_counts=(1,) * 40, val_counts=(0,) * 40, size=32, shards=2)
    return out


@pytest.mark.parametrize("batch_classes", [0, 2])
def test_npairs_sees_positives_only_with_class_aware_batches(many_classes, tmp_path, monkeypatch,
                                                             caplog, batch_classes):
    """--batch_classes=2 gives every example of the batch a positive (here the other copy of
    its class's one image); the i.i.d. stream gives none, which the trainer warns about."""
    monkeypatch.setattr(model.backbones, "build_backbone", _tiny_backbone)
    cfg = ModelConfig(image_size=32, embedding_dim=16, npairs_weight=0.5)
    tcfg = TrainConfig(data_dir=many_classes, workdir=str(tmp_path / "w"), train_steps=3,
                       batch_size=8, schedule="constant", val_split="", checkpoint_every=3,
                       batch_classes=batch_classes, shuffle_buffer=16)
    caplog.set_level("WARNING")
    r = train.train(cfg, tcfg)
    assert r["pair_anchors"] == (8.0 if batch_classes else 0.0)
    warned = caplog.text
    assert ("with i.i.d. batches" in warned) == (batch_classes == 0)  # at the start
    assert ("no example had another" in warned) == (batch_classes == 0)  # after steps


def test_batch_classes_that_split_a_replica_batch_are_a_user_error(many_classes, tmp_path):
    cfg = ModelConfig(image_size=32, embedding_dim=16)
    tcfg = TrainConfig(data_dir=many_classes, workdir=str(tmp_path / "w"), train_steps=1,
                       batch_size=8, val_split="", batch_classes=3)
    with pytest.raises(UserError, match="--batch_classes=3"):
        train.train(cfg, tcfg.validate())
    tcfg = TrainConfig(data_dir=many_classes, workdir=str(tmp_path / "w"), train_steps=1,
                       batch_size=8, val_split="", batch_classes=8, grad_accum_steps=2)
    with pytest.raises(UserError, match="--batch_classes=8"):  # micro-batch of 4
        train.train(cfg, tcfg)
