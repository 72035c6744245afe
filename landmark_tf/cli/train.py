"""landmark-train: trains a landmark model on a landmark-tfrecords folder into a workdir.

  landmark-train --data_dir=gs://b/gldv2_clean --workdir=gs://b/runs/b0_512 --train_steps=20000

Rerunning the same command resumes where it stopped (also after kill -9 or a TPU preemption).
The last stdout line is JSON: step, loss, accuracy, images_per_second, ...
"""

from __future__ import annotations

import dataclasses

from absl import flags

from landmark_tf import config
from landmark_tf.cli import app as app_lib
from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.errors import UserError

_M, _T = ModelConfig(), TrainConfig()
_CHOICES: dict[str, tuple[str, ...]] = {}


def _define_choice(name: str, default: str, choices: tuple[str, ...], help_text: str) -> None:
    """A string flag with a fixed set of values, checked in main() so that a bad value is a
    one-line UserError (exit 2) like every other bad input."""
    _CHOICES[name] = choices
    flags.DEFINE_string(name, default, f"One of {', '.join(choices)}. {help_text}")

# Data and run.
flags.DEFINE_string("data_dir", None, "A landmark-tfrecords output folder (local or gs://); "
                    "classes and per-class counts come from its dataset_info.json.")
flags.DEFINE_string("workdir", None, "Run folder: config.json, checkpoints/, logs/ (TensorBoard),"
                    " summary.json. Rerunning into it resumes; a conflicting config is an error.")
flags.DEFINE_string("train_split", _T.train_split, "Split of --data_dir to train on.")
flags.DEFINE_string("val_split", _T.val_split, "Split for validation accuracy (top-1 of the "
                    "cosine head without margin), used when present; empty disables.")
flags.DEFINE_integer("train_steps", None, "Total optimizer steps (give this or --epochs). 0 "
                     "trains nothing: a checkpoint of the initial weights (random, "
                     "--pretrained_weights or --init_from) that exports like any run.")
flags.DEFINE_float("epochs", None, "Training length in passes over the train split "
                   "(alternative to --train_steps; may be fractional).")
flags.DEFINE_integer("batch_size", _T.batch_size, "Global batch per optimizer step (over all "
                     "replicas and accumulation steps); must split evenly over them.")
flags.DEFINE_integer("checkpoint_every", _T.checkpoint_every, "Steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", _T.keep_checkpoints, "Checkpoints kept in the workdir.")
flags.DEFINE_integer("eval_every", _T.eval_every, "Steps between validations; 0 = every epoch.")
flags.DEFINE_string("retrieval_queries", None,
                    "Held-out retrieval validation: labelled query TFRecords (glob), embedded "
                    "with the model in training; mAP@100 against --retrieval_index goes to "
                    "TensorBoard (logs/retrieval) and the closing JSON.")
flags.DEFINE_string("retrieval_index", None, "Labelled index TFRecords (glob) for it.")
flags.DEFINE_integer("retrieval_every", 0, "Steps between retrieval validations; 0 = "
                     "--eval_every (or every epoch).")
flags.DEFINE_integer("seed", _T.seed, "Seed of initial weights, data order and augmentation.")
# Optimisation.
flags.DEFINE_float("learning_rate", _T.learning_rate, "Peak learning rate of SGD.")
flags.DEFINE_float("momentum", _T.momentum, "SGD momentum.")
flags.DEFINE_float("weight_decay", _T.weight_decay, "Decoupled weight decay (lr-scaled) on "
                   "kernels; not on biases, normalisation parameters or GeM p.")
flags.DEFINE_float("bn_momentum", _T.bn_momentum, "Momentum of the moving mean/variance of "
                   "every BatchNorm (backbone and neck), used at inference. 0.99 (Keras's) "
                   "averages ~100 steps: runs of a few hundred steps want 0.9, else inference "
                   "uses statistics of earlier weights.")
_define_choice("bn_statistics", _T.bn_statistics, config.BN_STATISTICS, "Batch statistics of "
               "every BatchNorm on several replicas, the same under both backends. replica: "
               "each replica (TPU core, GPU) normalises with its own micro-batch, the moving "
               "statistics are the replicas' mean after each step (tf.keras's TPU behaviour; "
               "no communication in the forward pass). global: statistics over all replicas' "
               "micro-batch (sync BatchNorm: one all-reduce per layer; under TensorFlow not "
               "with --grad_accum_steps > 1).")
