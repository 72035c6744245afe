"""Training on TPU / GPUs / CPU with step-exact resume (the `landmark-train` stage).

Reads: TFRecords from `landmark-tfrecords` (+ `dataset_info.json`), a ModelConfig and TrainConfig.
Writes: a workdir with `config.json`, `checkpoints/` (tf.train.CheckpointManager) and `logs/`.
Entry: `train.train(ModelConfig, TrainConfig)`. `input_pipeline`, `augment`, `sampling` feed it;
`distribute` resolves the strategy; `train_step`/`train_loop` run it; `schedules` and
`checkpointing` hold the learning-rate schedules and the resume logic; `retrieval_validation`
scores held-out retrieval mAP@100 during training.
"""
