"""Strategy choice, precision/XLA policy, batch splitting, and MirroredStrategy on 2 CPU devices."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
from tiny_dataset import make_dataset

from landmark_tf import config
from landmark_tf.errors import UserError
from landmark_tf.training import distribute


def test_precision_and_jit_follow_the_hardware():
    assert distribute.precision_policy("auto", "tpu") == "mixed_bfloat16"
    a100 = {"compute_capability": (8, 0), "device_name": "NVIDIA A100-SXM4-40GB"}
    v100 = {"compute_capability": (7, 0), "device_name": "Tesla V100-SXM2-16GB"}
    h100 = {"compute_capability": (9, 0), "device_name": "NVIDIA H100 80GB HBM3"}
    assert distribute.precision_policy("auto", "gpu", [a100, h100]) == "mixed_bfloat16"
    assert distribute.precision_policy("auto", "gpu", [v100]) == "mixed_float16"
    assert distribute.precision_policy("auto", "gpu", [a100, v100]) == "mixed_float16"
    assert distribute.precision_policy("auto", "gpu", [{"device_name": "?"}]) == "mixed_float16"
    assert distribute.precision_policy("float16", "gpu", [a100]) == "mixed_float16"
    assert distribute.precision_policy("auto", "cpu") == "float32"
    assert distribute.precision_policy("bfloat16", "cpu") == "mixed_bfloat16"
    assert distribute.use_jit("auto", "tpu") and distribute.use_jit("auto", "gpu")
    assert not distribute.use_jit("auto", "cpu")
    assert distribute.use_jit("on", "cpu") and not distribute.use_jit("off", "gpu")


def test_global_batch_must_split_over_replicas_and_accumulation():
    assert distribute.per_replica_batch(64, 8, 2) == 4
    with pytest.raises(UserError, match="--batch_size 30 does not split over 8 replica"):
        distribute.per_replica_batch(30, 8, 1)
    with pytest.raises(UserError, match="multiple of 12"):
        distribute.per_replica_batch(30, 4, 3)


def test_auto_on_cpu_is_the_default_strategy_and_cpu_is_one_device(monkeypatch):
    for var in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(var, raising=False)
    auto = distribute.resolve_strategy("auto")
    assert auto.num_replicas_in_sync == 1 and distribute.device_kind(auto) == "cpu"
    one = distribute.resolve_strategy("cpu")
    assert isinstance(one, tf.distribute.OneDeviceStrategy) and distribute.is_chief(one)
    assert distribute.num_hosts(one) == 1


def test_tpu_without_a_tpu_is_a_user_error():
    with pytest.raises(UserError, match="cannot connect to a TPU") as info:
        distribute.resolve_strategy("tpu", "local")
    assert "\n" not in str(info.value) and "--tpu=local" in str(info.value)


def test_tpu_name_lookup_is_bounded_when_the_metadata_server_never_answers(monkeypatch):
    """A metadata server that accepts the connection and then says nothing (what a firewalled
    169.254.169.254 can look like): the lookup gives up after the bound, as one UserError."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # connections complete in the kernel backlog; nothing is ever sent
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
    monkeypatch.setattr(distribute, "_METADATA_TIMEOUT_S", 1.0)
    start = time.monotonic()
    try:
        with pytest.raises(UserError, match=r"--tpu=somewhere: cannot resolve the TPU .*timed out"):
            distribute.resolve_strategy("tpu", "somewhere")
    finally:
        server.close()
    assert time.monotonic() - start < 30
    assert socket.getdefaulttimeout() is None  # the bound does not leak into the process


def test_cli_tpu_off_google_cloud_is_one_line_and_exit_2(tmp_path):
    make_dataset(str(tmp_path / "data"), train_counts=(4, 4), val_counts=None, size=32)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           # A closed local port: the lookup fails at once on any machine, network or not.
           "GCE_METADATA_IP": "127.0.0.1:9"}
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "landmark-train"),
         f"--data_dir={tmp_path / 'data'}", f"--workdir={tmp_path / 'w'}", "--train_steps=1",
         "--batch_size=4", "--strategy=tpu", "--tpu=nonexistent"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("landmark-train: error: --tpu=nonexistent: cannot resolve the TPU")
    assert "metadata server" in lines[0] and proc.stdout == ""


