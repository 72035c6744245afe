"""landmark-ensemble: several landmark-export outputs -> one SavedModel with the same signatures.

  landmark-ensemble --models=B7,B6,B5 --weights=1.0,0.8,0.5 --export_dir=E [--overwrite]

Each member's descriptor is L2-normalised and multiplied by its weight; the parts are concatenated
and L2-normalised again. Members may differ in image size, scales and embedding dim.
Last stdout line: JSON with export_dir, embedding_dim (sum of the members'), size_bytes, members.
"""

from __future__ import annotations

import sys

from absl import flags

from landmark_tf.cli import app as app_lib
from landmark_tf.errors import UserError
from landmark_tf.serving import ensemble, export

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "Comma-separated landmark-export (or -ensemble) folders.")
flags.DEFINE_list("weights", None, "Comma-separated positive weights, one per model; default 1.")
flags.DEFINE_string("export_dir", None, "Folder (local or gs://) the ensemble is written to.")
flags.DEFINE_bool("overwrite", False, "Replace an existing export at --export_dir.")


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.models:
        raise UserError("--models is required")
    if not FLAGS.export_dir:
        raise UserError("--export_dir is required")
    weights = export.parse_float_list(FLAGS.weights, "--weights") if FLAGS.weights else None
    cfg = ensemble.EnsembleConfig(
        models=FLAGS.models, export_dir=FLAGS.export_dir, weights=weights,
        overwrite=FLAGS.overwrite,
    )
    result = ensemble.build_ensemble(cfg)
    print(f"export size: {result['size_mb']:.1f} MB ({result['export_dir']})", file=sys.stderr)
    return result


def run() -> None:
    app_lib.run_main(main, "landmark-ensemble")


if __name__ == "__main__":
    run()
