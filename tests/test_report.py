"""landmark-report on a tiny synthetic run: every image on the page decodes, marks match the
solution, curves come from TensorBoard logs, bad flags are one-line errors."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from landmark_tf.report import page
from landmark_tf.synth import generator

TINY = generator.SynthConfig(
    num_landmarks=6, min_images=2, max_images=5, image_size=32, novel_landmarks=1,
    index_images=(2, 3), test_images=(1, 2), index_distractors=0.5, test_distractors=0.3)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _truth(root, name, column):
    return {r["id"]: set(r[column].split()) for r in _csv(os.path.join(root, name))
            if r["Usage"] != "Ignored" and r[column] not in ("", "None")}


def _workdir(path, steps=5):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": {"backbone": "efficientnet-b0", "image_size": 32},
                   "train": {"train_steps": steps, "learning_rate": 0.1}}, f)
    for split, tags in (("train", ("loss", "accuracy", "learning_rate")), ("val", ("accuracy",))):
        writer = tf.summary.create_file_writer(os.path.join(path, "logs", split))
        with writer.as_default():
            for step in range(1, steps + 1):
                for tag in tags:
                    tf.summary.scalar(tag, 1.0 / step, step=step)
        writer.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("report"))
    data = os.path.join(root, "gldv2")
    generator.generate(TINY, data, progress=False)
    index_ids = [r["id"] for r in _csv(os.path.join(data, "index.csv"))]
    test_ids = [r["id"] for r in _csv(os.path.join(data, "test.csv"))]
    truth = _truth(data, "retrieval_solution_v2.1.csv", "images")
    rng = np.random.default_rng(0)
    subs = {}
    for name in ("untrained", "ensemble"):
        lines = ["id,images"]
        for q in test_ids:
            order = list(rng.permutation(index_ids))
            if name == "ensemble":  # the relevant images first
                order.sort(key=lambda i: i not in truth.get(q, ()))
            lines.append(f"{q},{' '.join(order)}")
        subs[name] = os.path.join(root, f"{name}.csv")
        with open(subs[name], "w") as f:
            f.write("\n".join(lines) + "\n")
    landmarks = sorted({r["landmark_id"] for r in _csv(os.path.join(data, "train.csv"))})
    recognition = os.path.join(root, "recognition.csv")
    with open(recognition, "w") as f:
        f.write("id,landmarks\n" + "".join(
            f"{q},{landmarks[i % len(landmarks)]} 0.{i + 1}\n" for i, q in enumerate(test_ids)))
    metrics = os.path.join(root, "evaluate.json")
    with open(metrics, "w") as f:
        f.write('{"map@100": 0.5, "map@100_public": 0.4, "gap": 0.3}\n')
    _workdir(os.path.join(root, "run"))
    cfg = page.ReportConfig(
        output_dir=os.path.join(root, "out"), gldv2_dir=data,
        runs={"b0": os.path.join(root, "run")},
        metrics={"ensemble": metrics}, submissions=subs, recognition_submission=recognition,
        queries=4, top_k=5)
    return data, cfg, page.write_report(cfg)


def test_every_image_on_the_page_exists_and_decodes(run):
    _, cfg, result = run
    with open(result["report"]) as f:
        html = f.read()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(sources) == ["curves.png", "recognition.png", "retrieval.png"]
    for src in sources:
        with Image.open(os.path.join(cfg.output_dir, src)) as image:
            image.load()
            assert image.width > 100 and image.height > 100
    assert "0.5000" in html and "map@100_public" in html  # the results table


def test_grid_marks_match_the_solution(run):
    data, cfg, result = run
    truth = _truth(data, "retrieval_solution_v2.1.csv", "images")
    relevant_somewhere = set().union(*truth.values())
    with open(os.path.join(cfg.output_dir, "marks.json")) as f:
        marks = json.load(f)
    rows = marks["retrieval"]
    assert len(rows) == result["retrieval_rows"] == 2 * 4  # 4 queries x 2 models
    assert {r["model"] for r in rows} == {"untrained", "ensemble"}
    for row in rows:
        assert row["query"] in truth and len(row["results"]) == 5
        for r in row["results"]:
            assert r["correct"] == (r["id"] in truth[row["query"]])
            assert r["distractor"] == (r["id"] not in relevant_somewhere)
        if row["model"] == "ensemble":
            assert row["results"][0]["correct"]
    recognition = _truth(data, "recognition_solution_v2.1.csv", "landmarks")
    for m in marks["recognition"]:
        assert m["correct"] == (str(m["landmark"]) in recognition.get(m["query"], set()))
        assert m["train_image"] is not None


def test_curves_read_the_tensorboard_logs(run):
    from landmark_tf.report import curves

    _, cfg, _ = run
    scalars = curves.read_scalars(cfg.runs["b0"])
    steps, values = scalars[("train", "loss")]
    assert steps.tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(values, [1.0, 0.5, 1 / 3, 0.25, 0.2], rtol=1e-6)
    assert ("val", "accuracy") in scalars


@pytest.mark.parametrize("flag, message", [
    ("--runs==x", "--runs: expected NAME=PATH"),
    ("--submission=a=x,a=y", "--submission: name 'a' given twice"),
])
def test_bad_flags_are_one_line_errors(tmp_path, flag, message):
    exe = os.path.join(os.path.dirname(sys.executable), "landmark-report")
    proc = subprocess.run([exe, f"--output_dir={tmp_path}", flag], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("landmark-report: error: ") and message in last, proc.stderr


def test_nothing_to_report_is_a_one_line_error(tmp_path):
    from landmark_tf.errors import UserError
    from landmark_tf.report import page

    with pytest.raises(UserError, match="nothing to report"):
        page.write_report(page.ReportConfig(output_dir=str(tmp_path / "r")))
