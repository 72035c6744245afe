"""Memory before money: compile one replica's train step for the run's flags, without data, and
read XLA's memory analysis (`landmark-train --memory_check --tpu_type=v3-8`).

The step is the JAX trainer's (jax_step) for one replica's share of the batch under data
parallelism: every replica holds the weights, the optimizer slots, its batch and the step's
temporaries. `jax.jit(step).lower(shapes).compile().memory_analysis()` gives the bytes XLA's
buffer assignment needs on the backend that compiles: exact on the named TPU itself; on a CPU or
GPU host an estimate (XLA:CPU computes bfloat16 in float32, so temporaries can be up to ~2x what
a TPU needs), which the verdict says.

HBM per JAX device, from Google Cloud's TPU pages (cloud.google.com/tpu/docs/v2 ... /v6e): v2
16 GiB per chip = 8 per TensorCore, v3 32 per chip = 16 per core (each core a device); v4 32 and
v5p 95 per chip (megacore: one device per chip, the "-N" of the type counts TensorCores, 2 per
chip); v5e 16, v6e 32 per chip (one core per chip; "-N" counts chips).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import keras
import numpy as np

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import model
from landmark_tf.training import distribute, jax_step, jax_trainer, train

GIB = 1 << 30
# generation: (GiB of HBM per JAX device, TensorCores per device, whether "-N" counts cores)
TPU_TYPES = {
    "v2": (8, 1, True), "v3": (16, 1, True), "v4": (32, 2, True), "v5p": (95, 2, True),
    "v5e": (16, 1, False), "v5litepod": (16, 1, False), "v6e": (32, 1, False),
}


def parse_tpu_type(tpu_type: str) -> tuple[int, float]:
    """'v3-8' -> (8 replicas, 16 GiB per replica); UserError for an unknown type."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", tpu_type.strip().lower())
    if not match or match.group(1) not in TPU_TYPES:
        raise UserError(f"--tpu_type={tpu_type}: expected e.g. v2-8, v3-8, v4-8, v5e-8, "
                        f"v5p-8, v6e-8 (generations {', '.join(TPU_TYPES)})")
    gib, cores, counts_cores = TPU_TYPES[match.group(1)]
    n = int(match.group(2))
    devices = n // cores if counts_cores else n
    if devices < 1:
        raise UserError(f"--tpu_type={tpu_type}: too few cores for one device")
    return devices, float(gib)


def check(model_cfg: ModelConfig, cfg: TrainConfig, tpu_type: str) -> dict[str, Any]:
    """Compiles one replica's train step for `tpu_type`; returns sizes and the verdict."""
    replicas, hbm_gib = parse_tpu_type(tpu_type)
    micro = distribute.per_replica_batch(cfg.batch_size, replicas, cfg.grad_accum_steps)
    per_step = micro * cfg.grad_accum_steps
    policy = jax_trainer.precision_policy(cfg.mixed_precision, "tpu")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        models = model.build_models(model_cfg.validate())
        net = models.train_model
        optimizer = train.make_optimizer(cfg, max(cfg.train_steps, 1),
                                            net.trainable_variables, policy)
        step = jax_step.make_train_step(net, optimizer, global_batch=cfg.batch_size,
                                        accum_steps=cfg.grad_accum_steps)
        abstract = lambda vs: [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in vs]
        state = (abstract(net.trainable_variables), abstract(net.non_trainable_variables),
                 abstract(optimizer.variables))
        size = model_cfg.image_size
        batch = {"image": jax.ShapeDtypeStruct((per_step, size, size, 3), np.float32),
                 "label": jax.ShapeDtypeStruct((per_step,), np.int32),
                 "weight": jax.ShapeDtypeStruct((per_step,), np.float32),
                 "flip": jax.ShapeDtypeStruct((per_step,), np.bool_)}
        compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile()
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return report(compiled.memory_analysis(), tpu_type, replicas, hbm_gib, micro,
                  jax.devices()[0].platform, policy)


def report(ma, tpu_type: str, replicas: int, hbm_gib: float, micro: int, platform: str,
           policy: str) -> dict[str, Any]:
    """The closing JSON of a memory check from XLA's CompiledMemoryStats."""
    sizes = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in
             ("argument", "output", "alias", "temp", "generated_code")}
    total = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + \
        sizes["generated_code"]
    gib = total / GIB
    exact = platform == "tpu"
    if gib <= hbm_gib:
        verdict = "fits"
    elif exact or gib / 2 > hbm_gib:
        verdict = "does not fit"
    else:
        verdict = "may not fit"
    where = ("compiled on this TPU: exact" if exact else f"compiled on {platform}: bfloat16 is "
             "computed in float32 here, so this can be up to ~2x what the TPU needs")
    line = (f"{tpu_type}: {micro} image(s) per replica x {replicas} replicas need "
            f"{gib:.2f} GiB per replica (weights+optimizer+batch {sizes['argument'] / GIB:.2f}, "
            f"temporaries {sizes['temp'] / GIB:.2f}): {verdict} in {hbm_gib:g} GiB ({where})")
    return {"memory_check": verdict, "message": line, "tpu_type": tpu_type,
            "replicas": replicas, "per_replica_batch": micro, "hbm_gib": hbm_gib,
            "per_replica_gib": round(gib, 3), "compiled_on": platform,
            "mixed_precision": policy, **{f"{k}_bytes": v for k, v in sizes.items()}}