_define_choice("schedule", _T.schedule, config.SCHEDULES, "Learning-rate schedule after "
                  "warmup: constant, cosine decay to 0 at the last step, or inverse_time: "
                  "lr / (1 + lr_decay * step), Keras 2's optimizer decay.")
flags.DEFINE_integer("warmup_steps", _T.warmup_steps, "Linear warmup steps.")
flags.DEFINE_float("lr_decay", _T.lr_decay, "Per-step decay of --schedule=inverse_time (the "
                   "GLR2020 winner: SGD(decay=1e-5)).")
flags.DEFINE_string("grad_accum_steps", str(_T.grad_accum_steps), "Micro-batches accumulated "
                    "per optimizer step (memory of batch_size / grad_accum_steps), or 'auto' "
                    "(JAX): the fewest whose compiled step fits the device's memory, from XLA's "
                    "memory analysis (on CPU: 1); with --memory_check, fits --tpu_type. The "
                    "global batch, and so the recipe, stays.")
# Long tail.
_define_choice("sampling", _T.sampling, config.SAMPLINGS, "Class frequency in the input: "
                  "uniform (as stored), class_balanced (each class equally often), log "
                  "(proportional to ln(1 + count)).")
_define_choice("class_weighting", _T.class_weighting, config.CLASS_WEIGHTINGS, "Loss weight "
                  "per class from its train count (1/n, 1/sqrt(n), 1/ln(1+n), 1/ln(n)), "
                  "normalised to a mean example weight of 1 after --not_clean_weight.")
flags.DEFINE_float("not_clean_weight", _T.not_clean_weight, "Loss weight factor of examples "
                   "whose image/is_clean is 0 (the GLR2020 winner's last stage used 0.5).")
flags.DEFINE_list("augment", _T.augment, "Augmentations: flip (default), crop (random resized "
                  "crop), color (brightness/contrast); empty for none.")
flags.DEFINE_integer("shuffle_buffer", _T.shuffle_buffer, "Serialized records in each host's "
                     "shuffle buffer.")
flags.DEFINE_integer("batch_classes", _T.batch_classes, "K > 0: class-aware batches of P "
                     "classes x K images per replica (per-replica micro-batch a multiple of K), "
                     "grouped within each --shuffle_buffer window, short classes filled by "
                     "repeating their images; for pair losses (--npairs_weight), which i.i.d. "
                     "batches almost never give a positive. 0: i.i.d. examples.")
# Hardware.
_define_choice("strategy", _T.strategy, config.STRATEGIES, "auto: TPU if one resolves, else "
                  "Mirrored over several GPUs, else default; mirrored uses all GPUs (or all "
                  "logical CPUs); multi_worker reads TF_CONFIG.")
flags.DEFINE_string("tpu", _T.tpu, "TPU name or address; 'local' on a TPU VM; empty in Colab.")
_define_choice("mixed_precision", _T.mixed_precision, config.PRECISIONS, "auto: bfloat16 on "
                  "TPU and on GPUs of compute capability >= 8.0, float16 with loss scaling on "
                  "older GPUs, float32 on CPU.")
_define_choice("jit_compile", _T.jit_compile, config.JIT_MODES, "XLA for the train step; "
                  "auto: on for TPU/GPU, off on CPU (XLA is ~8x slower there).")
flags.DEFINE_integer("steps_per_execution", _T.steps_per_execution, "Train steps per compiled "
                     "execution (falls back to 1 where multi-step fails with several replicas).")
_define_choice("backend", _T.backend, config.BACKENDS, "Keras backend. tensorflow: "
                  "tf.distribute (TPUStrategy, Mirrored, CPU); jax: keras.distribution data "
                  "parallelism over all JAX devices (TPU runtimes without TensorFlow; every "
                  "process's with --coordinator_address); "
                  "auto: TensorFlow where its TPU strategy resolves or it sees a GPU, JAX on a "
                  "TPU or GPU only JAX can use, TensorFlow on CPU. The closing JSON says which "
                  "ran.")
flags.DEFINE_string("coordinator_address", "", "JAX multi-process training (every process "
                    "runs the same command): 'auto' lets JAX find the cluster (every worker of "
                    "a Cloud TPU pod slice; SLURM, Open MPI); HOST:PORT with --num_processes "
                    "and --process_id elsewhere (process 0 serves it). Empty: one process.")
