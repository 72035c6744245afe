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
# Share of a device's memory a plan fills: the runtime keeps some for itself (infeed buffers,
# fragmentation), which XLA's analysis of one program does not count.
HEADROOM = 0.95
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


class StepCompiler:
    """One replica's train step for (model_cfg, cfg), compiled without data at any
    accumulation: `stats(accum)` -> XLA's CompiledMemoryStats. The models are built once.

    cache: {(images per replica and step, accumulation): stats}, shared between compilers of
    the same flags for other replica counts: the step a replica compiles depends only on those
    two numbers, so TPU types with the same per-replica batch reuse each other's compilations.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, replicas: int,
                 cache: dict | None = None):
        self.cfg, self.replicas, self.size = cfg, replicas, model_cfg.image_size
        self.cache = {} if cache is None else cache
        self.policy = jax_trainer.precision_policy(cfg.mixed_precision, "tpu")
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.policy)
        try:
            models = model.build_models(model_cfg.validate())
            self.net = models.train_model
            self.optimizer = train.make_optimizer(cfg, max(cfg.train_steps, 1),
                                                  self.net.trainable_variables, self.policy)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        abstract = lambda vs: [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in vs]
        self.state = (abstract(self.net.trainable_variables),
                      abstract(self.net.non_trainable_variables),
                      abstract(self.optimizer.variables))

    def micro(self, accum: int) -> int:
        return distribute.per_replica_batch(self.cfg.batch_size, self.replicas, accum)

    def stats(self, accum: int):
        per_step = self.micro(accum) * accum
        if (per_step, accum) not in self.cache:
            self.cache[per_step, accum] = self._compile(per_step, accum)
        return self.cache[per_step, accum]

    def _compile(self, per_step: int, accum: int):
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.policy)
        try:
            step = jax_step.make_train_step(self.net, self.optimizer,
                                            global_batch=self.cfg.batch_size, accum_steps=accum)
            size = self.size
            batch = {"image": jax.ShapeDtypeStruct((per_step, size, size, 3), np.float32),
                     "label": jax.ShapeDtypeStruct((per_step,), np.int32),
                     "weight": jax.ShapeDtypeStruct((per_step,), np.float32),
                     "flip": jax.ShapeDtypeStruct((per_step,), np.bool_)}
            compiled = jax.jit(step, donate_argnums=(0,)).lower(self.state, batch).compile()
        finally:
            keras.mixed_precision.set_global_policy(previous)
        return compiled.memory_analysis()


def check_each(model_cfg: ModelConfig, cfg: TrainConfig,
               tpu_types: list[str]) -> dict[str, Any]:
    """`check` for each TPU type, sharing the compilations of equal per-replica steps; prints
    each type's message as it is done. One type: its `check` dict; several: {"memory_check":
    the worst verdict, "by_tpu_type": {type: its dict}}."""
    if not tpu_types:
        raise UserError("--tpu_type: name at least one TPU type, e.g. v5e-1")
    for tpu_type in tpu_types:
        parse_tpu_type(tpu_type)  # every name checked before the first compilation
    cache, results = {}, {}
    for tpu_type in tpu_types:
        results[tpu_type] = check(model_cfg, cfg, tpu_type, cache)
        print(results[tpu_type]["message"], flush=True)
    if len(tpu_types) == 1:
        return results[tpu_types[0]]
    order = ("fits", "may not fit", "does not fit")
    worst = max((r["memory_check"] for r in results.values()), key=order.index)
    return {"memory_check": worst, "by_tpu_type": results}


def check(model_cfg: ModelConfig, cfg: TrainConfig, tpu_type: str,
          cache: dict | None = None) -> dict[str, Any]:
    """Compiles one replica's train step for `tpu_type`; returns sizes and the verdict. With
    cfg.grad_accum_steps 0 (auto) it first plans the accumulation (`plan`). cache: see
    StepCompiler."""
    replicas, hbm_gib = parse_tpu_type(tpu_type)
    compiler = StepCompiler(model_cfg, cfg, replicas, cache)
    platform = jax.devices()[0].platform
    if cfg.grad_accum_steps == 0:
        return plan(compiler, hbm_gib, tpu_type, platform)
    return report(compiler.stats(cfg.grad_accum_steps), tpu_type, replicas, hbm_gib,
                  compiler.micro(cfg.grad_accum_steps), platform, compiler.policy)


def total_bytes(ma) -> int:
    """What a replica holds during the step: arguments + outputs (less the donated aliases)
    + temporaries + code."""
    return (int(ma.argument_size_in_bytes) + int(ma.output_size_in_bytes)
            - int(ma.alias_size_in_bytes) + int(ma.temp_size_in_bytes)
            + int(ma.generated_code_size_in_bytes))


def accumulations(per_replica: int, batch_classes: int = 0) -> list[int]:
    """Accumulation counts that split a replica's batch into whole micro-batches (and whole
    groups of batch_classes), fewest first."""
    return [a for a in range(1, per_replica + 1) if per_replica % a == 0
            and (not batch_classes or (per_replica // a) % batch_classes == 0)]


def plan(compiler: StepCompiler, hbm_gib: float, where: str, platform: str) -> dict[str, Any]:
    """The fewest micro-batches per step whose compiled step fits HEADROOM x `hbm_gib`,
    keeping the global batch: compiles 1 accumulation, then (if that does not fit) the most,
    reads the bytes per micro-batch image off the two, and verifies the predicted count,
    stepping to more micro-batches until one fits, then to fewer while they fit. Returns
    report()'s dict with "grad_accum_steps" and "plan" (the compiled candidates); "does not
    fit" when even one image (or one group) per micro-batch does not."""
    cfg = compiler.cfg
    per_replica = distribute.per_replica_batch(cfg.batch_size, compiler.replicas, 1)
    options = accumulations(per_replica, cfg.batch_classes)
    if not options:
        raise UserError(f"--batch_classes={cfg.batch_classes} does not divide the per-replica "
                        f"batch {per_replica}")
    budget = HEADROOM * hbm_gib * GIB
    tried: dict[int, Any] = {}

    def fits(accum: int) -> bool:
        if accum not in tried:
            tried[accum] = compiler.stats(accum)
        return total_bytes(tried[accum]) <= budget

    chosen = None
    if fits(options[0]):
        chosen = options[0]
    elif len(options) > 1 and fits(options[-1]):
        # total(m) ~ fixed + m * per_image over the micro-batch size m (temporaries scale with
        # m; weights, optimizer slots and the step's images do not).
        m_hi, m_lo = compiler.micro(options[0]), compiler.micro(options[-1])
        t_hi, t_lo = total_bytes(tried[options[0]]), total_bytes(tried[options[-1]])
        per_image = (t_hi - t_lo) / max(m_hi - m_lo, 1)
        m_fit = m_lo + (budget - t_lo) / per_image if per_image > 0 else m_hi
        start = next((i for i, a in enumerate(options) if compiler.micro(a) <= m_fit),
                     len(options) - 1)
        i = next(j for j in range(start, len(options)) if fits(options[j]))
        # The line through the two ends can underestimate what fits: fewer micro-batches
        # while they fit (options[0] is known not to).
        while i > 1 and fits(options[i - 1]):
            i -= 1
        chosen = options[i]
    accum = chosen if chosen is not None else options[-1]
    result = report(tried[accum], where, compiler.replicas, hbm_gib, compiler.micro(accum),
                    platform, compiler.policy)
    if chosen is None:
        result["memory_check"] = "does not fit"
    steps = ", ".join(f"{compiler.micro(a)} x {a}: {total_bytes(tried[a]) / GIB:.2f} GiB"
                      for a in sorted(tried))
    result["plan"] = {str(a): round(total_bytes(tried[a]) / GIB, 3) for a in sorted(tried)}
    result["grad_accum_steps"] = accum
    result["message"] = (
        f"accumulation plan for {where} ({hbm_gib:g} GiB per replica, planned to "
        f"{HEADROOM:.0%} of it): compiled (micro-batch x accumulation) {steps}; "
        + (f"chose --grad_accum_steps={accum} ({compiler.micro(accum)} image(s) per replica "
           f"and micro-step, global batch {cfg.batch_size} kept). " if chosen is not None else
           f"nothing fits, even {compiler.micro(accum)} image(s) per micro-step: lower "
           "--image_size, use --mixed_precision=bfloat16 or a larger device. ")
        + result["message"])
    return result


def report(ma, tpu_type: str, replicas: int, hbm_gib: float, micro: int, platform: str,
           policy: str) -> dict[str, Any]:
    """The closing JSON of a memory check from XLA's CompiledMemoryStats."""
    sizes = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in
             ("argument", "output", "alias", "temp", "generated_code")}
    gib = total_bytes(ma) / GIB
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
