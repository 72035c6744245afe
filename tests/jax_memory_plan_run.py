"""Helper of tests/test_jax_memory.py (KERAS_BACKEND=jax): jax_memory.plan on the backend
parity run's small backbone at budgets between the compiled sizes of each accumulation.

  KERAS_BACKEND=jax python tests/jax_memory_plan_run.py   # prints one JSON line
"""

from __future__ import annotations

import json

import backend_parity_run as parity  # noqa: F401  (patches in the small backbone)

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.training import jax_memory

model_cfg = ModelConfig(image_size=64, embedding_dim=8, head="arcface", neck="dense_bn",
                        num_classes=4)
cfg = TrainConfig(batch_size=16, grad_accum_steps=0, train_steps=10)
compiler = jax_memory.StepCompiler(model_cfg, cfg, replicas=1)
sizes = {a: jax_memory.total_bytes(compiler.stats(a)) for a in (1, 2, 4, 8, 16)}
out = {"sizes": sizes, "plans": {}}
for name, budget in (("all", sizes[1] * 1.01), ("between_2_and_4", (sizes[2] + sizes[4]) / 2),
                     ("none", sizes[16] * 0.9)):
    hbm_gib = budget / jax_memory.HEADROOM / jax_memory.GIB
    r = jax_memory.plan(jax_memory.StepCompiler(model_cfg, cfg, 1), hbm_gib, "test", "cpu")
    out["plans"][name] = {k: r[k] for k in ("grad_accum_steps", "memory_check", "plan",
                                            "message")}
# Several TPU types: equal per-replica steps (v5e-1 and v6e-1: 16 images) compile once.
compiled = []
original = jax_memory.StepCompiler._compile
jax_memory.StepCompiler._compile = lambda self, *key: compiled.append(key) or original(self, *key)
many = jax_memory.check_each(model_cfg, cfg, ["v5e-1", "v6e-1", "v5e-2"])
out["check_each"] = {"compiled": compiled, "memory_check": many["memory_check"],
                     "by_tpu_type": {t: {k: r[k] for k in ("grad_accum_steps", "replicas")}
                                     for t, r in many["by_tpu_type"].items()}}
print(json.dumps(out))
