"""A synthetic dataset in the GLDv2 layout, made locally (the `landmark-synth` stage).

Reads: a `plan.SynthConfig` (sizes, seed, difficulty); nothing from disk or network.
Writes: train/index/test CSVs, train_clean.csv, the Kaggle solution files and the JPEG tree.
Entry: `generator.generate(SynthConfig, output_dir)`. `plan` decides every id and label from
the seed, `scenes` draws the procedural landmarks, `views` renders one photo of a scene.
"""
