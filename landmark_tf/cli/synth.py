"""landmark-synth: a small synthetic dataset in the GLDv2 layout, so everything runs offline.

  landmark-synth --output_dir=/tmp/synth [--num_landmarks=60 --min_images=8 --max_images=40
                 --image_size=96 --seed=0 --difficulty=1.0]
  GLDv2's phenomena (bench/levers.py's data, with --novel_landmarks=2; make demo uses the
  last two):
  landmark-synth ... --facets=3 --noisy_fraction=0.2 --noise_other_landmarks=0.5
                 --nonlandmark_style=everyday --test_distractors=3

Writes train.csv, train_clean.csv, index.csv, test.csv, retrieval_solution_v2.1.csv,
recognition_solution_v2.1.csv, nonlandmark.csv (a separate set of images of no landmark) and
JPEGs at OUTPUT_DIR/{train,index,test,nonlandmark}/a/b/c/<id>.jpg
(so --image_dir for train is OUTPUT_DIR/train). The same flags give the same bytes; rerunning
a stopped run with the same flags resumes it.
"""

from __future__ import annotations

from absl import flags

from landmark_tf.cli import app as app_lib
from landmark_tf.errors import UserError
from landmark_tf.synth import generator, plan

_D = generator.SynthConfig()

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Folder (local or gs://) to write the dataset into.")
flags.DEFINE_integer("num_landmarks", _D.num_landmarks,
                     "Landmarks with train images (the classes a model learns).")
flags.DEFINE_integer("min_images", _D.min_images, "Train images of the rarest landmark.")
flags.DEFINE_integer("max_images", _D.max_images,
                     "Train images of the most frequent landmark; counts in between follow a "
                     "Zipf law, as in GLDv2's long tail.")
flags.DEFINE_integer("image_size", _D.image_size, "Side of the square JPEGs, in pixels.")
flags.DEFINE_integer("seed", _D.seed,
                     "Seed of everything (ids, scenes, views): same flags, same bytes.")
flags.DEFINE_integer("novel_landmarks", _D.novel_landmarks,
                     "Landmarks seen only in index/test (retrieval must generalise to them).")
flags.DEFINE_float("retrieval_fraction", _D.retrieval_fraction,
                   "Share of train landmarks that also have index/test images.")
flags.DEFINE_list("index_images", [str(v) for v in _D.index_images],
                  "MIN,MAX index images per retrieval landmark.")
flags.DEFINE_list("test_images", [str(v) for v in _D.test_images],
                  "MIN,MAX test (query) images per retrieval landmark.")
flags.DEFINE_float("index_distractors", _D.index_distractors,
                   "Index images of no landmark, relative to the index's landmark images.")
flags.DEFINE_float("test_distractors", _D.test_distractors,
                   "Test images of no landmark, relative to the test set's landmark images.")
flags.DEFINE_float("noisy_fraction", _D.noisy_fraction,
                   "Share of each landmark's train images that show an unrelated scene; they are "
                   "left out of train_clean.csv.")
flags.DEFINE_float("unclean_landmarks", _D.unclean_landmarks,
                   "Share of train landmarks missing from train_clean.csv altogether.")
flags.DEFINE_float("public_fraction", _D.public_fraction,
                   "Share of test images with Usage=Public in the solution files (rest Private).")
flags.DEFINE_float("difficulty", _D.difficulty,
                   "Scales how different two views of a landmark are (camera, colour, clutter, "
                   "occlusion, blur, noise): 0 = identical views, 1 = default, >1 harder.")
flags.DEFINE_float("nonlandmark_images", _D.nonlandmark_images,
                   "Images in the separate non-landmark set (nonlandmark.csv + nonlandmark/ tree), "
                   "relative to the test set's size; 0 = none.")
flags.DEFINE_integer("facets", _D.facets,
                     "Unrelated scenes filed under each landmark id (GLDv2 files a church's "
                     "exterior, interior and details under one id); each image shows one at "
                     "random, so some relevant images look nothing like the query.")
flags.DEFINE_float("noise_other_landmarks", _D.noise_other_landmarks,
                   "Share of the noisy train images (--noisy_fraction) that show another train "
                   "landmark; the rest show no landmark. train_noise.csv says which.")
flags.DEFINE_enum("nonlandmark_style", _D.nonlandmark_style, plan.NONLANDMARK_STYLES,
                  "Look of images of no landmark in test, the non-landmark set and train noise: "
                  "landmark_like (one-off landmark-like scenes and landscapes) or everyday "
                  "(rooms, food, people, documents, close-ups: most of GLDv2's test set). Index "
                  "distractors stay landmark-like.")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def _pair(name: str) -> tuple[int, int]:
    values = FLAGS[name].value
    try:
        low, high = (int(v) for v in values)
    except ValueError:
        raise UserError(f"--{name} must be MIN,MAX integers, got {','.join(values)!r}") from None
    return low, high


def config_from_flags() -> generator.SynthConfig:
    if not FLAGS.output_dir:
        raise UserError("--output_dir is required")
    return generator.SynthConfig(
        num_landmarks=FLAGS.num_landmarks, min_images=FLAGS.min_images,
        max_images=FLAGS.max_images, image_size=FLAGS.image_size, seed=FLAGS.seed,
        retrieval_fraction=FLAGS.retrieval_fraction, novel_landmarks=FLAGS.novel_landmarks,
        index_images=_pair("index_images"), test_images=_pair("test_images"),
        index_distractors=FLAGS.index_distractors, test_distractors=FLAGS.test_distractors,
        noisy_fraction=FLAGS.noisy_fraction, unclean_landmarks=FLAGS.unclean_landmarks,
        public_fraction=FLAGS.public_fraction, difficulty=FLAGS.difficulty,
        nonlandmark_images=FLAGS.nonlandmark_images, facets=FLAGS.facets,
        noise_other_landmarks=FLAGS.noise_other_landmarks,
        nonlandmark_style=FLAGS.nonlandmark_style,
    )


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    return generator.generate(config_from_flags(), FLAGS.output_dir, progress=FLAGS.progress)


def run() -> None:
    app_lib.run_main(main, "landmark-synth")


if __name__ == "__main__":
    run()
