"""One training run, two backends: on 2 devices each (TensorFlow's MirroredStrategy over 2
logical CPUs, JAX over 2 virtual CPU devices), every head trains to the same weights, BatchNorm
statistics mean the same for each --bn_statistics setting (and the two settings differ), a
workdir written by TensorFlow resumes under JAX step-exactly, and --init_from refuses a head
of another label map on both."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from checkpoint_state import read
from tiny_dataset import make_dataset

from landmark_tf.config import HEADS, TAG_HEADS

pytest.importorskip("jax")
HERE = os.path.dirname(os.path.abspath(__file__))


def _run(backend: str, data: str, out, tf_out=None) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = [sys.executable, os.path.join(HERE, "backend_parity_run.py"), data, str(out)]
    proc = subprocess.run(args + ([str(tf_out)] if tf_out else []), env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    data = str(root / "data")
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=(2, 2, 2, 2), size=32)
    tf_results = _run("tensorflow", data, root / "tf")
    jax_results = _run("jax", data, root / "jax", tf_out=root / "tf")
    return root, tf_results, jax_results


def _final(root, backend: str, run: str) -> dict:
    state = read(str(root / backend / run / "checkpoints" / "ckpt-4"))
    # Optimizer variables are named after the variables they follow (global name counters
    # differ between processes): compare them by position, which the model files pin.
    return {k: v for k, v in state.items() if not k.startswith("seed_states/")}


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        np.testing.assert_allclose(b[key], value, rtol=2e-4, atol=2e-5, err_msg=f"{what} {key}")


def test_every_head_trains_the_same_on_two_devices_under_both_backends(runs):
    root, tf_results, jax_results = runs
    assert len(tf_results["runs"]) == len(set(HEADS) - set(TAG_HEADS)) + 1
    for head, bn in tf_results["runs"]:
        name = f"{head}-{bn}"
        assert tf_results[name]["replicas"] == jax_results[name]["replicas"] == 2
        assert tf_results[name]["bn_statistics"] == bn
        np.testing.assert_allclose(jax_results[name]["loss"], tf_results[name]["loss"],
                                   rtol=2e-4, err_msg=name)
        _assert_close(_final(root, "tf", name), _final(root, "jax", name), name)


def test_retrieval_validation_runs_and_agrees_under_both_backends(runs):
    _, tf_results, jax_results = runs
    for run in ("arcface-replica", "arcface-global"):
        tf_map, jax_map = (r[run]["retrieval_map@100"] for r in (tf_results, jax_results))
        assert 0.0 < tf_map <= 1.0
        assert jax_map == pytest.approx(tf_map, abs=1e-4), run


def test_replica_and_global_batch_statistics_differ_and_match_across_backends(runs):
    root = runs[0]
    for backend in ("tf", "jax"):
        per_replica = _final(root, backend, "arcface-replica")
        overall = _final(root, backend, "arcface-global")
        moving = [k for k in per_replica if k.endswith(("vars/2", "vars/3")) and (
            k.startswith("backbone/layers/batch_normalization") or k.startswith("neck/bn/"))]
        assert len(moving) == 4, moving  # moving mean and variance of two BatchNorms
        assert any(not np.allclose(per_replica[k], overall[k], rtol=1e-3) for k in moving)


def test_a_tensorflow_workdir_resumes_under_jax_step_exactly(runs):
    root, _, jax_results = runs
    resumed = jax_results["resumed"]
    assert resumed["backend"] == "jax" and resumed["start_step"] == 2 and resumed["step"] == 4
    assert resumed["resumed_from"].endswith("ckpt-2")
    got = read(str(root / "jax" / "resumed" / "checkpoints" / "ckpt-4"))
    want = read(str(root / "tf" / "arcface-replica" / "checkpoints" / "ckpt-4"))
    _assert_close({k: v for k, v in want.items() if not k.startswith("seed_states/")},
                  {k: v for k, v in got.items() if not k.startswith("seed_states/")},
                  "resumed")
    with open(root / "jax" / "resumed" / "config.json") as f:
        assert json.load(f)["train"]["backend"] == "jax"


def test_init_from_refuses_a_head_of_another_label_map_under_both_backends(runs):
    for results in runs[1:]:
        message = results["init_from_refusal"]
        assert message and "another label_map.csv" in message and "\n" not in message
