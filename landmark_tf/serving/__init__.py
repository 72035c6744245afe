"""Kaggle SavedModels, ensembles and embedding extraction (landmark-export/-ensemble/-embed).

Reads: a training workdir, SavedModels, and TFRecords or a CSV + image tree to embed.
Writes: SavedModel dirs (+ metadata.json) with the GLR2020 signatures, and `.npz` embedding sets.
Entry: `export.export_model`, `ensemble.build_ensemble`, `embed.embed_set`. `signatures` is the
serving tf.Module every SavedModel is built from; `embed_sources` reads the images to embed;
`embed_accel` embeds from a training workdir under the trainer's strategy (TPU/GPU).
"""
