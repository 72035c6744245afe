"""landmark-train --memory_check: TPU types and the fits / does-not-fit verdict."""

import types

import pytest

pytest.importorskip("jax")
from landmark_tf.errors import UserError  # noqa: E402
from landmark_tf.training import jax_memory  # noqa: E402

GIB = 1 << 30


@pytest.mark.parametrize("tpu_type, replicas, gib", [
    ("v2-8", 8, 8), ("v3-8", 8, 16), ("v3-32", 32, 16), ("v4-8", 4, 32), ("v5p-8", 4, 95),
    ("v5e-8", 8, 16), ("v5litepod-16", 16, 16), ("v6e-8", 8, 32),
])
def test_tpu_types(tpu_type, replicas, gib):
    assert jax_memory.parse_tpu_type(tpu_type) == (replicas, gib)


@pytest.mark.parametrize("bad", ["v3", "v9-8", "tpu", "v4-1"])
def test_unknown_tpu_type_is_a_user_error(bad):
    with pytest.raises(UserError, match="--tpu_type"):
        jax_memory.parse_tpu_type(bad)


def _stats(temp_gib: float):
    return types.SimpleNamespace(argument_size_in_bytes=GIB, output_size_in_bytes=GIB,
                                 alias_size_in_bytes=GIB, temp_size_in_bytes=int(temp_gib * GIB),
                                 generated_code_size_in_bytes=0)


@pytest.mark.parametrize("temp, platform, verdict", [
    (10, "cpu", "fits"), (20, "cpu", "may not fit"), (40, "cpu", "does not fit"),
    (20, "tpu", "does not fit"), (14, "tpu", "fits"),
])
def test_verdict(temp, platform, verdict):
    r = jax_memory.report(_stats(temp), "v3-8", 8, 16.0, 16, platform, "mixed_bfloat16")
    assert r["memory_check"] == verdict
    assert r["per_replica_gib"] == pytest.approx(temp + 1)
    assert f"{verdict} in 16 GiB" in r["message"] and "16 image(s) per replica" in r["message"]


def test_accumulations_split_the_batch_and_groups():
    assert jax_memory.accumulations(8) == [1, 2, 4, 8]
    assert jax_memory.accumulations(8, batch_classes=2) == [1, 2, 4]


class _CurvedCompiler:
    """A stand-in StepCompiler whose bytes grow with the square of the micro-batch (convex:
    the line through the two ends overestimates the middle, so its prediction is too many
    micro-batches)."""

    def __init__(self, batch: int):
        self.cfg = types.SimpleNamespace(batch_size=batch, batch_classes=0)
        self.replicas, self.policy, self.compiled = 1, "float32", []

    def micro(self, accum: int) -> int:
        return self.cfg.batch_size // accum

    def stats(self, accum: int):
        self.compiled.append(accum)
        return _stats(self.micro(accum) ** 2 / 64 - 1)  # total_bytes: m^2 / 64 GiB


def test_plan_walks_back_to_fewer_micro_batches_where_the_line_overestimates():
    compiler = _CurvedCompiler(64)  # m = 64: 64 GiB, 32: 16, 16: 4, 1: ~0
    r = jax_memory.plan(compiler, 20.0 / jax_memory.HEADROOM, "fake", "cpu")  # budget 20 GiB
    # The line through (1, 0) and (64, 64) predicts m <= 20, i.e. 16 per micro-batch; 32 fits.
    assert r["grad_accum_steps"] == 2 and r["memory_check"] == "fits"
    assert 4 in compiler.compiled  # the prediction, then one fewer micro-batch count


def test_plan_takes_the_fewest_micro_batches_that_fit():
    """On a small model's real compiled steps: a budget that fits everything keeps one
    micro-batch; one between the sizes at 2 and 4 micro-batches picks 4; one below even 16
    (one image per micro-batch) does not fit."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, os.path.join(here, "jax_memory_plan_run.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    sizes = {int(k): v for k, v in r["sizes"].items()}
    assert sizes[1] > sizes[2] > sizes[4] > sizes[16]  # temporaries scale with the micro-batch
    plans = r["plans"]
    assert plans["all"]["grad_accum_steps"] == 1 and plans["all"]["memory_check"] == "fits"
    assert list(plans["all"]["plan"]) == ["1"]  # one compile when the recipe fits
    mid = plans["between_2_and_4"]
    assert mid["grad_accum_steps"] == 4 and mid["memory_check"] == "fits"
    assert len(mid["plan"]) <= 4 and "chose --grad_accum_steps=4" in mid["message"]
    assert plans["none"]["memory_check"] == "does not fit"
    assert "nothing fits" in plans["none"]["message"]
    many = r["check_each"]  # v5e-1, v6e-1 (16 images per replica), v5e-2 (8)
    assert sorted(map(tuple, many["compiled"])) == [(8, 1), (16, 1)]
    assert many["memory_check"] == "fits"
    assert many["by_tpu_type"]["v6e-1"] == {"grad_accum_steps": 1, "replicas": 1}
    assert many["by_tpu_type"]["v5e-2"]["replicas"] == 2


def test_an_empty_tpu_type_list_is_a_user_error():
    with pytest.raises(UserError, match="--tpu_type: name at least one"):
        jax_memory.check_each(None, None, [])

