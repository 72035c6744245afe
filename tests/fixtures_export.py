"""Shared helpers for the export / ensemble / embed tests: tiny workdirs, tiny exports, images.

Expensive artefacts (the B0 export) are built once per session with `shared`, even under
pytest-xdist; tiny exports once per process with `tiny_export`.
"""

from __future__ import annotations

import atexit
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from landmark_tf.config import ModelConfig
from landmark_tf.data import records
from landmark_tf.modeling import model as model_lib
from landmark_tf.preprocess import resize_for_model
from landmark_tf.serving import export, signatures

BIN = os.path.dirname(sys.executable)
LOAD_SCRIPT = os.path.join(os.path.dirname(__file__), "load_savedmodel.py")
_CACHE: dict = {}
_ROOT = tempfile.mkdtemp(prefix="landmark-export-tests-")
atexit.register(shutil.rmtree, _ROOT, True)


def make_workdir(path: str, *, image_size=32, embedding_dim=16, num_classes=4, step=5, seed=0):
    """A training workdir as landmark-train leaves it: config.json + checkpoints/ (random init).

    Returns the in-memory embedding model whose weights the checkpoint holds.
    """
    keras.utils.set_random_seed(seed)
    cfg = ModelConfig(backbone="efficientnet-b0", image_size=image_size,
                      embedding_dim=embedding_dim, num_classes=num_classes)  # fmt: skip
    models = model_lib.build_models(cfg)
    ckpt = model_lib.make_checkpoint(models, step=tf.Variable(step, dtype=tf.int64))
    manager = tf.train.CheckpointManager(ckpt, os.path.join(path, model_lib.CHECKPOINT_DIR), 2)
    manager.save(checkpoint_number=step)
    config = {"model": cfg.to_dict(), "train": {"train_steps": step},
              "data": {"data_dir": "unused", "num_classes": num_classes, "image_size": image_size}}
    with open(os.path.join(path, model_lib.CONFIG_FILE), "w") as f:
        json.dump(config, f)
    return models.embedding_model


def shared(tmp_path_factory, name: str, build) -> dict:
    """`build(folder) -> JSON-able dict`, run once per test session even across xdist workers
    (the others wait on a file lock and read the stored result)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, result = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            folder.mkdir(exist_ok=True)
            result.write_text(json.dumps(build(str(folder))))
    return json.loads(result.read_text())


B0_SIZES = "37x501,800x600,33x33"
B0_INPUT_SIZES = (40, 60)  # --image_size=40 (trained at 32) --scales=1,1.5


def build_b0_export(root: str) -> dict:
    """A B0 workdir (trained at 32 px, D=16), exported by the CLI at 40 px and scales 1 and 1.5,
    loaded in a fresh process; plus the embedding model's own descriptors of the same images."""
    import load_savedmodel

    workdir, export_dir = os.path.join(root, "workdir"), os.path.join(root, "b0")
    model = make_workdir(workdir)
    want = [l2n(np.mean([model(resize_for_model(im[None], s), training=False)[0].numpy()
                         for s in B0_INPUT_SIZES], axis=0))
            for im in load_savedmodel.make_images(B0_SIZES)]  # fmt: skip
    np.save(os.path.join(root, "want.npy"), np.stack(want))
    proc = run_cli("landmark-export", f"--workdir={workdir}", f"--export_dir={export_dir}",
                   "--image_size=40", "--scales=1,1.5")  # fmt: skip
    result = closing_json(proc)
    fresh = load_in_fresh_process(export_dir, B0_SIZES, os.path.join(root, "got.npz"))
    return {"root": root, "workdir": workdir, "dir": export_dir, "result": result,
            "stderr": proc.stderr, "fresh": fresh}  # fmt: skip


def tiny_model(embedding_dim: int, seed: int) -> keras.Model:
    """A small conv net with the embedding model's contract: float32 [B, H, W, 3] -> L2 [B, D]."""
    keras.utils.set_random_seed(seed)
    image = keras.Input(shape=(None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(image)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(embedding_dim)(x)
    return keras.Model(image, keras.layers.UnitNormalization()(x))


def write_tiny_export(path: str, *, image_size=32, embedding_dim=8, scales=(1.0,), seed=0,
                      overwrite=False):
    """An export in our format around `tiny_model` (fast to save); returns the Keras model."""
    model = tiny_model(embedding_dim, seed)
    sizes = export.scaled_sizes(image_size, scales)
    module = signatures.DescriptorModule([signatures.KerasBranch(model, sizes)], [1.0])
    metadata = {"format": export.FORMAT, "kind": "single", "backbone": "tiny-test-convnet",
                "image_size": image_size, "scales": list(scales), "input_sizes": sizes,
                "embedding_dim": embedding_dim}
    export.write_savedmodel(module, path, metadata, overwrite)
    return model


def tiny_export(name: str, **kwargs):
    """(path, Keras model) of a tiny export, written once per process."""
    if name not in _CACHE:
        path = os.path.join(_ROOT, name)
        _CACHE[name] = (path, write_tiny_export(path, **kwargs))
    return _CACHE[name]


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3] smooth gradients plus noise, so that the descriptors differ per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * rng.uniform(0.2, 2), yy * rng.uniform(0.2, 2), (xx + yy) * 0.5], -1)
    return np.clip(base % 256 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_image_tree(image_dir: str, sizes: dict[str, tuple[int, int]]) -> None:
    """JPEGs at IMAGE_DIR/a/b/c/<id>.jpg for each id -> (height, width)."""
    for i, (image_id, (h, w)) in enumerate(sorted(sizes.items())):
        folder = os.path.join(image_dir, image_id[0], image_id[1], image_id[2])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{image_id}.jpg"), "wb") as f:
            f.write(jpeg(random_image(h, w, seed=i)))


def write_records(path: str, rows: list[tuple[str, int, bytes]]) -> None:
    """One TFRecord shard of (id, landmark_id, encoded bytes)."""
    with tf.io.TFRecordWriter(path) as writer:
        for image_id, landmark_id, encoded in rows:
            writer.write(records.make_example(
                encoded=encoded, image_id=image_id, label=max(landmark_id, -1),
                landmark_id=landmark_id, height=0, width=0, is_clean=True))  # fmt: skip


def run_cli(name: str, *args: str) -> subprocess.CompletedProcess:
    """Runs an installed console script; TF logging quiet."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def closing_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and exactly one line on stderr that names the problem."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def load_in_fresh_process(export_dir: str, sizes: str, out_npz: str) -> dict:
    """Runs tests/load_savedmodel.py (imports only tensorflow + numpy); returns its JSON."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, LOAD_SCRIPT, export_dir, sizes, out_npz],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    return closing_json(proc)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF22_PYTHON = os.path.join(REPO, ".venv-tf22", "bin", "python")


def load_in_tf22(export_dir: str, sizes: str, out_npz: str) -> dict:
    """tests/load_savedmodel.py under Kaggle GLR2020's TensorFlow 2.2 (`make` builds .venv-tf22
    from Python 3.8); its JSON, after asserting that TF 2.2 printed no warning or error."""
    import pytest

    if not os.path.exists(TF22_PYTHON):
        pytest.skip("no .venv-tf22: `make test` builds it where a Python 3.8 exists")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": ""}  # fmt: skip
    proc = subprocess.run([TF22_PYTHON, LOAD_SCRIPT, export_dir, sizes, out_npz],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    result = closing_json(proc)
    assert result["tensorflow"] == "2.2.0", result
    said = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert not said, "TF 2.2 printed:\n" + "\n".join(said[:20])
    return result


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