flags.DEFINE_integer("num_processes", 0, "With --coordinator_address=HOST:PORT: processes "
                     "in the run.")
flags.DEFINE_integer("process_id", -1, "With --coordinator_address=HOST:PORT: this process's "
                     "index, 0..--num_processes-1.")
flags.DEFINE_bool("memory_check", False, "Do not train: compile one replica's train step "
                  "for these flags on JAX (no data read) and print XLA's memory per replica "
                  "and whether it fits the HBM of --tpu_type.")
flags.DEFINE_list("tpu_type", ["v3-8"], "With --memory_check: the TPU(s) to check against "
                  "(v2-8, v3-8, v4-8, v5e-1, v5e-8, v5p-8, v6e-8, ...: replicas and HBM each); "
                  "a comma list checks each, compiling each distinct per-replica step once.")
flags.DEFINE_integer("num_classes", 0, "With --memory_check: classes of the head; 0 reads "
                     "them from --data_dir's dataset_info.json (GLDv2 full: 203094).")
# Stages.
flags.DEFINE_string("init_from", _T.init_from, "Workdir of an earlier stage: backbone and neck "
                    "restored; the head too when head type and class count match.")
flags.DEFINE_string("pretrained_weights", _T.pretrained_weights, "Keras ImageNet weights "
                    "for a fresh keras.applications backbone (local or gs://; nothing "
                    "downloads): efficientnetbN_notop.h5, convnext_SIZE_notop.h5.")
# Model.
flags.DEFINE_string("backbone", _M.backbone, f"{', '.join(config.BACKBONES)} "
                    "(keras.applications; ImageNet weights from --pretrained_weights; "
                    "ConvNeXt: LayerNorms, so --backbone_mode=train only), or "
                    "hub:SOURCE, a keras-hub backbone (pip install 'landmark-tf[hub]'): SOURCE "
                    "a keras-hub preset folder, local or gs:// (EfficientNet(V2), ViT, DINOv2, "
                    "...: its weights load at the start, its architecture on every restore, so "
                    "keep it readable), a kaggle:// or hf:// handle (only where the machine is "
                    "online), or a small random-init test config: hub:tiny_vit, "
                    "hub:tiny_dinov2, hub:tiny_efficientnetv2. The preset's input scaling is "
                    "in the model. ViT/DINOv2 give their class token (use --pooling=gap) and "
                    "take only --image_size x --image_size inputs.")
_define_choice("backbone_mode", _M.backbone_mode, config.BACKBONE_MODES, "How the backbone "
                  "runs in a training step. train: BatchNorm on batch statistics (moving "
                  "averages updated), drop-connect on. frozen_bn: inference mode, as the GLR2020 "
                  "winner's released code (model(images) without training= in tf.keras 2): "
                  "BatchNorm uses and keeps its stored moving statistics, gamma/beta still "
                  "train, no drop-connect; neck and head train normally. Not with convnext-* "
                  "(no BatchNorm, no drop path: it would change nothing).")
flags.DEFINE_integer("image_size", _M.image_size, "Square training image side in pixels.")
_define_choice("pooling", _M.pooling, config.POOLINGS, "Global pooling: gap or gem.")
flags.DEFINE_float("gem_p", _M.gem_p, "Initial GeM exponent (trainable).")
flags.DEFINE_integer("embedding_dim", _M.embedding_dim, "Descriptor dimension.")
_define_choice("neck", _M.neck, config.NECKS, "Embedding layer after pooling: "
                  "Dense -> BatchNorm (dense_bn), Dense -> BatchNorm over all replicas "
                  "(dense_syncbn), Dense alone (dense: the GLR2020 winner's), or dolg: the "
                  "GLR2021 winner's DOLG (EfficientNet only): multi-atrous convolutions and "
                  "spatial attention on the stride-16 map, fused orthogonally with the "
                  "--pooling of the last stage (1024 + 1024), then Dense -> BatchNorm -> PReLU "
                  "(with --head=dynamic_arcface --scale=45 as released).")
flags.DEFINE_list("dolg_dilations", [str(d) for d in _M.dolg_dilations], "--neck=dolg: "
                  "dilations of its three 3x3 atrous convolutions (GLR2021 1st: 3,6,9 with "
                  "B6/B7, 6,12,18 with B5).")
