"""End to end through the installed console scripts, on whatever TensorFlow this venv has.

`make test` runs it in .venv-tf220 (tensorflow-cpu 2.20, the version `tensorflow-tpu` ships), so a
change that breaks the TPU's TensorFlow fails here rather than on a rented TPU. On TF 2.21 each
stage has its own tests, so in .venv it is marked slow (`make test-slow`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent


def _run(tmp: Path, prog: str, *args: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [str(BIN / prog), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{prog} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_synth_to_evaluate(tmp_path: Path) -> None:
    synth = _run(tmp_path, "landmark-synth", "--output_dir=d", "--num_landmarks=6",
                 "--min_images=4", "--max_images=6", "--novel_landmarks=2", "--image_size=48",
                 "--noprogress")
    assert synth["landmarks"] == 6
    rec = _run(tmp_path, "landmark-tfrecords", "--train_csv=d/train.csv",
               "--clean_csv=d/train_clean.csv", "--image_dir=d/train", "--output_dir=r/train",
               "--val_fraction=0", "--num_shards=2", "--noprogress")
    assert rec["classes"] == 6 and rec["skipped"] == 0
    for split in ("index", "test"):
        _run(tmp_path, "landmark-tfrecords", f"--csv=d/{split}.csv", f"--split={split}",
             f"--image_dir=d/{split}", f"--output_dir=r/{split}", "--num_shards=1",
             "--noprogress")
    train = _run(tmp_path, "landmark-train", "--data_dir=r/train", "--workdir=w",
                 "--backbone=efficientnet-b0", "--image_size=32", "--batch_size=8",
                 "--train_steps=3", "--embedding_dim=16", "--checkpoint_every=3")
    assert train["step"] == 3 and np.isfinite(train["loss"]) and train["images_per_second"] > 0
    exported = _run(tmp_path, "landmark-export", "--workdir=w", "--export_dir=e")
    assert exported["embedding_dim"] == 16 and (tmp_path / "e" / "saved_model.pb").exists()
    for split in ("index", "test"):
        emb = _run(tmp_path, "landmark-embed", "--model=e", f"--records=r/{split}/*.tfrec",
                   f"--output={split}.npz")
        assert emb["dim"] == 16 and emb["skipped"] == 0
    result = _run(tmp_path, "landmark-evaluate", "--index=index.npz", "--queries=test.npz",
                  "--solution=d/retrieval_solution_v2.1.csv", "--submission=sub.csv")
    assert 0.0 <= result["map@100"] <= 1.0
    assert (tmp_path / "sub.csv").read_text().splitlines()[0] == "id,images"
