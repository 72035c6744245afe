"""scripts/pretrain_synthetic.sh: makes a pretrained start once (a rerun is a cache hit that runs
no stage), and landmark-train --init_from restores its backbone and neck under a new head."""

import json
import os
import subprocess
import sys

import pytest

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "pretrain_synthetic.sh")
# Tiny: 3 landmarks of 2-3 images, 2 steps of 4 images at 32 px on keras-hub's tiny random
# EfficientNetV2 (B0's build and first step would double the test's time); the recipe's sizes
# and backbone are env settings of the script.
BACKBONE = "hub:tiny_efficientnetv2"
TINY = {"PRETRAIN_BACKBONE": BACKBONE, "PRETRAIN_LANDMARKS": "3", "PRETRAIN_STEPS": "2",
        "PRETRAIN_IMAGE_SIZE": "32", "PRETRAIN_BATCH": "4", "PRETRAIN_SEED": "7",
        "PRETRAIN_SYNTH_FLAGS": "--min_images=2 --max_images=3 --image_size=32 "
                                "--novel_landmarks=0 --nonlandmark_images=0"}


def _run(out: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **TINY, **env, "TF_CPP_MIN_LOG_LEVEL": "2",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
            "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(["bash", SCRIPT, out], env=full, capture_output=True, text=True)


def test_pretrain_is_cached_and_starts_a_fine_tune(tmp_path):
    pytest.importorskip("keras_hub")
    out = str(tmp_path / "pretrain")
    first = _run(out)
    assert first.returncode == 0, first.stderr[-2000:]
    info = json.loads(first.stdout.strip().splitlines()[-1])
    assert info["init_from"] == os.path.join(out, "run")
    assert info["seed"] == 7 and info["steps"] == 2 and info["train"]["step"] == 2
    with open(os.path.join(out, "gldv2", "synth_config.json")) as f:
        synth = json.load(f)
    assert (synth["seed"], synth["noisy_fraction"], synth["num_landmarks"]) == (7, 0.0, 3)
    stamps = {n: os.path.getmtime(os.path.join(out, "logs", n)) for n in os.listdir(
        os.path.join(out, "logs"))}

    again = _run(out)  # a cache hit: the same closing line, no stage run (no log rewritten)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "$ landmark-" not in again.stderr
    assert stamps == {n: os.path.getmtime(os.path.join(out, "logs", n)) for n in stamps}

    # A fine-tune from it (on the start's own records: any data would do) restores the start's
    # backbone and neck.
    r = train.train(ModelConfig(backbone=BACKBONE, image_size=32, embedding_dim=128),
                    TrainConfig(data_dir=os.path.join(out, "tfrecords"),
                                workdir=str(tmp_path / "fine"), train_steps=1, batch_size=4,
                                learning_rate=0.01, val_split="", init_from=info["init_from"]))
    assert {"backbone", "neck"} <= set(r["init_from"]["restored"])


def test_pretrain_needs_one_output_dir():
    bad = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
