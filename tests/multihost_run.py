"""Helper of tests/test_multihost.py: one JAX process of a training run that may span several
processes (the backend parity run's small backbone, the same initial weights everywhere).

  python tests/multihost_run.py DATA WORKDIR [HOST:PORT NUM_PROCESSES PROCESS_ID]

With KILL_AT_STEP=s in the environment the process SIGKILLs itself once step s is done (after
the checkpoint before it is written). Writes WORKDIR/result-<process>.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys

from landmark_tf.training import processes

if len(sys.argv) > 3:  # before anything asks JAX for its devices
    processes.initialize(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))

import backend_parity_run as parity  # noqa: E402  (patches in the small backbone)
import jax  # noqa: E402

from landmark_tf.training import train  # noqa: E402

STEPS = 6


def main(data: str, workdir: str) -> None:
    model_cfg, cfg = parity.configs(data, workdir, "arcface", "replica")
    cfg = dataclasses.replace(cfg, train_steps=STEPS, steps_per_execution=1)
    run = train.Run(model_cfg, cfg, train.make_plan(cfg))
    kill_at = int(os.environ.get("KILL_AT_STEP", "0"))

    def kill(step, n, total, writer):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    run.step_hooks.append(kill)
    r = run.run()
    r["processes"], r["local_devices"] = jax.process_count(), jax.local_device_count()
    with open(os.path.join(workdir, f"result-{jax.process_index()}.json"), "w") as f:
        json.dump(r, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
