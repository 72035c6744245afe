"""landmark-report: one HTML page of a run: results, settings, training curves, retrieval grid.

  landmark-report --output_dir=demo_output/report --gldv2_dir=demo_output/gldv2 \\
    --runs=b0=runs/b0,b1=runs/b1 --metrics=b0=results/evaluate_b0.json \\
    --submission=untrained=subs/untrained/retrieval.csv,ensemble=subs/ensemble/retrieval.csv \\
    --recognition_submission=subs/ensemble/recognition.csv

Works on any run, GLDv2 included: images come from --gldv2_dir's own {train,index,test} trees.
Writes OUTPUT_DIR/index.html (+ curves.png, retrieval.png, recognition.png, marks.json).
The last stdout line is JSON: report, images, ...
"""

from __future__ import annotations

from absl import flags

from landmark_tf.cli import app as app_lib
from landmark_tf.errors import UserError

flags.DEFINE_string("output_dir", None, "Folder for index.html and its images (local or gs://).")
flags.DEFINE_string("gldv2_dir", "", "Dataset root: train.csv, the solution CSVs and the "
                    "train/, index/, test/ image trees (GLDv2 layout).")
flags.DEFINE_list("runs", [], "NAME=WORKDIR of landmark-train runs: settings and training "
                  "curves (TensorBoard logs).")
flags.DEFINE_list("metrics", [], "NAME=FILE: landmark-evaluate output (its last line is the "
                  "JSON) per model, for the results table.")
flags.DEFINE_list("submission", [], "NAME=retrieval.csv (Kaggle id,images) per model shown in "
                  "the retrieval grid, one row per model and query.")
flags.DEFINE_list("embeddings", [], "NAME=FOLDER with index.npz and test.npz (landmark-embed "
                  "outputs), for a grid model without --submission: top-k by cosine.")
flags.DEFINE_string("recognition_submission", "", "Kaggle recognition CSV (id,landmarks) for "
                    "the recognition strip.")
flags.DEFINE_string("retrieval_solution", "", "Default: GLDV2_DIR/retrieval_solution_v2.1.csv.")
flags.DEFINE_string("recognition_solution", "", "Default: "
                    "GLDV2_DIR/recognition_solution_v2.1.csv.")
flags.DEFINE_string("train_csv", "", "Default: GLDV2_DIR/train.csv (a train image per landmark).")
flags.DEFINE_string("timings", "", "Lines 'stage wall_s user_s sys_s' (scripts/demo.sh's "
                    "results/times.txt) for a time table.")
flags.DEFINE_integer("queries", 8, "Test queries in the grid and the strip.")
flags.DEFINE_integer("top_k", 8, "Index images per query and model in the grid.")

FLAGS = flags.FLAGS


def named(values: list[str], flag: str) -> dict[str, str]:
    """['a=x', 'b=y'] -> {'a': 'x', 'b': 'y'}; a bare path is named by its last folder."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = value.rstrip("/").split("/")[-1], value
        if not name or not path:
            raise UserError(f"--{flag}: expected NAME=PATH, got {value!r}")
        if name in out:
            raise UserError(f"--{flag}: name {name!r} given twice")
        out[name] = path
    return out


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.output_dir:
        raise UserError("--output_dir is required")
    from landmark_tf.report import page  # TensorFlow and matplotlib load only now

    cfg = page.ReportConfig(
        output_dir=FLAGS.output_dir, gldv2_dir=FLAGS.gldv2_dir,
        runs=named(FLAGS.runs, "runs"), metrics=named(FLAGS.metrics, "metrics"),
        submissions=named(FLAGS.submission, "submission"),
        embeddings=named(FLAGS.embeddings, "embeddings"),
        recognition_submission=FLAGS.recognition_submission,
        retrieval_solution=FLAGS.retrieval_solution,
        recognition_solution=FLAGS.recognition_solution, train_csv=FLAGS.train_csv,
        timings=FLAGS.timings, queries=FLAGS.queries, top_k=FLAGS.top_k)
    return page.write_report(cfg)


def run() -> None:
    app_lib.run_main(main, "landmark-report")


if __name__ == "__main__":
    run()
