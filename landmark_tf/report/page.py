"""write_report(ReportConfig): gathers what a run left behind and writes OUTPUT_DIR/index.html."""

from __future__ import annotations

import dataclasses
import html
from typing import Any

from landmark_tf import fileio
from landmark_tf.errors import UserError
from landmark_tf.report import curves, gallery, inputs
from landmark_tf.retrieval import solutions

# Settings shown per run (config.json sections), in this order when present.
_MODEL_KEYS = ("backbone", "image_size", "embedding_dim", "pooling", "head", "scale", "margin")
_TRAIN_KEYS = ("train_steps", "batch_size", "learning_rate", "schedule", "warmup_steps",
               "weight_decay", "bn_momentum", "augment", "seed", "pretrained_weights")
_SUMMARY_KEYS = ("step", "loss", "accuracy", "val_accuracy", "images_per_second", "device")
_METRIC_KEYS = ("map@100", "map@100_public", "map@100_private", "gap", "gap_public",
                "gap_private")


@dataclasses.dataclass
class ReportConfig:
    """Inputs of the report; every mapping is {model or run name: path}.

    gldv2_dir: the dataset root (train.csv, solutions, {train,index,test}/ image trees); the
    solution and train.csv paths default to files in it. Models named in `submissions` (or,
    lacking one, `embeddings`: a folder with index.npz and test.npz) get rows in the grid.
    """

    output_dir: str
    gldv2_dir: str = ""
    runs: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: dict[str, str] = dataclasses.field(default_factory=dict)
    submissions: dict[str, str] = dataclasses.field(default_factory=dict)
    embeddings: dict[str, str] = dataclasses.field(default_factory=dict)
    recognition_submission: str = ""
    retrieval_solution: str = ""
    recognition_solution: str = ""
    train_csv: str = ""
    timings: str = ""
    queries: int = 8
    top_k: int = 8

    def resolved(self) -> ReportConfig:
        root = self.gldv2_dir
        default = (lambda name: fileio.join(root, name) if root else "")  # noqa: E731
        return dataclasses.replace(
            self,
            retrieval_solution=self.retrieval_solution or default("retrieval_solution_v2.1.csv"),
            recognition_solution=self.recognition_solution
            or default("recognition_solution_v2.1.csv"),
            train_csv=self.train_csv or default("train.csv"))


def write_report(cfg: ReportConfig) -> dict[str, Any]:
    """Writes the page and its PNGs; returns {"report": index.html path, "images": [...], ...}."""
    cfg = cfg.resolved()
    if cfg.queries < 1 or cfg.top_k < 1:
        raise UserError("--queries and --top_k must be >= 1")
    if not (cfg.runs or cfg.metrics or cfg.submissions or cfg.embeddings
            or cfg.recognition_submission or cfg.timings):
        raise UserError("nothing to report: give --runs, --metrics, --submission, --embeddings, "
                        "--recognition_submission or --timings")
    sections = [_results(cfg), _settings(cfg), _timings(cfg)]
    images, marks, skipped = [], {}, {}
    if cfg.runs:
        runs = {name: curves.read_scalars(w) for name, w in cfg.runs.items()}
        _write(cfg, "curves.png", curves.plot_curves(runs), images)
        sections.append(_figure("Training curves", "curves.png", "From each run's TensorBoard "
                                "logs (logs/train, logs/val)."))
    if cfg.gldv2_dir and (cfg.submissions or cfg.embeddings):
        marks["retrieval"] = _retrieval(cfg, images, skipped)
        sections.append(_figure(
            "Retrieval: top index images per query", "retrieval.png",
            f"{len({r['query'] for r in marks['retrieval']})} test queries (spread evenly over "
            f"the scored ones); per model the top {cfg.top_k}: green = listed for the query by "
            "the solution, red = not; 'distractor' = listed for no query at all."))
    if cfg.gldv2_dir and cfg.recognition_submission:
        marks["recognition"] = _recognition(cfg, images, skipped)
        sections.append(_figure(
            "Recognition: predicted landmark per query", "recognition.png",
            "Top: the query. Bottom: the first train image of the predicted landmark, with the "
            "confidence; green = right landmark, red = wrong or the query shows none."))
    fileio.makedirs(cfg.output_dir)
    fileio.write_json_atomic(fileio.join(cfg.output_dir, "marks.json"), marks)
    page = _HTML.format(body="\n".join(s for s in sections if s))
    index = fileio.join(cfg.output_dir, "index.html")
    fileio.write_text_atomic(index, page)
    return {"report": index, "images": images, "models": sorted(cfg.metrics),
            "retrieval_rows": len(marks.get("retrieval", [])),
            "recognition_queries": len(marks.get("recognition", [])),
            "skipped": [{"id": i, "reason": r} for i, r in sorted(skipped.items())]}


