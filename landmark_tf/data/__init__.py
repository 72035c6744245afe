"""GLDv2 CSVs + JPEG tree -> sharded TFRecords (the `landmark-tfrecords` stage).

Reads: a GLDv2-layout CSV (train.csv, index.csv, test.csv, ...), optional train_clean.csv,
and the image tree `ROOT/a/b/c/<id>.jpg` (local or gs://).
Writes: `{split}-{i:05d}-of-{n:05d}.tfrec` shards, `dataset_info.json`, `label_map.csv`.
Entry: `convert.convert_dataset(ConvertConfig)` (local worker pool) or
`beam_convert.convert_dataset_beam` (Apache Beam / Dataflow). `gldv2` plans, `images`
validates and re-encodes, `records` is the tf.train.Example schema, `shards` writes atomically.
"""
