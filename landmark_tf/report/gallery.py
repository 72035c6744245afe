"""The retrieval grid and the recognition strip: thumbnails of the dataset's own images, framed.

Retrieval: for each chosen query, one row per model: the query, then its top-k index images,
framed green when the solution lists them for that query, red otherwise; a red frame with a
"distractor" tag marks an index image that the solution lists for no query at all.
Recognition: each chosen query with the predicted landmark, its confidence and the first train
image of that landmark; green when the landmark is right, red when wrong, grey tag when the
query shows no landmark (GAP counts any prediction on it as wrong).
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from landmark_tf.report.curves import to_png  # noqa: E402

GREEN, RED, GREY = "#1a9641", "#d7191c", "#7f7f7f"


def pick_queries(truth: dict[str, frozenset], usable: set[str], count: int) -> list[str]:
    """`count` scored queries with at least one relevant image, spread evenly over the sorted
    ids (not chosen by how well any model does on them)."""
    ids = sorted(q for q, t in truth.items() if t and q in usable)
    if len(ids) <= count:
        return ids
    return [ids[i] for i in np.linspace(0, len(ids) - 1, count).round().astype(int)]


def retrieval_marks(queries: list[str], ranked: dict[str, dict[str, list[str]]],
                    truth: dict[str, frozenset], k: int) -> list[dict]:
    """One row per (query, model): {"query", "model", "results": [{"id", "correct",
    "distractor"}]}; `ranked[model][query]` lists index ids best first."""
    relevant_to_any = frozenset().union(*truth.values()) if truth else frozenset()
    rows = []
    for q in queries:
        for model, by_query in ranked.items():
            results = [{"id": i, "correct": i in truth.get(q, ()),
                        "distractor": i not in relevant_to_any} for i in by_query.get(q, [])[:k]]
            rows.append({"query": q, "model": model, "results": results})
    return rows


def _frame(ax, color: str | None, width: float = 4.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color:
            spine.set_edgecolor(color)
            spine.set_linewidth(width)


def draw_retrieval(rows: list[dict], k: int, query_image: Callable, index_image: Callable,
                   ) -> bytes:
    """PNG bytes of the grid for retrieval_marks(...) rows; *_image(id) -> uint8 [h, w, 3]."""
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.35 * (k + 1), 1.5 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(query_image(row["query"]))
        _frame(ax, "black", 2.0)
        hits = sum(x["correct"] for x in row["results"])
        ax.set_ylabel(f"{row['model']}\n{hits}/{len(row['results'])} correct", fontsize=7)
        ax.set_title(f"query {row['query'][:8]}", fontsize=7)
        for c in range(k):
            ax = axes[r, c + 1]
            if c >= len(row["results"]):
                ax.axis("off")
                continue
            res = row["results"][c]
            ax.imshow(index_image(res["id"]))
            _frame(ax, GREEN if res["correct"] else RED)
            if res["distractor"]:
                ax.text(0.5, 0.04, "distractor", transform=ax.transAxes, ha="center",
                        va="bottom", fontsize=6, color="white",
                        bbox={"facecolor": GREY, "pad": 1, "edgecolor": "none"})
            ax.set_title(f"#{c + 1}", fontsize=6)
    fig.tight_layout(pad=0.3)
    return to_png(fig)


def recognition_marks(queries: list[str], predictions: dict[str, tuple[int, float]],
                      truth: dict[str, frozenset], example: dict[int, str]) -> list[dict]:
    """One entry per query: {"query", "landmark" (None = no prediction), "confidence",
    "correct", "no_landmark" (the query shows none), "train_image" (None if unknown)}."""
    out = []
    for q in queries:
        landmark, confidence = predictions.get(q, (None, 0.0))
        out.append({"query": q, "landmark": landmark, "confidence": confidence,
                    "correct": landmark is not None and landmark in truth.get(q, ()),
                    "no_landmark": not truth.get(q), "train_image": example.get(landmark)})
    return out


def draw_recognition(marks: list[dict], query_image: Callable, train_image: Callable) -> bytes:
    """PNG bytes: top row the queries, bottom row a train image of each predicted landmark."""
    fig, axes = plt.subplots(2, len(marks), figsize=(1.6 * len(marks), 4.0), squeeze=False)
    for c, m in enumerate(marks):
        color = GREEN if m["correct"] else RED
        axes[0, c].imshow(query_image(m["query"]))
        _frame(axes[0, c], "black", 2.0)
        axes[0, c].set_title(f"query {m['query'][:8]}", fontsize=7)
        if m["no_landmark"]:
            axes[0, c].text(0.5, 0.04, "no landmark", transform=axes[0, c].transAxes,
                            ha="center", va="bottom", fontsize=6, color="white",
                            bbox={"facecolor": GREY, "pad": 1, "edgecolor": "none"})
        ax = axes[1, c]
        if m["landmark"] is None:
            ax.axis("off")
            ax.text(0.5, 0.5, "no prediction", transform=ax.transAxes, ha="center", fontsize=7)
            continue
        if m["train_image"]:
            ax.imshow(train_image(m["train_image"]))
        _frame(ax, color)
        mark = "right" if m["correct"] else "wrong"
        ax.set_xlabel(f"landmark {m['landmark']}\n{m['confidence']:.2f} ({mark})", fontsize=7,
                      color=color)
    fig.tight_layout(pad=0.3)
    return to_png(fig)