def _run_two_cpu_script(script: str, *args: str) -> dict:
    """Runs `script` in a fresh process with 2 logical CPU devices; returns its last JSON line."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", _TWO_CPUS + script, *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_TWO_CPUS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
""")

_STEP_MATH = textwrap.dedent("""
    import types
    import keras
    from landmark_tf.data import records
    from landmark_tf.training import distribute, input_pipeline, tf_step

    data = sys.argv[1]
    info = records.load_dataset_info(data)
    files = tuple(records.split_files(data, info, "train"))


    def run(strategy, accum):
        keras.utils.set_random_seed(1)
        with strategy.scope():
            image = keras.Input((32, 32, 3), name="image")
            label = keras.Input((), dtype="int32", name="label")
            x = keras.layers.Conv2D(6, 3, strides=2)(keras.layers.Rescaling(1 / 255)(image))
            x = keras.layers.GlobalAveragePooling2D()(keras.layers.BatchNormalization()(x))
            net = keras.Model({"image": image, "label": label}, keras.layers.Dense(4)(x))
            opt = keras.optimizers.SGD(0.5, momentum=0.9)
            opt.build(net.trainable_variables)
        step = tf_step.make_train_step(
            types.SimpleNamespace(train_model=net), opt, global_batch=8,
            replicas=strategy.num_replicas_in_sync, accum_steps=accum, jit=False)
        multi = distribute.multi_step_function(strategy, step, tf_step.TRAIN_KEYS)
        spec = input_pipeline.TrainInput(files, 32, 8, steps_per_epoch=4, augment=())
        if strategy.num_replicas_in_sync == 2:
            it = iter(input_pipeline.distribute(strategy, spec))
        else:  # the two replicas' batches (their streams in turn) joined for one device
            two = input_pipeline.train_dataset(spec, tf.distribute.InputContext(1, 0, 2))
            it = iter(two.batch(2, drop_remainder=True).map(
                lambda b: {k: tf.reshape(v, [8, *v.shape[2:]]) for k, v in b.items()}))
        losses = [float(multi(it, tf.constant(n))["loss"]) / n for n in (1, 2, 1)]
        return losses, [np.asarray(v.numpy()).tolist() for v in net.trainable_variables]


    mirrored = distribute.resolve_strategy("mirrored")
    one, two = run(tf.distribute.get_strategy(), 2), run(mirrored, 1)
    print(json.dumps({"replicas": mirrored.num_replicas_in_sync,
                      "multi_step": distribute.multi_step_supported(mirrored),
                      "one": one, "two": two}))
""")


