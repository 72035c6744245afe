"""Picking the distribution strategy and what follows from the hardware.

  auto          TPU when one resolves, else MirroredStrategy over several GPUs, else the default
                strategy (one GPU or the CPU)
  tpu           TPUStrategy (`tpu`: a TPU name, "local" on a TPU VM, "" in Colab)
  mirrored      MirroredStrategy over all GPUs, or over all logical CPU devices when there are none
  multi_worker  MultiWorkerMirroredStrategy (cluster from TF_CONFIG)
  cpu           OneDeviceStrategy on the CPU

The multi-step loop (`multi_step_function`: a `tf.range` loop of `strategy.run` inside one
tf.function) is the TF custom-training pattern, not Keras's `fit` loop that breaks with several
replicas (keras-team/keras#19246); `multi_step_supported` still probes it on a tiny model, and
training falls back to one step per execution where the probe fails.
"""

from __future__ import annotations

import functools
import glob
import os
import socket
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from landmark_tf.errors import UserError


def resolve_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """The strategy for a --strategy value (see the module docstring)."""
    if name == "tpu":
        return _tpu_strategy(tpu or _default_tpu_name())
    if name == "auto":
        if tpu or _tpu_present():
            try:
                return _tpu_strategy(tpu or _default_tpu_name())
            except UserError as e:
                logging.warning("no TPU (%s); falling back to GPU/CPU", e)
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    raise UserError(f"--strategy: unknown value {name!r}")


def _tpu_present() -> bool:
    """Cheap signs of a TPU (Colab, a TPU VM, a named TPU) before trying to connect to one."""
    env = ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE")
    return any(os.environ.get(k) for k in env) or bool(glob.glob("/dev/accel[0-9]*"))


def _default_tpu_name() -> str:
    on_vm = bool(glob.glob("/dev/accel[0-9]*")) or bool(os.environ.get("TPU_ACCELERATOR_TYPE"))
    return "local" if on_vm and not os.environ.get("COLAB_TPU_ADDR") else ""


# TPUClusterResolver asks the GCE metadata server for project and zone (urllib, no timeout):
# off Google Cloud that is a DNS failure at best and an OS connect timeout (minutes) at worst.
_METADATA_TIMEOUT_S = 20.0


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    """TPUStrategy for `tpu`; any failure is one UserError line: which TPU, what, what to check."""
    which = f"--tpu={tpu}" if tpu else "--tpu='' (the Colab runtime's TPU)"
    try:
        resolver = _with_socket_timeout(
            _METADATA_TIMEOUT_S, tf.distribute.cluster_resolver.TPUClusterResolver, tpu=tpu)
    except Exception as e:  # noqa: BLE001 - urllib, googleapiclient, ValueError, ... all mean one thing
        raise UserError(
            f"{which}: cannot resolve the TPU ({_first_line(e)}); a TPU name is looked up through "
            "the Google Cloud metadata server, so run on a GCE/TPU VM in the TPU's project and "
            "zone (gcloud compute tpus list), use --tpu=local on a TPU VM, or --strategy=auto "
            "off Google Cloud") from None
    try:
        # As TF Model Garden: a TPU VM ("local") and the new Colab runtime ("") hold the TPU
        # in-process; a named TPU node (or the legacy Colab runtime) is a remote cluster.
        if tpu not in ("", "local") or os.environ.get("COLAB_TPU_ADDR"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except Exception as e:  # noqa: BLE001 - gRPC, OpError, RuntimeError, ValueError
        raise UserError(
            f"{which}: cannot connect to a TPU ({_first_line(e)}); check that the TPU is READY "
            "(gcloud compute tpus tpu-vm describe), that no other process holds it "
            "(/tmp/libtpu_lockfile), and that tensorflow-tpu matches libtpu (TF 2.20)") from None


def _with_socket_timeout(seconds: float, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) with urllib's default socket timeout bounded to `seconds`."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        return fn(*args, **kwargs)
    finally:
        socket.setdefaulttimeout(previous)


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}"