_define_choice("neck_activation", _M.neck_activation, config.NECK_ACTIVATIONS, "Activation "
                  "of the neck's Dense (the GLR2020 winner: swish).")
_define_choice("head", _M.head, config.HEADS, "Classification head; adacos_per_batch is the "
                  "GLR2020 winner's (AdaCos scale recomputed per batch from sqrt(2) ln(C-1), "
                  "margin 0). multilabel / label_weighted: tag pretraining on title tags "
                  "(records from landmark-tfrecords --attribution_csv): a softmax over the tag "
                  "vocabulary, the sum of the tags' cross-entropies (WT-Set) or their "
                  "idf-weighted mean (LW-Set); the next stage starts from it with --init_from "
                  "and a landmark head.")
flags.DEFINE_string("scale", "auto", "Logit scale: a float, or auto = sqrt(2) * ln(C - 1).")
flags.DEFINE_float("margin", _M.margin, "Margin of CosFace/ArcFace heads.")
flags.DEFINE_integer("subcenters", _M.subcenters, "Sub-centres per class (subcenter_arcface, "
                     "dynamic_arcface).")
# Head variants (modeling/head_variants.py).
flags.DEFINE_integer("head_rank", _M.head_rank, "Factorised class matrix: D x r times r x C "
                     "(Cookpad GLR2019); 0 = full D x C. Not for adacos/softmax.")
flags.DEFINE_float("dynamic_margin_a", _M.dynamic_margin_a, "dynamic_arcface: margin "
                   "a * minmax(n_c^-1/4) + b from train counts (GLR2021 1st: a=0.45, b=0.05, "
                   "subcenters=3, scale=45).")
flags.DEFINE_float("dynamic_margin_b", _M.dynamic_margin_b, "dynamic_arcface: the b above.")
flags.DEFINE_float("npairs_weight", _M.npairs_weight, "Weight of the n-pairs loss of the "
                   "embeddings added to the head loss (Baidu GLR2019); 0 = off.")
flags.DEFINE_float("npairs_l2_reg", _M.npairs_l2_reg, "L2 regulariser of the n-pairs loss "
                   "(PaddlePaddle's default 0.002).")

FLAGS = flags.FLAGS


def _scale(value: str) -> float | None:
    if value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--scale={value}: expected a number or 'auto'") from None


def _check_choices() -> None:
    for name, choices in _CHOICES.items():
        value = getattr(FLAGS, name)
        if value not in choices:
            raise UserError(f"--{name}={value}: expected one of {', '.join(choices)}")
    hub = FLAGS.backbone.startswith(config.HUB_PREFIX) and FLAGS.backbone != config.HUB_PREFIX
    if FLAGS.backbone not in config.BACKBONES and not hub:
        raise UserError(f"--backbone={FLAGS.backbone}: expected one of "
                        f"{', '.join(config.BACKBONES)}, or hub:SOURCE (a keras-hub preset)")


def model_config() -> ModelConfig:
    return ModelConfig(
        backbone=FLAGS.backbone, image_size=FLAGS.image_size, pooling=FLAGS.pooling,
        gem_p=FLAGS.gem_p, embedding_dim=FLAGS.embedding_dim, head=FLAGS.head,
        scale=_scale(FLAGS.scale), margin=FLAGS.margin, subcenters=FLAGS.subcenters,
        neck=FLAGS.neck, neck_activation=FLAGS.neck_activation,
        head_rank=FLAGS.head_rank, dynamic_margin_a=FLAGS.dynamic_margin_a,
        dynamic_margin_b=FLAGS.dynamic_margin_b, npairs_weight=FLAGS.npairs_weight,
        npairs_l2_reg=FLAGS.npairs_l2_reg, backbone_mode=FLAGS.backbone_mode,
        dolg_dilations=_whole_numbers("dolg_dilations", FLAGS.dolg_dilations),
    )


