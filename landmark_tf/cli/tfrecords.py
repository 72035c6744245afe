"""landmark-tfrecords: GLDv2 CSV + image tree -> sharded TFRecords + dataset_info.json.

  landmark-tfrecords --train_csv=train.csv [--clean_csv=train_clean.csv]
      [--exclude_landmarks=roxf_rpar_overlap.txt] --image_dir=train/
      --output_dir=gs://bucket/gldv2 [--min_images_per_class=25 --val_fraction=0.05 --seed=0
      --max_image_side=800 --jpeg_quality=90 --shard_size_mb=150 --num_workers=8]
  landmark-tfrecords --csv=index.csv --split=index --image_dir=index/ --output_dir=...

Rerunning the same command resumes a stopped run (only unfinished shards are written) or, when
it is complete, does nothing. See tfrecords/README.md for the output format.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from landmark_tf.cli import app as app_lib
from landmark_tf.data import convert
from landmark_tf.errors import UserError

_D = convert.ConvertConfig(image_dir="", output_dir="")

FLAGS = flags.FLAGS
flags.DEFINE_string("train_csv", "",
                    "Labelled CSV: GLDv2 train.csv (id,url,landmark_id) or train_clean.csv "
                    "(landmark_id,images); the format is told from the header. Writes the train "
                    "split (and val with --val_fraction).")
flags.DEFINE_string("csv", "",
                    "CSV of one unlabelled split (index.csv / test.csv: id[,url]), written with "
                    "label -1 as the split named by --split. Instead of --train_csv.")
flags.DEFINE_string("split", "", "Split name for --csv, e.g. index or test.")
flags.DEFINE_string("clean_csv", "",
                    "train_clean.csv next to a full train.csv: its images get image/is_clean=1, "
                    "the others 0 (so training can down-weight them).")
flags.DEFINE_string("exclude_landmarks", "",
                    "Text file of landmark ids to leave out (one per line, or a CSV with a "
                    "landmark_id column), e.g. the GLDv2-clean landmarks that overlap Revisited "
                    "Oxford/Paris as RGLDv2-clean (CVPR 2024) lists them. Their images are "
                    "skipped (reason 'excluded landmark'); dataset_info.json records the list's "
                    "path and sha256, and landmark-evaluate prints it beside ROxf/RPar scores.")
flags.DEFINE_string("image_dir", "",
                    "Folder holding the a/b/c/<id>.jpg tree of the CSV's images (local or gs://).")
flags.DEFINE_string("output_dir", "", "Folder (local or gs://) for shards and dataset_info.json.")
flags.DEFINE_integer("min_images_per_class", _D.min_images_per_class,
                     "Drop landmarks with fewer CSV rows than this (Cookpad GLR2019 used 25).")
flags.DEFINE_float("val_fraction", _D.val_fraction,
                   "Share of each landmark's images for the val split: floor(n * fraction), so "
                   "landmarks with fewer than 1/fraction images stay wholly in train.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the val split and of the shuffle across shards.")
flags.DEFINE_integer("max_image_side", _D.max_image_side,
                     "Scale the longer image side down to this many pixels (aspect kept); "
                     "0 keeps the original size.")
flags.DEFINE_integer("jpeg_quality", _D.jpeg_quality, "Quality of the re-encoded JPEGs, 1..100.")
flags.DEFINE_float("shard_size_mb", _D.shard_size_mb,
                   "Target shard size in MB (10^6 bytes), estimated from a converted sample; "
                   "100-200 MB suits TPU input pipelines. Ignored with --num_shards.")
flags.DEFINE_integer("num_shards", _D.num_shards,
                     "Shards of the largest split (others proportionally); 0 = from "
                     "--shard_size_mb.")
flags.DEFINE_integer("num_workers", 0,
                     "Processes writing shards in parallel; 0 = one per CPU core. The output "
                     "is byte-identical for any value.")
flags.DEFINE_bool("overwrite", False,
                  "Replace a conversion with other settings found in --output_dir (without it "
                  "that is an error).")
flags.DEFINE_string("attribution_csv", "",
                    "GLDv2 train_attribution.csv (id,...,title): title keywords become per-image "
                    "tag ids (image/tags) for tag pretraining (--head=multilabel/label_weighted); "
                    "the vocabulary goes to tag_vocab.csv. --runner=local only.")
flags.DEFINE_integer("tag_min_df", _D.tag_min_df,
                     "Keep a title keyword only if at least this many titles hold it.")
flags.DEFINE_float("tag_max_df", _D.tag_max_df,
                   "Keep a title keyword only if at most this share of titles holds it (drops "
                   "words too common to tell images apart).")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.DEFINE_enum("runner", "local", ["local", "beam"],
                  "local: a process pool on this machine (--num_workers). beam: the same "
                  "conversion, byte-identical output, as an Apache Beam pipeline on "
                  "--beam_runner (pip install landmark-tf[beam]; see beam/README.md).")
flags.DEFINE_string("beam_runner", "DirectRunner",
                    "Beam runner for --runner=beam: DirectRunner (this machine, --num_workers "
                    "processes) or DataflowRunner (needs gs:// paths and --beam_options).")
flags.DEFINE_multi_string("beam_options", [],
                          "Extra Beam pipeline options for --runner=beam, repeatable, each one "
                          "or more space-separated --name=value, e.g. \"--project=P "
                          "--region=us-central1 --temp_location=gs://B/tmp\".")


def config_from_flags() -> convert.ConvertConfig:
    return convert.ConvertConfig(
        image_dir=FLAGS.image_dir, output_dir=FLAGS.output_dir, train_csv=FLAGS.train_csv,
        csv=FLAGS.csv, split=FLAGS.split, clean_csv=FLAGS.clean_csv,
        exclude_landmarks=FLAGS.exclude_landmarks,
        min_images_per_class=FLAGS.min_images_per_class, val_fraction=FLAGS.val_fraction,
        seed=FLAGS.seed, max_image_side=FLAGS.max_image_side, jpeg_quality=FLAGS.jpeg_quality,
        shard_size_mb=FLAGS.shard_size_mb, num_shards=FLAGS.num_shards,
        num_workers=FLAGS.num_workers or os.cpu_count() or 1, overwrite=FLAGS.overwrite,
        attribution_csv=FLAGS.attribution_csv, tag_min_df=FLAGS.tag_min_df,
        tag_max_df=FLAGS.tag_max_df,
    )


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    result = _convert(config_from_flags())
    if result["up_to_date"]:
        print(f"landmark-tfrecords: {FLAGS.output_dir} is already complete with these settings; "
              "nothing to do", file=sys.stderr)
    return result


def _convert(cfg: convert.ConvertConfig) -> dict:
    if FLAGS.runner == "beam":
        from landmark_tf.data import beam_convert  # apache-beam is needed only by this runner

        return beam_convert.convert_dataset_beam(cfg, FLAGS.beam_runner, FLAGS.beam_options,
                                                 progress=FLAGS.progress)
    for name in ("beam_runner", "beam_options"):
        if FLAGS[name].present:
            raise UserError(f"--{name} needs --runner=beam")
    return convert.convert_dataset(cfg, progress=FLAGS.progress)


def run() -> None:
    app_lib.run_main(main, "landmark-tfrecords")


if __name__ == "__main__":
    run()
