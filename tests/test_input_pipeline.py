"""Input pipeline: static shapes, (seed, step)-determined order, sampling frequencies, eval."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf
from tiny_dataset import make_dataset

from landmark_tf.data import records
from landmark_tf.errors import UserError
from landmark_tf.modeling import losses
from landmark_tf.training import input_pipeline as ip
from landmark_tf.training import sampling

ONE_HOST = tf.distribute.InputContext(1, 0, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    info = make_dataset(out, train_counts=(14, 10, 6, 2), val_counts=(3, 2, 2, 0), size=32,
                        shards=3, not_clean_every=4)
    return out, info


def _train_spec(data, **kw):
    out, info = data
    args = dict(files=tuple(records.split_files(out, info, "train")), image_size=32,
                global_batch_size=8, steps_per_epoch=4, seed=7, shuffle_buffer=16)
    args.update(kw)
    return ip.TrainInput(**args)


def _take(spec, n, ctx=ONE_HOST):
    return [{k: v.numpy() for k, v in b.items()} for b in ip.train_dataset(spec, ctx).take(n)]


def _digest(image):
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_batches_have_static_shapes_and_contract_dtypes(data):
    ds = ip.train_dataset(_train_spec(data, global_batch_size=6), tf.distribute.InputContext(
        1, 0, 2))  # two replicas on this host -> per-replica batch 3
    spec = ds.element_spec
    assert spec["image"].shape == (3, 32, 32, 3) and spec["image"].dtype == tf.uint8
    assert spec["label"].dtype == tf.int32 and spec["weight"].dtype == tf.float32
    assert spec["flip"].shape == (3,) and spec["flip"].dtype == tf.bool


@pytest.mark.parametrize("augment", [("flip",), ("flip", "crop", "color")])
def test_uint8_infeed_is_the_float_pipeline_rounded(data, augment):
    """The uint8 infeed carries the same pixels as float32 up to rounding (|d| <= 0.5), with
    every other field identical; the eval pipeline too."""
    as_uint8 = _take(_train_spec(data, augment=augment), 5)
    as_float = _take(_train_spec(data, augment=augment, infeed_dtype="float32"), 5)
    for u, f in zip(as_uint8, as_float, strict=True):
        assert u["image"].dtype == np.uint8 and f["image"].dtype == np.float32
        assert np.abs(u["image"].astype(np.float32) - f["image"]).max() <= 0.5
        assert np.ptp(f["image"]) > 50  # real pictures, not a constant
        for key in ("label", "weight", "flip"):
            np.testing.assert_array_equal(u[key], f[key])
    out, info = data
    files = tuple(records.split_files(out, info, "val"))
    evals = [[b["image"].numpy() for b in ip.eval_dataset(
        ip.EvalInput(files, 32, 4, 3, infeed_dtype=dtype), ONE_HOST)]
        for dtype in ("uint8", "float32")]
    for u, f in zip(*evals, strict=True):
        assert u.dtype == np.uint8 and np.abs(u.astype(np.float32) - f).max() <= 0.5


@pytest.mark.parametrize("sampling_mode, augment", [("uniform", ("flip",)),
                                                    ("class_balanced", ("flip", "crop", "color"))])
def test_resuming_at_any_step_gives_the_same_batches(data, sampling_mode, augment):
    factors = None if sampling_mode == "uniform" else sampling.repeat_factors(
        data[1]["class_counts"], sampling_mode)
    full = _take(_train_spec(data, augment=augment, repeat_factors=factors), 10)
    for start in (3, 5):  # inside epoch 0, and in epoch 1 after skipping one step
        resumed = _take(_train_spec(data, augment=augment, repeat_factors=factors,
                                    start_step=start), 10 - start)
        for a, b in zip(full[start:], resumed, strict=True):
            assert a.keys() == b.keys() == {"image", "label", "weight", "flip"}
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_uniform_epoch_reads_each_record_at_most_once_and_epochs_differ(data):
    batches = _take(_train_spec(data, augment=()), 8)  # two epochs of 4 steps x 8 = 32 of 32
    epochs = [[_digest(im) for b in batches[e * 4:(e + 1) * 4] for im in b["image"]]
              for e in range(2)]
    assert len(set(epochs[0])) == 32 and set(epochs[0]) == set(epochs[1])
    assert epochs[0] != epochs[1]
    other_seed = _take(_train_spec(data, augment=(), seed=8), 4)
    assert [_digest(im) for b in other_seed for im in b["image"]] != epochs[0]


def test_flips_are_drawn_per_image_and_applied_by_the_step(data):
    flips = np.concatenate([b["flip"] for b in _take(_train_spec(data), 8)])
    assert 0.3 < flips.mean() < 0.7
    assert not any(b["flip"].any() for b in _take(_train_spec(data, augment=()), 4))
    images = tf.reshape(tf.range(2 * 2 * 3 * 3, dtype=tf.float32), [2, 2, 3, 3])
    from landmark_tf.training import step_math

    out = np.asarray(step_math.prepare_images({"image": images,
                                               "flip": tf.constant([True, False])}))
    np.testing.assert_array_equal(out[0], images.numpy()[0][:, ::-1])
    np.testing.assert_array_equal(out[1], images.numpy()[1])


def test_weights_combine_class_weight_and_not_clean_weight(data):
    w = losses.class_weights(data[1]["class_counts"], "inverse")
    batches = _take(_train_spec(data, class_weights=w, not_clean_weight=0.5, augment=()), 4)
    got = np.concatenate([b["weight"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    ratio = got / w[labels]
    assert set(np.round(ratio, 5)) == {1.0, 0.5}  # every 4th example is not clean
    assert 0.1 < np.mean(ratio == 0.5) < 0.4


def _label_records(counts):
    serialized = [records.make_example(encoded=b"", image_id=f"{c}-{i}", label=c, landmark_id=c,
                                       height=1, width=1, is_clean=True)
                  for c, n in enumerate(counts) for i in range(n)]
    return tf.data.Dataset.from_tensor_slices(serialized)


def _resampled_labels(recs, factors, seeds) -> np.ndarray:
    spec = {"image/class/label": tf.io.FixedLenFeature([], tf.int64)}
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64)).flat_map(
        lambda s: sampling.resample(recs, factors, tf.stack([s, tf.constant(1, tf.int64)])))
    ds = ds.batch(8192).map(lambda b: tf.io.parse_example(b, spec)["image/class/label"])
    return np.concatenate(list(ds.as_numpy_iterator()))


@pytest.mark.parametrize("mode", ["class_balanced", "log"])
def test_resampling_frequencies_match_target_distribution(mode):
    counts = [400, 100, 20, 5, 1]
    factors = sampling.repeat_factors(counts, mode)
    assert np.dot(factors, counts) == pytest.approx(sum(counts), rel=1e-5)
    labels = _resampled_labels(_label_records(counts), factors, list(range(30)))  # ~16k draws
    freq = np.bincount(labels, minlength=5) / len(labels)
    target = np.full(5, 0.2) if mode == "class_balanced" else np.log1p(counts)
    np.testing.assert_allclose(freq, target / target.sum(), atol=0.012)
    assert len(labels) == pytest.approx(30 * sum(counts), rel=0.03)


def test_uniform_sampling_leaves_the_stream_untouched():
    recs = _label_records([3, 2])
    assert sampling.resample(recs, None, tf.constant([0, 0], tf.int64)) is recs
    np.testing.assert_allclose(sampling.repeat_factors([3, 2], "uniform"), [1.0, 1.0])


def test_resampling_is_a_function_of_the_seed():
    recs, factors = _label_records([50, 3]), sampling.repeat_factors([50, 3], "class_balanced")
    a, b, c = (_resampled_labels(recs, factors, [s]) for s in (1, 1, 2))
    assert list(a) == list(b) and list(a) != list(c)


def test_copies_of_a_rare_class_are_spread_over_the_window():
    """A 1-image class with repeat factor 20 (what class_balanced gives a 1-image class on
    GLDv2) among 999 images of another: its 20 copies come ~window/20 apart, never in a row."""
    recs = _label_records([999, 1])
    factors = np.array([1.0, 20.0], np.float32)
    spec = {"image/class/label": tf.io.FixedLenFeature([], tf.int64)}
    for s in range(3):
        out = sampling.resample(recs, factors, tf.constant([s, 1], tf.int64), window=1000)
        labels = np.concatenate(list(out.batch(4096).map(
            lambda b: tf.io.parse_example(b, spec)["image/class/label"]).as_numpy_iterator()))
        assert len(labels) == 1019
        where = np.flatnonzero(labels == 1)
        assert len(where) == 20
        gaps = np.diff(where)
        # Evenly spaced: ~1019/20 = 51 apart (binomial spread around it), spanning the window.
        assert gaps.min() >= 25 and gaps.max() <= 80, gaps
        assert where[-1] - where[0] >= 0.9 * 1019, where
        # Class 0 is shuffled too: its records are not in input order.
        ids = [tf.io.parse_single_example(r, records.FEATURE_SPEC)["image/id"].numpy()
               for r in out.take(50)]
        assert ids != sorted(ids)


def test_spread_order_spaces_copies_evenly():
    n = tf.constant([3, 0, 1, 4, 1], tf.int32)
    order = sampling.spread_order(n, tf.constant([5, 6], tf.int64)).numpy()
    assert sorted(order.tolist()) == [0, 0, 0, 2, 3, 3, 3, 3, 4]
    where = np.flatnonzero(order == 3)
    assert np.diff(where).min() >= 1 and len(where) == 4


def test_hosts_read_disjoint_shards_and_too_few_shards_fail(data):
    spec = _train_spec(data)
    mine = ip.host_files(spec.files, tf.distribute.InputContext(2, 1, 2))
    assert mine == [spec.files[1]]
    with pytest.raises(UserError, match="cannot feed 4 hosts"):
        ip.host_files(spec.files, tf.distribute.InputContext(4, 3, 4))


def test_eval_is_in_file_order_and_padded_to_fixed_steps(data):
    out, info = data
    files = tuple(records.split_files(out, info, "val"))
    spec = ip.EvalInput(files=files, image_size=32, global_batch_size=4, num_steps=3)
    batches = [{k: v.numpy() for k, v in b.items()} for b in ip.eval_dataset(spec, ONE_HOST)]
    assert len(batches) == 3
    labels = np.concatenate([b["label"] for b in batches])
    weights = np.concatenate([b["weight"] for b in batches])
    truth = [int(tf.io.parse_single_example(r, records.FEATURE_SPEC)["image/class/label"])
             for r in tf.data.TFRecordDataset(list(files))]
    np.testing.assert_array_equal(labels[:7], truth)
    np.testing.assert_array_equal(labels[7:], -1)
    np.testing.assert_array_equal(weights, [1.0] * 7 + [0.0] * 5)
    again = [b["image"].numpy() for b in ip.eval_dataset(spec, ONE_HOST)]
    np.testing.assert_array_equal(again[0], batches[0]["image"])


def _groups(batches, k):
    """[n_batches, P, K] labels of per-replica batches, asserting each K-run is one class."""
    labels = np.stack([b["label"] for b in batches]).reshape(len(batches), -1, k)
    assert (labels == labels[..., :1]).all(), labels
    return labels


@pytest.mark.parametrize("factors", [None, "class_balanced"])
def test_batch_classes_gives_p_classes_by_k_images_per_replica(data, factors):
    """K=2 at a per-replica batch of 4 (2 replicas on this host): every per-replica batch is
    2 groups of 2 same-class images, groups never split between the replicas' batches, also
    across epoch boundaries (steps_per_epoch=4) and with class resampling."""
    rf = None if factors is None else sampling.repeat_factors(data[1]["class_counts"], factors)
    spec = _train_spec(data, batch_classes=2, repeat_factors=rf)
    two = tf.distribute.InputContext(1, 0, 2)
    batches = _take(spec, 20, two)
    assert all(b["label"].shape == (4,) for b in batches)
    labels = _groups(batches, 2)
    assert len(np.unique(labels)) > 1
    # Resume exactness: starting at step 3 gives the same per-replica batches as skipping.
    resumed = _take(_train_spec(data, batch_classes=2, repeat_factors=rf, start_step=3), 6, two)
    for a, b in zip(batches[6:12], resumed, strict=True):  # step 3 = 6 per-replica batches
        assert (a["label"] == b["label"]).all() and _digest(a["image"]) == _digest(b["image"])


def test_batch_classes_stream_is_a_function_of_the_seed(data):
    same = [_take(_train_spec(data, batch_classes=4, seed=s), 8) for s in (3, 3, 4)]
    for batches in same:
        _groups(batches, 4)
    digests = [[_digest(b["image"]) for b in batches] for batches in same]
    assert digests[0] == digests[1] and digests[0] != digests[2]


def test_batch_classes_must_divide_the_per_replica_batch(data):
    with pytest.raises(UserError, match="--batch_classes=3"):
        ip.train_dataset(_train_spec(data, batch_classes=3), ONE_HOST)
    with pytest.raises(UserError, match="--batch_classes=4"):  # 8 over 4 replicas: 2 each
        ip.train_dataset(_train_spec(data, batch_classes=4), tf.distribute.InputContext(1, 0, 4))


def test_group_order_fills_short_classes_and_keeps_every_record():
    labels = tf.constant([5, 7, 5, 9, 5, 7], tf.int64)
    order = sampling.group_order(labels, 2, tf.constant([1, 2], tf.int64)).numpy()
    grouped = labels.numpy()[order].reshape(-1, 2)
    assert (grouped[:, 0] == grouped[:, 1]).all()
    assert set(order) == set(range(6)) and len(order) == 8  # 5: 3 -> 4, 7: 2, 9: 1 -> 2


def test_a_replica_reads_the_same_stream_whichever_host_feeds_it(data):
    """1 host x 2 replicas yields replica 0's and replica 1's batches in turn; 2 hosts x 1
    replica yield the same batches, one stream each: data depends on the replica count only."""
    spec = _train_spec(data, global_batch_size=4)
    one_host = _take(spec, 10, tf.distribute.InputContext(1, 0, 2))
    hosts = [_take(spec, 5, tf.distribute.InputContext(2, h, 2)) for h in (0, 1)]
    for step in range(5):
        for replica in (0, 1):
            a, b = one_host[2 * step + replica], hosts[replica][step]
            assert _digest(a["image"]) == _digest(b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
            np.testing.assert_array_equal(a["flip"], b["flip"])
    assert _digest(hosts[0][0]["image"]) != _digest(hosts[1][0]["image"])


def test_fewer_shards_than_replicas_split_records_disjointly(data):
    """3 shards, 4 replicas: every stream reads all shards and keeps every 4th record; one
    epoch of the four streams is every train record exactly once."""
    spec = _train_spec(data, global_batch_size=8, steps_per_epoch=4)  # 2 per replica
    seen = [[_digest(im) for b in _take(spec, 4, tf.distribute.InputContext(4, h, 4))
             for im in b["image"]] for h in range(4)]
    flat = [d for stream in seen for d in stream]
    assert len(set(flat)) == len(flat) == 32  # 14 + 10 + 6 + 2 train records