def _whole_numbers(name: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UserError(f"--{name}={','.join(values)}: expected whole numbers") from None


def train_config() -> TrainConfig:
    if FLAGS.train_steps is None and FLAGS.epochs is None:
        raise UserError("give --train_steps or --epochs (--train_steps=0: only a checkpoint of "
                        "the initialisation)")
    if FLAGS.train_steps is not None and FLAGS.epochs is not None:
        raise UserError("give --train_steps or --epochs, not both")
    if FLAGS.train_steps is not None and FLAGS.train_steps < 0:
        raise UserError(f"--train_steps={FLAGS.train_steps}: must be >= 0")
    if FLAGS.epochs is not None and FLAGS.epochs <= 0:
        raise UserError(f"--epochs={FLAGS.epochs}: must be > 0")
    names = ("train_split", "val_split", "batch_size", "learning_rate", "momentum",
             "weight_decay", "schedule", "warmup_steps", "lr_decay",
             "sampling", "batch_classes",
             "class_weighting", "not_clean_weight", "shuffle_buffer", "seed", "strategy", "tpu",
             "mixed_precision", "jit_compile", "backend", "steps_per_execution", "checkpoint_every",
             "keep_checkpoints", "eval_every", "init_from", "pretrained_weights",
             "bn_momentum", "bn_statistics")
    return TrainConfig(
        data_dir=FLAGS.data_dir or "", workdir=FLAGS.workdir or "",
        grad_accum_steps=_grad_accum_steps(FLAGS.grad_accum_steps),
        train_steps=FLAGS.train_steps or 0, epochs=FLAGS.epochs or 0.0,
        augment=[a.strip() for a in FLAGS.augment if a.strip()],
        **{n: getattr(FLAGS, n) for n in names},
    )


def _grad_accum_steps(value: str) -> int:
    """'auto' -> 0 (TrainConfig's auto), else a whole number >= 1."""
    if value.strip().lower() == "auto":
        return 0
    if not value.strip().isdigit() or int(value) < 1:
        raise UserError(f"--grad_accum_steps={value}: expected a whole number >= 1 or auto")
    return int(value)


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    _check_choices()
    if FLAGS.memory_check:
        return _memory_check()
    model_cfg, train_cfg = model_config(), train_config().validate()
    from landmark_tf.training import processes

    processes.check(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    # Keras (and TensorFlow) load only now: flag errors and --help are fast, and the backend
    # is chosen before Keras fixes it.
    from landmark_tf.training import backend

    train_cfg = dataclasses.replace(train_cfg, backend=backend.select(FLAGS.backend, FLAGS.tpu,
                                                                   FLAGS.strategy))
    if FLAGS.coordinator_address:
        if train_cfg.backend != "jax":
            raise UserError(f"--coordinator_address joins JAX processes, but --backend="
                            f"{FLAGS.backend} trains on {train_cfg.backend}: pass --backend=jax "
                            "(TensorFlow's multi-worker training reads TF_CONFIG: "
                            "--strategy=multi_worker)")
        processes.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from landmark_tf.training import train

    return train.train(model_cfg, train_cfg, _retrieval_val())


def _retrieval_val():
    if bool(FLAGS.retrieval_queries) != bool(FLAGS.retrieval_index):
        raise UserError("--retrieval_queries and --retrieval_index go together")
    if FLAGS.retrieval_every < 0:
        raise UserError(f"--retrieval_every={FLAGS.retrieval_every}: must be >= 0")
    if not FLAGS.retrieval_queries:
        return None
    from landmark_tf.training.retrieval_validation import RetrievalValConfig

    return RetrievalValConfig(FLAGS.retrieval_queries, FLAGS.retrieval_index,
                              FLAGS.retrieval_every, FLAGS.batch_size)


def _memory_check() -> dict:
    from landmark_tf.training import backend

    backend.select("jax")
    if FLAGS.train_steps is None and FLAGS.epochs is None:
        FLAGS.train_steps = 1  # the length sizes only the schedule, not the step's memory
    num_classes = FLAGS.num_classes
    if num_classes <= 0:
        if not FLAGS.data_dir:
            raise UserError("--memory_check needs --num_classes or --data_dir")
        from landmark_tf.data import records

        num_classes = int(records.load_dataset_info(FLAGS.data_dir)["num_classes"])
    model_cfg = dataclasses.replace(model_config(), num_classes=num_classes)
    train_cfg = dataclasses.replace(train_config(), backend="jax")
    from landmark_tf.training import jax_memory

    return jax_memory.check_each(model_cfg, train_cfg, FLAGS.tpu_type)


def run() -> None:
    app_lib.run_main(main, "landmark-train")


if __name__ == "__main__":
    run()