def test_mirrored_step_math_equals_one_device_with_accumulation(tmp_path):
    """2 replicas x 4 examples == 1 device x 2 micro-batches of 4: same batch-norm statistics,
    same loss, same summed gradient, so the same weights (a model without dropout)."""
    make_dataset(str(tmp_path), train_counts=(8, 8, 8, 8), val_counts=None, size=32)
    r = _run_two_cpu_script(_STEP_MATH, str(tmp_path))
    assert r["replicas"] == 2 and r["multi_step"]
    np.testing.assert_allclose(r["two"][0], r["one"][0], rtol=1e-5)
    for a, b in zip(r["two"][1], r["one"][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert r["one"][0][0] != r["one"][0][-1]  # it trained


_MIRRORED = textwrap.dedent("""
    import keras
    from landmark_tf.modeling import model
    from landmark_tf.training import distribute, train
    from landmark_tf.config import ModelConfig, TrainConfig

    data, out = sys.argv[1], sys.argv[2]
    build_models = model.build_models


    def without_dropout(*args, **kwargs):
        # Stochastic depth draws differ between replicas and micro-batches; without it the two
        # runs compute the same function of the same data.
        models = build_models(*args, **kwargs)
        for layer in models.backbone._flatten_layers():
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0
        return models


    model.build_models = without_dropout
    mirrored = distribute.resolve_strategy("mirrored")
    result = {"replicas": mirrored.num_replicas_in_sync,
              "multi_step": distribute.multi_step_supported(mirrored)}
    model_cfg = ModelConfig(image_size=32, embedding_dim=16, num_classes=4)
    for strategy, accum in (("cpu", 2), ("mirrored", 1)):
        # Two micro-batches of 4 on one device see the batch-norm statistics of two replicas.
        cfg = TrainConfig(data_dir=data, workdir=f"{out}/{strategy}", train_steps=4,
                          batch_size=8, learning_rate=0.05, val_split="", augment=[],
                          strategy=strategy, steps_per_execution=2, grad_accum_steps=accum)
        result[strategy] = train.train(model_cfg, cfg)


    def weights(workdir):
        keras.utils.set_random_seed(0)  # without a checkpoint: the weights training started from
        models = model.build_models(model_cfg)
        if workdir:
            model.restore_parts(models, model.latest_checkpoint(workdir),
                                ["backbone", "neck", "head"])
        return np.concatenate([np.ravel(v.numpy()).astype(np.float64)
                               for v in models.train_model.trainable_variables])


    for name in ("cpu", "mirrored"):
        events = tf.io.gfile.glob(f"{out}/{name}/logs/train/*")
        result[name + "_losses"] = [
            float(tf.make_ndarray(v.tensor)) for e in tf.data.TFRecordDataset(events)
            for v in tf.compat.v1.Event.FromString(e.numpy()).summary.value if v.tag == "loss"]
    init, cpu, mir = weights(None), weights(f"{out}/cpu"), weights(f"{out}/mirrored")
    d_cpu, d_mir = cpu - init, mir - init
    result["update_cosine"] = float(d_cpu @ d_mir / np.linalg.norm(d_cpu) / np.linalg.norm(d_mir))
    result["update_norm_ratio"] = float(np.linalg.norm(d_mir) / np.linalg.norm(d_cpu))
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_mirrored_two_cpu_replicas_train_like_one_device(tmp_path):
    """The full landmark model through train.train (about 150 s of CPU on 2 cores)."""
    make_dataset(str(tmp_path / "data"), train_counts=(8, 8, 8, 8), val_counts=None, size=32)
    r = _run_two_cpu_script(_MIRRORED, str(tmp_path / "data"), str(tmp_path / "out"))
    assert r["replicas"] == 2 and r["mirrored"]["replicas"] == 2
    # Our multi-step loop works with 2 replicas (unlike Keras's fit loop, keras#19246).
    assert r["multi_step"] and r["mirrored"]["steps_per_execution"] == 2
    assert r["cpu"]["step"] == r["mirrored"]["step"] == 4
    # Same data, same initial weights, same batch-norm statistics, no dropout: same training,
    # up to summation order (which batch norm over 4 examples at 1x1 spatial size amplifies
    # into ~0.5% of loss after two updates; measured weight-update cosine 0.999996).
    figures = json.dumps({k: r[k] for k in ("update_cosine", "update_norm_ratio", "cpu_losses",
                                            "mirrored_losses")})
    assert r["mirrored_losses"][0] == pytest.approx(r["cpu_losses"][0], rel=1e-5), figures
    np.testing.assert_allclose(r["mirrored_losses"], r["cpu_losses"], rtol=0.02, err_msg=figures)
    assert r["update_cosine"] > 0.9999, figures
    assert abs(r["update_norm_ratio"] - 1) < 1e-3, figures


_OVERFLOW_ON_REPLICA_1 = textwrap.dedent("""
    import types
    import keras
    from landmark_tf.training import distribute, tf_step

    strategy = distribute.resolve_strategy("mirrored")
    with strategy.scope():
        image = keras.Input((4, 4, 3), name="image")
        label = keras.Input((), dtype="int32", name="label")
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(image))
        net = keras.Model({"image": image, "label": label}, keras.layers.Dense(3)(x))
        opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        opt.build(net.trainable_variables)
    step = tf_step.make_train_step(types.SimpleNamespace(train_model=net), opt,
                                      global_batch=4, replicas=2, accum_steps=1, jit=False)


    def batch(weight_of_replica_1):
        def per_replica(ctx):
            w = weight_of_replica_1 if ctx.replica_id_in_sync_group == 1 else 1.0
            return {"image": tf.fill([2, 4, 4, 3], 100.0), "label": tf.constant([0, 1]),
                    "weight": tf.fill([2], w)}
        return strategy.experimental_distribute_values_from_function(per_replica)


    run = tf.function(lambda b: strategy.run(step, args=(b,)))
    before = [v.numpy().copy() for v in net.trainable_variables]
    scale0 = float(opt.dynamic_scale.numpy())
    run(batch(float("inf")))  # an overflow on replica 1 only
    skipped = [v.numpy() for v in net.trainable_variables]
    per_replica = [[strategy.experimental_local_results(v.value)[r].numpy().tolist()
                    for v in net.trainable_variables] for r in range(2)]
    scale1 = float(opt.dynamic_scale.numpy())
    run(batch(1.0))  # a normal step still trains
    after = [v.numpy() for v in net.trainable_variables]
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync, "scales": [scale0, scale1],
        "unchanged": all(np.array_equal(a, b) for a, b in zip(before, skipped)),
        "replicas_agree": per_replica[0] == per_replica[1],
        "finite": all(np.isfinite(a).all() for a in after),
        "trained": not all(np.array_equal(a, b) for a, b in zip(before, after)),
        "iterations": int(opt.iterations.numpy())}))