def _write(cfg: ReportConfig, name: str, png: bytes, images: list[str]) -> None:
    fileio.makedirs(cfg.output_dir)  # only now: a refused input leaves no empty folder
    fileio.write_bytes_atomic(fileio.join(cfg.output_dir, name), png)
    images.append(name)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
        return html.escape("-" if v is None or v == "" else str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _results(cfg: ReportConfig) -> str:
    if not cfg.metrics:
        return ""
    scores = {name: inputs.read_closing_json(path) for name, path in cfg.metrics.items()}
    keys = [k for k in _METRIC_KEYS if any(k in s for s in scores.values())]
    rows = [[name, *(s.get(k) for k in keys)] for name, s in scores.items()]
    return "<h2>Results</h2>" + _table(["model", *keys], rows) + (
        "<p>mAP@100: Kaggle GLR retrieval metric over the scored test queries (Public / Private "
        "splits of the solution file); GAP: recognition global average precision.</p>")


def _settings(cfg: ReportConfig) -> str:
    parts = []
    synth = fileio.join(cfg.gldv2_dir, "synth_config.json") if cfg.gldv2_dir else ""
    if synth and fileio.exists(synth):
        conf = fileio.read_json(synth)
        shown = {k: conf[k] for k in ("seed", "difficulty", "num_landmarks", "novel_landmarks",
                                      "image_size") if k in conf}
        parts.append("<p>Dataset: landmark-synth " + html.escape(
            ", ".join(f"{k}={v}" for k, v in shown.items())) + "</p>")
    elif cfg.gldv2_dir:
        parts.append(f"<p>Dataset: {html.escape(cfg.gldv2_dir)}</p>")
    rows = []
    for name, workdir in cfg.runs.items():
        conf = fileio.read_json(fileio.join(workdir, "config.json"))
        summary_path = fileio.join(workdir, "summary.json")
        summary = fileio.read_json(summary_path) if fileio.exists(summary_path) else {}
        values = ([conf.get("model", {}).get(k) for k in _MODEL_KEYS]
                  + [conf.get("train", {}).get(k) for k in _TRAIN_KEYS]
                  + [summary.get(k) for k in _SUMMARY_KEYS])
        rows.append([name, *values])
    if rows:
        parts.append(_table(["run", *_MODEL_KEYS, *_TRAIN_KEYS, *_SUMMARY_KEYS], rows))
    return "<h2>Settings</h2>" + "".join(parts) if parts else ""


def _timings(cfg: ReportConfig) -> str:
    """Lines "stage wall user sys" (seconds), as scripts/demo.sh writes them."""
    if not cfg.timings or not fileio.exists(cfg.timings):
        return ""
    rows = []
    for line in fileio.read_text(cfg.timings).splitlines():
        parts = line.split()
        if len(parts) == 4:
            try:
                wall, user, sys_ = (float(p) for p in parts[1:])
            except ValueError:
                continue
            rows.append([parts[0], wall, user + sys_])
    total = ["total (stages run side by side overlap)", sum(r[1] for r in rows),
             sum(r[2] for r in rows)]
    return "<h2>Time per stage (seconds)</h2>" + _table(["stage", "wall", "CPU"],
                                                        [*rows, total])


def _figure(title: str, src: str, caption: str) -> str:
    return (f"<h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p>"
            f'<img src="{html.escape(src)}" alt="{html.escape(title)}">')


def _retrieval(cfg: ReportConfig, images: list[str], skipped: dict[str, str]) -> list[dict]:
    truth = solutions.read_solution(cfg.retrieval_solution, "retrieval").subset()
    ranked = {name: inputs.read_retrieval_submission(p) for name, p in cfg.submissions.items()}
    usable = set(truth)
    for by_query in ranked.values():
        usable &= set(by_query)
    queries = gallery.pick_queries(truth, usable, cfg.queries)
    for name, folder in cfg.embeddings.items():
        if name not in ranked:
            ranked[name] = inputs.top_k_from_embeddings(folder, queries, cfg.top_k)
    rows = gallery.retrieval_marks(queries, ranked, truth, cfg.top_k)
    root = cfg.gldv2_dir
    png = gallery.draw_retrieval(
        rows, cfg.top_k, lambda i: inputs.thumbnail(fileio.join(root, "test"), i, skipped),
        lambda i: inputs.thumbnail(fileio.join(root, "index"), i, skipped))
    _write(cfg, "retrieval.png", png, images)
    return rows


def _recognition(cfg: ReportConfig, images: list[str], skipped: dict[str, str]) -> list[dict]:
    sol = solutions.read_solution(cfg.recognition_solution, "recognition")
    truth = sol.subset()
    predictions = inputs.read_recognition_submission(cfg.recognition_submission)
    queries = gallery.pick_queries(truth, set(predictions), cfg.queries)
    marks = gallery.recognition_marks(queries, predictions, truth,
                                      inputs.first_train_image(cfg.train_csv))
    root = cfg.gldv2_dir
    png = gallery.draw_recognition(
        marks, lambda i: inputs.thumbnail(fileio.join(root, "test"), i, skipped),
        lambda i: inputs.thumbnail(fileio.join(root, "train"), i, skipped))
    _write(cfg, "recognition.png", png, images)
    return marks


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>landmark-tf report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head>
<body><h1>landmark-tf report</h1>
{body}
</body></html>
"""
