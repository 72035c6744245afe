"""Training curves from each run's TensorBoard event files, drawn with matplotlib (Agg)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from landmark_tf import fileio  # noqa: E402

# (log folder, tag, panel title); landmark-train writes these (see training/train_loop.py).
PANELS = (
    ("train", "loss", "train loss"),
    ("train", "accuracy", "train accuracy (margin logits)"),
    ("val", "accuracy", "validation accuracy"),
    ("train", "learning_rate", "learning rate"),
)


def read_scalars(workdir: str) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """{(folder, tag): (steps int64[n], values float64[n])} from WORKDIR/logs/<folder>/events*,
    sorted by step (a resumed run's later value for a step wins)."""
    found: dict[tuple[str, str], dict[int, float]] = {}
    for folder in ("train", "val"):
        pattern = fileio.join(workdir, "logs", folder, "events.out.tfevents.*")
        for path in sorted(tf.io.gfile.glob(pattern)):
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.HasField("tensor"):
                        number = float(tf.make_ndarray(value.tensor))
                    else:
                        number = float(value.simple_value)
                    found.setdefault((folder, value.tag), {})[int(event.step)] = number
    return {key: (np.array(sorted(v), np.int64), np.array([v[s] for s in sorted(v)]))
            for key, v in found.items()}


def plot_curves(runs: dict[str, dict]) -> bytes:
    """PNG bytes: one panel per PANELS entry, one line per run ({name: read_scalars(...)}).

    A run with a single point (a --train_steps=0 baseline) shows as a marker."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(runs)}  # same in every panel
    for ax, (folder, tag, title) in zip(axes, PANELS, strict=True):
        for name, scalars in runs.items():
            if (folder, tag) in scalars:
                steps, values = scalars[(folder, tag)]
                ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=name,
                        color=colors[name])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if tag == "accuracy":
            ax.set_ylim(0, 1)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        more = ax.get_legend_handles_labels()
        for h, label in zip(*more, strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return to_png(fig)


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
