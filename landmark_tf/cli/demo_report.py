"""Summarises a `make demo` run: reads the closing JSON line each stage left in RESULTS_DIR.

  python -m landmark_tf.cli.demo_report demo_output/results

Prints a table (mAP@100 and GAP of the untrained baseline, each trained model, the ensemble and
the ensemble with each post-processing lever, `evaluate_ensemble+NAME.json`, with its gain over
the plain ensemble) and, last, one JSON line: untrained_map@100, trained_map@100 (best single
model), ensemble_map@100, gap (the ensemble's recognition GAP), levers (NAME -> map@100, gap).
"""

from __future__ import annotations

import glob
import json
import os

from landmark_tf.cli import app as app_lib
from landmark_tf.errors import UserError

MODELS = ("untrained", "b0", "b1", "ensemble")


def _read(results_dir: str, name: str) -> dict:
    path = os.path.join(results_dir, f"{name}.json")
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, IndexError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: no closing JSON line from that stage ({e})") from None


def main(argv: list[str]) -> dict:
    if len(argv) != 2:
        raise UserError("usage: python -m landmark_tf.cli.demo_report RESULTS_DIR")
    results = argv[1]
    scores = {m: _read(results, f"evaluate_{m}") for m in MODELS}
    rows = [("model", "train steps", "mAP@100", "GAP")]
    for m in MODELS:
        steps = "-" if m == "ensemble" else str(_read(results, f"train_{m}").get("step", "?"))
        gap = f"{scores[m]['gap']:.4f}" if "gap" in scores[m] else "-"
        rows.append((m, steps, f"{scores[m]['map@100']:.4f}", gap))
    plain = scores["ensemble"]
    levers = {}
    pattern = os.path.join(glob.escape(results), "evaluate_ensemble+*.json")
    for path in sorted(glob.glob(pattern)):
        name = os.path.basename(path)[len("evaluate_ensemble+"):-len(".json")]
        got = _read(results, f"evaluate_ensemble+{name}")
        levers[name] = {k: got[k] for k in ("map@100", "gap") if k in got}
        cells = [f"{got[k]:.4f} ({got[k] - plain[k]:+.4f})" if k in got and k in plain else "-"
                 for k in ("map@100", "gap")]
        rows.append((f"ensemble+{name}", "-", *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    print()
    return {
        "untrained_map@100": scores["untrained"]["map@100"],
        "trained_map@100": max(scores["b0"]["map@100"], scores["b1"]["map@100"]),
        "ensemble_map@100": scores["ensemble"]["map@100"],
        "gap": scores["ensemble"]["gap"],
        "levers": levers,
        "results_dir": results,
    }


def run() -> None:
    app_lib.run_main(main, "demo_report")


if __name__ == "__main__":
    run()
