"""Which Keras backend trains: TensorFlow (tf.distribute) or JAX (keras.distribution).

  tensorflow  the TF trainer (tf_trainer.py): TPUStrategy, MirroredStrategy, CPU
  jax         the JAX trainer (jax_trainer.py): data parallel over all local JAX devices
  auto        TensorFlow when a tf.distribute --strategy is named (tpu, mirrored, multi_worker,
              cpu: they exist only there); else TensorFlow where its TPU strategy resolves
              (tried in a subprocess, so a failed attempt cannot hold the TPU) or where
              TensorFlow sees a GPU; JAX on a TPU that
              TensorFlow cannot drive (Colab's TPU runtimes since 2025, tensorflow-cpu hosts)
              or a GPU only JAX sees; TensorFlow on CPU, where it trains EfficientNet ~10x
              faster than XLA:CPU does.

Keras fixes its backend when first imported: `select` must run before `import keras`.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import subprocess
import sys

from landmark_tf.errors import UserError

BACKENDS = ("auto", "tensorflow", "jax")
_PROBE = (
    "import sys; from landmark_tf.training import distribute as d; "
    "s = d.resolve_strategy('tpu', sys.argv[1]); print(s.num_replicas_in_sync)"
)


def resolve(name: str, tpu: str = "", strategy: str = "auto") -> str:
    """'tensorflow' or 'jax' for a --backend value (see the module docstring)."""
    if name not in BACKENDS:
        raise UserError(f"--backend={name}: expected one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if strategy != "auto":
        return "tensorflow"
    if tpu or _tpu_present():
        if _tf_tpu_resolves(tpu):
            return "tensorflow"
        if not _jax_installed():
            raise UserError(
                f"--backend=auto: a TPU{f' ({tpu})' if tpu else ''} is named or present, but "
                "TensorFlow cannot drive it (no tensorflow-tpu, or its TPU strategy did not "
                "resolve) and JAX is not installed: pip install '.[jax-tpu]', or name "
                "--strategy=tpu to see TensorFlow's own error")
        return "jax"
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "tensorflow"
    return "jax" if _jax_has_gpu() else "tensorflow"


def select(name: str, tpu: str = "", strategy: str = "auto") -> str:
    """Resolves `name` and makes it this process's Keras backend; returns it.

    UserError when Keras is already imported with another backend, or JAX is asked for and
    not installed.
    """
    backend = resolve(name, tpu, strategy)
    if backend == "jax" and not _jax_installed():
        raise UserError("--backend=jax: JAX is not installed: pip install '.[jax]' (CPU/GPU) "
                        "or '.[jax-tpu]'")
    if "keras" in sys.modules:
        import keras

        current = keras.backend.backend()
        if current != backend:
            raise UserError(
                f"--backend={name} needs Keras on {backend}, but this process already runs "
                f"Keras on {current}: set KERAS_BACKEND={backend} before importing keras"
            )
    os.environ["KERAS_BACKEND"] = backend
    return backend


def _tpu_present() -> bool:
    """Signs of a TPU (as distribute._tpu_present, which cannot be imported before Keras)."""
    env = ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE")
    return any(os.environ.get(k) for k in env) or bool(glob.glob("/dev/accel[0-9]*"))


def _tf_tpu_resolves(tpu: str) -> bool:
    try:
        importlib.metadata.distribution("tensorflow-tpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, tpu], capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def _jax_installed() -> bool:
    try:
        importlib.metadata.distribution("jax")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _jax_has_gpu() -> bool:
    try:
        import jax
    except ImportError:
        return False
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False
