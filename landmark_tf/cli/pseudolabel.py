"""landmark-pseudolabel: confident kNN labels for unlabelled images -> a train.csv-format list.

  landmark-pseudolabel --labelled=train.npz --unlabelled=index.npz --output=pseudo.csv
      [--threshold=0.5 --k=5]

Each unlabelled image gets the landmark with the largest summed cosine among its k nearest
labelled neighbours; confidence = that sum / k. Rows with confidence >= --threshold are written
as id,url,landmark_id,confidence. No solution file is ever read. Convert the list with
landmark-tfrecords --train_csv=pseudo.csv --image_dir=<the images' folder> and train it as an
extra stage (landmark-train --init_from=<earlier workdir>).
Last stdout line: JSON with labelled (rows written), threshold, candidates, classes, ...
"""

from __future__ import annotations

from absl import flags

from landmark_tf.cli import app as app_lib
from landmark_tf.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("labelled", None, "Labelled embedding set (.npz with landmark_ids).")
flags.DEFINE_string("unlabelled", None, "Embedding set of the images to label (.npz).")
flags.DEFINE_string("output", None, "CSV to write: id,url,landmark_id,confidence.")
flags.DEFINE_float("threshold", 0.5, "Minimum confidence (summed neighbour cosine of the "
                   "winning landmark / k) of a written label.")
flags.DEFINE_integer("k", 5, "Labelled neighbours that vote.")
flags.DEFINE_integer("batch_size", 8192, "Queries per faiss call; keep it large.")


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    from landmark_tf.curation import pseudolabel  # TensorFlow (file I/O) loads only now

    return pseudolabel.pseudolabel(pseudolabel.PseudoLabelConfig(
        labelled=FLAGS.labelled or "", unlabelled=FLAGS.unlabelled or "",
        output=FLAGS.output or "", threshold=FLAGS.threshold, k=FLAGS.k,
        batch_size=FLAGS.batch_size))


def run() -> None:
    app_lib.run_main(main, "landmark-pseudolabel")


if __name__ == "__main__":
    run()
