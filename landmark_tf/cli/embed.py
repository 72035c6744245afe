"""landmark-embed: embed every image of an index/query/train set with an exported SavedModel.

  landmark-embed --model=E --records='data/index-*.tfrec' --output=index.npz
  landmark-embed --model=E --csv=index.csv --image_dir=index/ --output=index.npz
  landmark-embed --workdir=runs/b7 --records='gs://b/index-*.tfrec' --output=gs://b/index.npz \
      --batch_size=512 --dtype=float16      # on the TPU/GPUs, as landmark-train runs
  landmark-embed --model=E --revisitop_gnd=gnd_roxford5k.pkl --image_dir=roxford5k/jpg \
      --revisitop_set=queries --output=roxf_q.npz     # queries cropped to bbx, as published

Writes OUTPUT (.npz: ids, embeddings[, landmark_ids] when the source has labels) and
OUTPUT_STEM.skipped.json (unreadable images, with reasons). Interrupted runs resume from the
finished chunks in OUTPUT.parts/ when rerun with the same flags.
Last stdout line: JSON with count, dim, skipped, images_per_second.
"""

from __future__ import annotations

from absl import flags

from landmark_tf import config
from landmark_tf.cli import app as app_lib
from landmark_tf.errors import UserError
from landmark_tf.modeling import superglobal_pooling
from landmark_tf.serving import embed, embed_accel, export

_D = embed.EmbedConfig(model="", output="")
FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "SavedModel folder from landmark-export or landmark-ensemble.")
flags.DEFINE_string(
    "workdir", None,
    "Instead of --model: a landmark-train workdir (or an export of ours, whose workdir is "
    "used), embedded under the trainer's strategy and precision with the SavedModel's "
    "preprocessing (TPU/GPU; on a CPU too).")
flags.DEFINE_enum("strategy", "auto", list(config.STRATEGIES),
                  "With --workdir: as landmark-train's --strategy.")
flags.DEFINE_string("tpu", "", "With --workdir: TPU name (\"local\" on a TPU VM).")
flags.DEFINE_enum("precision", "auto", list(config.PRECISIONS),
                  "With --workdir: auto = mixed bfloat16 on TPU, mixed float16 on GPU, float32 "
                  "on CPU.")
flags.DEFINE_list("scales", ["1"], "With --workdir: input sizes as multiples of --image_size "
                  "(multi-scale: mean of the descriptors), as landmark-export's --scales.")
flags.DEFINE_integer("image_size", None, "With --workdir: model input side (default: trained).")
flags.DEFINE_enum("inference_pooling", embed_accel.AccelConfig.inference_pooling,
                  list(superglobal_pooling.POOLINGS),
                  "With --workdir: as landmark-export's --inference_pooling (superglobal: "
                  "regional GeM + GeM p 4.6, scales 0.7071,1,1.4142 unless --scales, combined "
                  "by max). A SavedModel (--model) has its pooling built in.")
flags.DEFINE_string("records", None, "Glob of TFRecord shards (landmark-tfrecords output).")
flags.DEFINE_string("csv", None, "Instead of --records: CSV with id (and landmark_id) columns.")
flags.DEFINE_string("image_dir", None,
                    "With --csv: the image of id X is IMAGE_DIR/X[0]/X[1]/X[2]/X.jpg.")
flags.DEFINE_string(
    "revisitop_gnd", None,
    "Instead of --records/--csv: a revisitop ground truth (gnd_roxford5k.pkl); images are "
    "IMAGE_DIR/<name>.jpg. With --revisitop_set=queries each qimlist image is cropped to its "
    "bbx before it is described, as the published protocol does.")
flags.DEFINE_enum("revisitop_set", _D.revisitop_set, ["queries", "database"],
                  "With --revisitop_gnd: qimlist (cropped) or imlist images.")
flags.DEFINE_string("output", None, "Embedding set to write (.npz, local or gs://).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Images per model call.")
flags.DEFINE_integer("chunk_size", _D.chunk_size,
                     "Images per resumable part file in OUTPUT.parts/ (work lost on a kill).")
flags.DEFINE_integer("max_batch_pixels", _D.max_batch_pixels,
                     "Cap on batch * padded height * width; large images get smaller batches.")
flags.DEFINE_enum("dtype", _D.dtype, ["float32", "float16"],
                  "Storage of the embeddings in OUTPUT; float16 halves the file (search still "
                  "runs in float32).")
flags.DEFINE_integer("num_threads", embed.default_threads(), "Threads reading/decoding images.")


def _scales() -> list[float]:
    given = export.parse_float_list(FLAGS.scales, "--scales") if FLAGS["scales"].present else None
    return superglobal_pooling.scales_for(FLAGS.inference_pooling, given) or [1.0]


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.output:
        raise UserError("--output is required")
    if bool(FLAGS.model) == bool(FLAGS.workdir):
        raise UserError("give either --model (a SavedModel) or --workdir (a training workdir)")
    if FLAGS.model and FLAGS["inference_pooling"].present:
        raise UserError("--inference_pooling applies to --workdir; a SavedModel has its pooling "
                        "built in (landmark-export --inference_pooling)")
    accel = None
    if FLAGS.workdir:
        accel = embed_accel.AccelConfig(
            workdir=FLAGS.workdir, strategy=FLAGS.strategy, tpu=FLAGS.tpu,
            precision=FLAGS.precision, image_size=FLAGS.image_size,
            scales=_scales(), inference_pooling=FLAGS.inference_pooling,
        )
    cfg = embed.EmbedConfig(
        model=FLAGS.model or "", accel=accel, output=FLAGS.output, records=FLAGS.records,
        csv=FLAGS.csv,
        image_dir=FLAGS.image_dir, batch_size=FLAGS.batch_size, chunk_size=FLAGS.chunk_size,
        max_batch_pixels=FLAGS.max_batch_pixels, num_threads=FLAGS.num_threads, dtype=FLAGS.dtype,
        revisitop_gnd=FLAGS.revisitop_gnd, revisitop_set=FLAGS.revisitop_set,
    )
    return embed.embed_set(cfg)


def run() -> None:
    app_lib.run_main(main, "landmark-embed")


if __name__ == "__main__":
    run()