def device_kind(strategy: tf.distribute.Strategy) -> str:
    """'tpu', 'gpu' or 'cpu': the accelerator the replicas run on."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy: ops go to the first GPU when there is one
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    return "gpu" if any("GPU" in d.upper() for d in devices) else "cpu"


def precision_policy(setting: str, kind: str, gpu_details: list[dict] | None = None) -> str:
    """Keras dtype policy: auto -> mixed_bfloat16 on TPU, float32 on CPU, and on GPU what
    `gpu_precision` picks from the GPUs' details (read from TensorFlow when not given)."""
    if setting == "auto":
        if kind == "gpu":
            setting = gpu_precision(_gpu_details() if gpu_details is None else gpu_details)
        else:
            setting = {"tpu": "bfloat16"}.get(kind, "float32")
    return {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[setting]


def gpu_precision(details: list[dict]) -> str:
    """"bfloat16" when every GPU has compute capability >= 8.0 (Ampere and later: bf16 tensor
    cores, no loss scaling, no overflow); else "float16" (with dynamic loss scaling).

    details: tf.config.experimental.get_device_details of each GPU, e.g.
    {"compute_capability": (8, 0), "device_name": "NVIDIA A100-SXM4-40GB"}.
    """
    capabilities = [tuple(d.get("compute_capability") or (0, 0)) for d in details]
    return "bfloat16" if capabilities and min(capabilities) >= (8, 0) else "float16"


def _gpu_details() -> list[dict]:
    return [tf.config.experimental.get_device_details(g)
            for g in tf.config.list_physical_devices("GPU")]


def use_jit(setting: str, kind: str) -> bool:
    """XLA on for TPU/GPU under auto; off on CPU where it made EfficientNet ~8x slower."""
    return kind in ("tpu", "gpu") if setting == "auto" else setting == "on"


def per_replica_batch(global_batch: int, replicas: int, accum_steps: int) -> int:
    """Examples per replica per micro-step; UserError when the split is not exact."""
    if global_batch <= 0 or accum_steps <= 0:
        raise UserError(f"--batch_size ({global_batch}) and --grad_accum_steps must be > 0")
    if global_batch % (replicas * accum_steps):
        raise UserError(
            f"--batch_size {global_batch} does not split over {replicas} replica(s) x "
            f"{accum_steps} accumulation step(s); use a multiple of {replicas * accum_steps}"
        )
    return global_batch // (replicas * accum_steps)


def num_hosts(strategy: tf.distribute.Strategy) -> int:
    """How many hosts (input pipelines) feed the replicas."""
    extended = strategy.extended
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return int(extended.num_hosts)
    return int(getattr(extended, "_num_workers", 1) or 1)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints, logs and config (worker 0 of a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0)


def multi_step_function(
    strategy: tf.distribute.Strategy,
    replica_fn: Callable,
    keys: tuple[str, ...],
    max_steps: int | None = None,
) -> Callable:
    """tf.function(iterator, n) running `replica_fn` on n batches; returns summed scalars.

    `replica_fn(batch)` returns a dict of float32 scalars (per replica) with exactly `keys`;
    the result sums each over replicas and steps. With max_steps=1 there is no loop in the
    graph (n must be 1), which traces faster.
    """
    reduce = lambda out: {
        k: strategy.reduce(tf.distribute.ReduceOp.SUM, out[k], axis=None) for k in keys}

    @tf.function
    def run_one(iterator, n):
        return reduce(strategy.run(replica_fn, args=(next(iterator),)))

    @tf.function
    def run(iterator, n):
        totals = {k: tf.zeros([], tf.float32) for k in keys}
        for _ in tf.range(n):
            out = reduce(strategy.run(replica_fn, args=(next(iterator),)))
            totals = {k: totals[k] + out[k] for k in keys}
        return totals

    return run_one if max_steps == 1 else run


@functools.lru_cache(maxsize=8)
def multi_step_supported(strategy: tf.distribute.Strategy) -> bool:
    """Probes 3 SGD steps in one execution on a tiny model; False where the pattern breaks."""
    try:
        with strategy.scope():
            model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
            optimizer = keras.optimizers.SGD(0.1)
            optimizer.build(model.trainable_variables)
        x = np.ones((8 * strategy.num_replicas_in_sync, 2), np.float32)
        data = tf.data.Dataset.from_tensor_slices(x).repeat()
        iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx: data.batch(ctx.get_per_replica_batch_size(len(x)), drop_remainder=True)
        ))

        def step(batch):
            with tf.GradientTape() as tape:
                # float32 whatever the global dtype policy (mixed_bfloat16 makes it bfloat16).
                loss = tf.cast(tf.reduce_sum(model(batch)), tf.float32) / float(len(x))
            optimizer.apply(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables)
            return {"loss": loss}

        out = multi_step_function(strategy, step, ("loss",))(iterator, tf.constant(3))
        return bool(np.isfinite(float(out["loss"]))) and int(optimizer.iterations.numpy()) == 3
    except (tf.errors.OpError, ValueError, TypeError, RuntimeError) as e:
        logging.warning("multi-step execution fails on %s: %s", type(strategy).__name__, e)
        return False
