"""landmark-clean: keep each landmark's largest coherent group of train images (Cookpad GLR2019).

  landmark-clean --embeddings=train.npz --train_csv=train.csv --output=train_clean.csv
      --report=clean_report.csv [--k=16 --threshold=auto --auto_quantile=0.99 --min_images=3]

--embeddings comes from landmark-embed over the train images (a pretrained or earlier-stage
model). The output has the train_clean.csv format: pass it to landmark-tfrecords as --clean_csv
(next to the full train.csv) or as --train_csv (the cleaned set alone).
Last stdout line: JSON with classes, kept, dropped (images), threshold, ...
"""

from __future__ import annotations

from absl import flags

from landmark_tf.cli import app as app_lib
from landmark_tf.errors import UserError

_FLOAT_OR_AUTO = "a cosine in [-1, 1], or auto"
FLAGS = flags.FLAGS
flags.DEFINE_string("embeddings", None, "Train embedding set (.npz from landmark-embed).")
flags.DEFINE_string("train_csv", None, "GLDv2 train.csv (id,url,landmark_id): the labels.")
flags.DEFINE_string("output", None, "Clean list to write (train_clean.csv format).")
flags.DEFINE_string("report", "", "Per-class report CSV to write (landmark_id, images, "
                    "embedded, kept, dropped, groups, status); empty = none.")
flags.DEFINE_integer("k", 16, "Neighbours per image within its class that may form an edge.")
flags.DEFINE_string("threshold", "auto", "Cosine of an edge: " + _FLOAT_OR_AUTO + " (the "
                    "--auto_quantile of cosine between images of different classes).")
flags.DEFINE_float("auto_quantile", 0.99, "Quantile of cross-class cosine used by "
                   "--threshold=auto.")
flags.DEFINE_integer("min_images", 3, "Drop classes with fewer images, before or after cleaning.")
flags.DEFINE_integer("min_group", 0, "0: keep each class's largest group only (Cookpad's "
                     "rule). N > 0: keep every group of at least N images, the largest always "
                     "(classes with several unrelated facets, like GLDv2's Commons categories).")
flags.DEFINE_integer("seed", 0, "Seed of the pair sample behind --threshold=auto.")


def _threshold(value: str) -> float | None:
    if value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--threshold={value}: expected {_FLOAT_OR_AUTO}") from None


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    from landmark_tf.curation import clean  # TensorFlow (file I/O) loads only now

    cfg = clean.CleanConfig(
        embeddings=FLAGS.embeddings or "", train_csv=FLAGS.train_csv or "",
        output=FLAGS.output or "", report=FLAGS.report, k=FLAGS.k,
        threshold=_threshold(FLAGS.threshold), auto_quantile=FLAGS.auto_quantile,
        min_images=FLAGS.min_images, min_group=FLAGS.min_group, seed=FLAGS.seed,
    )
    return clean.clean(cfg)


def run() -> None:
    app_lib.run_main(main, "landmark-clean")


if __name__ == "__main__":
    run()
