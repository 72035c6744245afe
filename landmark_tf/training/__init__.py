"""Training on TPU / GPUs / CPU with step-exact resume (the `landmark-train` stage), on the
TensorFlow or the JAX Keras backend.

Reads: TFRecords from `landmark-tfrecords` (+ `dataset_info.json`), a ModelConfig and TrainConfig.
Writes: a workdir (landmark_tf/workdir.py) with `config.json`, `checkpoints/` and `logs/`.
Entry: `train.train(ModelConfig, TrainConfig)`: a `train.Run` hands a backend trainer
(`trainer.BackendTrainer`: `tf_trainer` / `jax_trainer`, their steps `tf_step` / `jax_step`
around the shared `step_math`) to `train_loop`. `input_pipeline`, `augment`, `sampling` feed it;
`batch_stats` fixes what BatchNorm statistics mean on several replicas; `checkpointing` holds
config.json and the checkpoint manager; `retrieval_validation` scores held-out mAP@100.
"""
