"""Several processes training one JAX run (TPU pod slices, multi-host GPU, CPU tests).

Every process runs the same `landmark-train` command; `initialize` joins them before JAX
starts its backends. After it, jax.devices() lists every process's devices and the JAX
trainer shards each global batch over all of them: each process reads the streams of its own
replicas (input_pipeline.replica_ids) and feeds only its local devices, process 0 writes
config, logs, summaries and checkpoints, and every process restores the same checkpoint.

  coordinator_address ""           one process (the default)
                      "auto"       jax.distributed.initialize() without arguments: JAX finds
                                   the cluster itself (Cloud TPU pod slices: every worker of
                                   the slice; also SLURM and Open MPI launches)
                      "HOST:PORT"  explicit: with num_processes and process_id (process 0
                                   serves the coordinator at that address)
TensorFlow's multi-worker training does not go through here: it reads TF_CONFIG
(--strategy=multi_worker).
"""

from __future__ import annotations

from landmark_tf.errors import UserError

AUTO = "auto"


def check(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """UserError naming the first inconsistent setting."""
    explicit = coordinator_address not in ("", AUTO)
    if not explicit and (num_processes or process_id >= 0):
        raise UserError("--num_processes and --process_id go with "
                        "--coordinator_address=HOST:PORT")
    if explicit:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--coordinator_address={coordinator_address}: expected HOST:PORT "
                            f"or {AUTO}")
        if num_processes < 1:
            raise UserError("--coordinator_address=HOST:PORT needs --num_processes >= 1")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id}: must be within 0..{num_processes - 1}"
                            f" (--num_processes={num_processes})")


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> int:
    """Joins this process to the run's others (see the module docstring); returns the number
    of processes. Must run before anything asks JAX for its devices."""
    check(coordinator_address, num_processes, process_id)
    if not coordinator_address:
        return 1
    import jax

    try:
        if coordinator_address == AUTO:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--coordinator_address={coordinator_address}: JAX could not join the "
                        f"processes: {first}") from None
    return jax.process_count()
