"""Learning-rate schedules: linear warmup, then constant, cosine decay to zero, or inverse-time
decay (Keras 2's optimizer `decay`)."""

from __future__ import annotations

import math

import keras
from keras import ops

from landmark_tf.config import SCHEDULES


@keras.saving.register_keras_serializable(package="landmark_tf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) for optimizer step `step` (0-based), float32 scalar.

    Warmup: peak * (step + 1) / warmup_steps for step < warmup_steps (so step 0 trains already).
    Then `constant`: peak; `cosine`: peak * (1 + cos(pi * t)) / 2 with t going 0 -> 1 from the end
    of warmup to `total_steps`, and 0 after; `inverse_time`: peak / (1 + decay * step), the
    `decay` of Keras 2 optimizers (`SGD(1e-3, momentum=0.9, decay=1e-5)` in the GLR2020 winner's
    notebooks: OptimizerV2._decayed_lr divides by 1 + decay * iterations, iterations counted from
    0 before the update), with `step` counted from 0 like theirs; it does not depend on
    `total_steps`, so a finished run can be extended.
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
                 decay: float = 0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind
        self.decay = float(decay)

    def __call__(self, step):
        # keras.ops: the JAX trainer calls this inside its jit-compiled step.
        step = ops.cast(step, "float32")
        peak = ops.convert_to_tensor(self.peak, "float32")
        if self.kind == "constant":
            after = peak
        elif self.kind == "inverse_time":
            after = peak / (1.0 + self.decay * step)
        else:
            span = float(max(self.total_steps - self.warmup_steps, 1))
            t = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            after = 0.5 * peak * (1.0 + ops.cos(math.pi * t))
        if self.warmup_steps <= 0:
            return after
        warm = peak * (step + 1.0) / float(self.warmup_steps)
        return ops.where(step < self.warmup_steps, warm, after)

    def get_config(self):
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
            "decay": self.decay,
        }
