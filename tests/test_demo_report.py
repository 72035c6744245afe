"""demo_report: the table and closing JSON of a `make demo` run, lever rows included."""

import json

import pytest

from landmark_tf.cli import demo_report
from landmark_tf.errors import UserError


def _write(results, name, **values):
    (results / f"{name}.json").write_text(json.dumps(values) + "\n")


def test_lever_rows_show_their_gain_over_the_plain_ensemble(tmp_path, capsys):
    for m, score in (("untrained", 0.1), ("b0", 0.5), ("b1", 0.4)):
        _write(tmp_path, f"evaluate_{m}", **{"map@100": score})
        _write(tmp_path, f"train_{m}", step=300)
    _write(tmp_path, "evaluate_ensemble", **{"map@100": 0.6, "gap": 0.3})
    _write(tmp_path, "evaluate_ensemble+rerank", **{"map@100": 0.65, "gap": 0.3})
    _write(tmp_path, "evaluate_ensemble+nonlandmark", **{"map@100": 0.6, "gap": 0.45})
    summary = demo_report.main(["demo_report", str(tmp_path)])
    assert summary["levers"] == {"nonlandmark": {"map@100": 0.6, "gap": 0.45},
                                 "rerank": {"map@100": 0.65, "gap": 0.3}}
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
             if line.strip()}
    assert lines["ensemble+rerank"][2:] == ["0.6500", "(+0.0500)", "0.3000", "(+0.0000)"]
    assert lines["ensemble+nonlandmark"][4:] == ["0.4500", "(+0.1500)"]


def test_a_stage_without_its_closing_line_is_named(tmp_path):
    with pytest.raises(UserError, match="evaluate_untrained.json"):
        demo_report.main(["demo_report", str(tmp_path)])