""")


def test_loss_scaling_skips_a_step_when_any_replica_overflows():
    """fp16 on 2 replicas: inf in replica 1's gradients only. Keras alone decides from replica 0
    and applies the overflow (weights become NaN); we skip the step everywhere and halve the
    loss scale."""
    r = _run_two_cpu_script(_OVERFLOW_ON_REPLICA_1)
    assert r["replicas"] == 2
    assert r["unchanged"] and r["replicas_agree"], r
    assert r["scales"][1] == r["scales"][0] / 2, r
    assert r["finite"] and r["trained"] and r["iterations"] == 1, r


_TPU_PROXY = textwrap.dedent("""
    import keras
    from landmark_tf.config import ModelConfig, TrainConfig
    from landmark_tf.modeling import model
    from landmark_tf.training import distribute, train

    data, out, heads = sys.argv[1], sys.argv[2], sys.argv[3].split(",")


    def tiny_backbone(name, weights_path=None):
        # XLA:CPU takes many minutes to compile EfficientNet-B0's train step; this stand-in has
        # the same kinds of layers (conv, batch norm, swish, dropout with a seed generator).
        image = keras.Input((None, None, 3))
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(image)
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.Activation("swish")(keras.layers.BatchNormalization()(x))
        x = keras.layers.Dropout(0.1)(x)
        x = keras.layers.Conv2D(16, 3, strides=2, padding="same")(x)
        return keras.Model(image, x, name="tiny_backbone")


    model.backbones.build_backbone = tiny_backbone
    # One MirroredStrategy for all heads, as one process has one in a real run: several in one
    # process reuse collective instance keys, and one run's all-reduce meets another's.
    strategy = distribute.resolve_strategy("mirrored")
    results = {}
    for head in heads:
        cfg = TrainConfig(data_dir=data, workdir=f"{out}/{head}", train_steps=8, batch_size=8,
                          learning_rate=0.05, val_split="val", augment=["flip"],
                          strategy="mirrored", jit_compile="on", mixed_precision="bfloat16",
                          steps_per_execution=4, checkpoint_every=8, eval_every=8)
        model_cfg = ModelConfig(image_size=32, embedding_dim=16, head=head, margin=0.1,
                                num_classes=4)
        r = train.Run(model_cfg, cfg, train.make_plan(cfg), strategy).run()
        keras.mixed_precision.set_global_policy("float32")
        results[head] = {k: r[k] for k in ("step", "loss", "replicas", "jit_compile",
                                           "mixed_precision", "steps_per_execution",
                                           "val_examples")}
    print(json.dumps(results))
