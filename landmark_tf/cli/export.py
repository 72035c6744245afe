"""landmark-export: a training workdir -> a Kaggle GLR2020-format SavedModel + metadata.json.

  landmark-export --workdir=W --export_dir=E [--scales=0.7071,1,1.4142] [--image_size=640]
                  [--inference_pooling=superglobal] [--overwrite]

serving_default: input_image uint8[H, W, 3] -> global_descriptor float32[D] (L2-normalised);
serving_batch / serving_padded for fast extraction (see landmark_tf/serving/signatures.py).
Last stdout line: JSON with export_dir, embedding_dim, size_bytes, exceeds_kaggle_limit.
"""

from __future__ import annotations

import sys

from absl import flags

from landmark_tf.cli import app as app_lib
from landmark_tf.errors import UserError
from landmark_tf.modeling import superglobal_pooling
from landmark_tf.serving import export

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/) to export.")
flags.DEFINE_string("export_dir", None, "Folder (local or gs://) the SavedModel is written to.")
flags.DEFINE_list(
    "scales", ["1"],
    "Input scales relative to --image_size; several give a multi-scale descriptor (the mean "
    "of the per-scale descriptors, L2-normalised), e.g. 0.7071,1,1.4142.",
)
flags.DEFINE_integer("image_size", None, "Square input side; default: the trained image size.")
flags.DEFINE_enum(
    "inference_pooling", export.ExportConfig.inference_pooling, list(superglobal_pooling.POOLINGS),
    "trained: the model's own pooling. superglobal: SuperGlobal's training-free refinements "
    "(Shao et al. 2023): regional GeM (5x5 power mean, p 2.5, mixed half and half with the "
    "map) and GeM with p 4.6 in front of the trained neck, and the scales (default "
    "0.7071,1,1.4142) combined by the elementwise max of the normalised descriptors.",
)
flags.DEFINE_bool("overwrite", False, "Replace an existing export at --export_dir.")


def inference_scales(inference_pooling: str) -> list[float]:
    """--scales, or SuperGlobal's three when its pooling is asked for without --scales."""
    given = export.parse_float_list(FLAGS.scales, "--scales") if FLAGS["scales"].present else None
    return superglobal_pooling.scales_for(inference_pooling, given) or [1.0]


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("workdir", "export_dir"):
        if not getattr(FLAGS, name):
            raise UserError(f"--{name} is required")
    cfg = export.ExportConfig(
        workdir=FLAGS.workdir,
        export_dir=FLAGS.export_dir,
        scales=inference_scales(FLAGS.inference_pooling),
        image_size=FLAGS.image_size,
        overwrite=FLAGS.overwrite,
        inference_pooling=FLAGS.inference_pooling,
    )
    result = export.export_model(cfg)
    print(f"export size: {result['size_mb']:.1f} MB ({result['export_dir']})", file=sys.stderr)
    return result


def run() -> None:
    app_lib.run_main(main, "landmark-export")


if __name__ == "__main__":
    run()
