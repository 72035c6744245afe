"""JAX over several processes: 2 processes x 1 CPU device (JAX's CPU collectives over
localhost) train like 1 process x 2 devices, and a 2-process run killed with SIGKILL resumes
step-exactly from its checkpoint."""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from checkpoint_state import read
from tiny_dataset import make_dataset

pytest.importorskip("jax")
HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(HERE, "multihost_run.py")


def _env(devices: int, **extra) -> dict:
    return {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2",
            "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(data: str, workdir: str, **extra) -> list[subprocess.CompletedProcess]:
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, HELPER, data, workdir, address, "2", str(i)],
                              env=_env(1, **extra), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _losses(workdir: str) -> dict[int, float]:
    """Per-step train loss from the TensorBoard events (the last write of a step wins)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(workdir, "logs", "train", "events.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for v in event.summary.value:
                if v.tag == "loss":
                    found[event.step] = float(tf.make_ndarray(v.tensor))
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    data = str(root / "data")
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=(2, 2, 2, 2), size=32)
    one = str(root / "one_process")
    proc = subprocess.run([sys.executable, HELPER, data, one], env=_env(2),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = str(root / "two_processes")
    killed = _two_processes(data, two, KILL_AT_STEP="3")
    resumed = _two_processes(data, two)
    return one, two, killed, resumed


def test_two_processes_train_like_two_devices_of_one_and_resume_after_kill_9(runs):
    one, two, killed, resumed = runs
    assert [p.returncode for p in killed] == [-9, -9], [p.stderr[-2000:] for p in killed]
    assert [p.returncode for p in resumed] == [0, 0], [p.stderr[-3000:] for p in resumed]
    results = [_read_json(os.path.join(two, f"result-{i}.json")) for i in (0, 1)]
    single = _read_json(os.path.join(one, "result-0.json"))
    assert single["processes"] == 1 and single["local_devices"] == 2
    for r in results:
        assert r["processes"] == 2 and r["local_devices"] == 1 and r["replicas"] == 2
        assert r["step"] == 6 and r["start_step"] == 2
        assert r["resumed_from"].endswith("ckpt-2")
    # The loss curve: steps 1-3 from the killed run, 3-6 from the resumed one.
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)],
                               rtol=2e-5, atol=1e-6)
    # Weights, optimizer slots, BN statistics: only process 0 wrote the checkpoints.
    final = read(os.path.join(one, "checkpoints", "ckpt-6"))
    other = read(os.path.join(two, "checkpoints", "ckpt-6"))
    assert final.keys() == other.keys()
    for key, value in final.items():
        if not key.startswith("seed_states/"):
            np.testing.assert_allclose(other[key], value, rtol=2e-4, atol=2e-5, err_msg=key)