""")


# In make test, the head whose step has most parts under XLA: a margin per class from the data.
# AdaCos's replica-averaged state under nested XLA is test_heads'; every head trains on 2
# replicas (float32, no XLA) in test_backend_parity; all of them under XLA + bfloat16 in the slow
# variant (each head is a minute of XLA:CPU compilation on 2 cores).
_PROXY_HEADS = ("dynamic_arcface",)


@pytest.mark.parametrize("heads", [
    _PROXY_HEADS, pytest.param(tuple(h for h in config.HEADS if h not in config.TAG_HEADS),
                               marks=pytest.mark.slow, id="every_head")])
def test_tpu_proxy_heads_with_xla_bfloat16_and_multi_step_on_two_replicas(tmp_path, heads):
    """The closest CPU stand-in for what TPUStrategy compiles: the real trainer (train.Run:
    input pipeline, train step, heads, losses, multi-step loop, eval, checkpoint) with XLA,
    mixed bfloat16 and 4 steps per execution on 2 replicas. Only the backbone is a small
    stand-in (EfficientNet's step takes minutes to compile on XLA:CPU)."""
    make_dataset(str(tmp_path / "data"), train_counts=(8, 8, 8, 8), val_counts=(2, 2, 2, 2),
                 size=32)
    r = _run_two_cpu_script(_TPU_PROXY, str(tmp_path / "data"), str(tmp_path / "out"),
                            ",".join(heads))
    assert sorted(r) == sorted(heads)
    for head, got in r.items():
        assert got["step"] == 8 and got["replicas"] == 2, (head, got)
        assert got["jit_compile"] and got["mixed_precision"] == "mixed_bfloat16", (head, got)
        # No fallback to one step per execution (keras#19246-like failures would force it).
        assert got["steps_per_execution"] == 4, (head, got)
        assert np.isfinite(got["loss"]) and got["val_examples"] == 8, (head, got)


_REPLICA_DRAWS = textwrap.dedent("""
    import keras
    from landmark_tf.modeling import checkpoint
    from landmark_tf.training import tf_step

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        net = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5, seed=3),
                                keras.layers.Dropout(0.5, seed=4)])
    seeds = checkpoint.seed_states(net)

    def masks(shifted):
        def fn():
            with tf_step.replica_draws(seeds if shifted else []):
                return net(tf.ones((2, 64)), training=True)
        return [r.numpy() for r in strategy.experimental_local_results(
            tf.function(lambda: strategy.run(fn))())]

    plain = masks(False)
    folded = masks(True)
    states = [[s.numpy().tolist() for s in strategy.experimental_local_results(v.value)]
              for v in seeds]
    # The same two layers on one device, advanced as often: replica 0 draws its masks.
    single = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5, seed=3),
                               keras.layers.Dropout(0.5, seed=4)])
    single(tf.ones((2, 64)), training=True)
    print(json.dumps({
        "plain_same": bool(np.array_equal(plain[0], plain[1])),
        "folded_same": bool(np.array_equal(folded[0], folded[1])),
        "replica0_as_one_device": bool(np.array_equal(
            folded[0], single(tf.ones((2, 64)), training=True).numpy())),
        "states": states,
    }))
""")


def test_replicas_draw_their_own_dropout_masks_and_keep_one_seed_state():
    """Keras's SeedGenerator state is mirrored: without the shift every replica draws the same
    masks. With it the masks differ, replica 0 draws what one device would, and the states stay
    equal on every replica (two draws each: [seed, 2])."""
    r = _run_two_cpu_script(_REPLICA_DRAWS)
    assert r["plain_same"], "the premise: replicas share their masks without the shift"
    assert not r["folded_same"]
    assert r["replica0_as_one_device"]
    assert r["states"] == [[[3, 2], [3, 2]], [[4, 2], [4, 2]]], r["states"]
