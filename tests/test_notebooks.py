"""The Colab notebooks: executed end to end in local mode (so they never rot), and kept clean.

Local mode (LANDMARK_NOTEBOOK_LOCAL=1) makes a tiny synthetic set under
LANDMARK_NOTEBOOK_WORK_DIR; train_tpu.ipynb trains and exports there, evaluate_ensemble.ipynb
continues from its export. The kernel is this interpreter (the "python3" kernelspec resolves
`python` to sys.executable), so the notebooks import the package under test.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

import landmark_tf

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")
NOTEBOOKS = ("train_tpu.ipynb", "evaluate_ensemble.ipynb")
CELL_TIMEOUT_S = 600


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(os.path.join(COLAB, name), as_version=4)


def _execute(name: str, cwd: str) -> nbformat.NotebookNode:
    nb = _read(name)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": cwd}}
    )
    client.execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    """All stream and text/plain outputs of the executed notebook."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif "data" in out:
                parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def _csv_rows(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_notebooks_run_in_local_mode(tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setenv("LANDMARK_NOTEBOOK_LOCAL", "1")
    monkeypatch.setenv("LANDMARK_NOTEBOOK_WORK_DIR", str(work))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")

    trained = _execute("train_tpu.ipynb", str(tmp_path))
    text = _text(trained)
    assert os.path.dirname(landmark_tf.__file__) in text  # the package under test was imported
    assert sys.executable in text  # ...by this interpreter
    export_dir = work / "exports" / "b0"
    assert (export_dir / "saved_model.pb").is_file()
    metadata = json.loads((export_dir / "metadata.json").read_text())
    assert metadata["backbone"] == "efficientnet-b0"
    assert metadata["image_size"] == 32
    assert metadata["step"] == 5
    summary = json.loads((work / "runs" / "b0" / "summary.json").read_text())
    assert summary["step"] == 5

    evaluated = _execute("evaluate_ensemble.ipynb", str(tmp_path))
    out = work / "eval"
    ens = json.loads((work / "exports" / "ensemble" / "metadata.json").read_text())
    assert ens["kind"] == "ensemble"
    assert ens["weights"] == [1.0, 0.5]
    assert ens["embedding_dim"] == 2 * metadata["embedding_dim"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["map@100"] <= 1.0
    assert 0.0 <= metrics["gap"] <= 1.0
    assert "map@100" in _text(evaluated)

    test_ids = [r[0] for r in _csv_rows(str(work / "gldv2" / "test.csv"))[1:]]
    index_ids = {r[0] for r in _csv_rows(str(work / "gldv2" / "index.csv"))[1:]}
    retrieval = _csv_rows(str(out / "submissions" / "retrieval.csv"))
    assert retrieval[0] == ["id", "images"]
    assert sorted(r[0] for r in retrieval[1:]) == sorted(test_ids)
    ranked = retrieval[1][1].split()
    assert 0 < len(ranked) <= 100 and set(ranked) <= index_ids
    recognition = _csv_rows(str(out / "submissions" / "recognition.csv"))
    assert recognition[0] == ["id", "landmarks"]
    assert sorted(r[0] for r in recognition[1:]) == sorted(test_ids)

    png = (out / "retrieved.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


@pytest.mark.slow
def test_train_notebook_runs_in_local_mode_under_jax(tmp_path, monkeypatch):
    """What a Colab TPU runtime without TensorFlow runs: the JAX backend (here on 2 virtual CPU
    devices), then the export in a TensorFlow-backend subprocess."""
    pytest.importorskip("jax")
    work = tmp_path / "work"
    for key, value in {"LANDMARK_NOTEBOOK_LOCAL": "1", "LANDMARK_NOTEBOOK_WORK_DIR": str(work),
                       "LANDMARK_NOTEBOOK_BACKEND": "jax", "MPLBACKEND": "Agg",
                       "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu",
                       "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}.items():
        monkeypatch.setenv(key, value)
    text = _text(_execute("train_tpu.ipynb", str(tmp_path)))
    assert "Training backend: jax" in text and "JAX " in text and "2 cpu device(s)" in text
    summary = json.loads((work / "runs" / "b0" / "summary.json").read_text())
    assert summary["step"] == 5 and summary["backend"] == "jax" and summary["replicas"] == 2
    metadata = json.loads((work / "exports" / "b0" / "metadata.json").read_text())
    assert metadata["step"] == 5 and metadata["checkpoint"].endswith("ckpt-5")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], f"{name}: outputs committed in a cell"
        assert cell.execution_count is None, f"{name}: execution_count committed"
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.metadata.get("accelerator") in ("TPU", "GPU")
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    assert 'os.environ.get("LANDMARK_NOTEBOOK_LOCAL"' in tagged[0].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_calls_the_package_not_the_cli(name):
    """The notebooks import and call library functions; they never shell out to landmark-*."""
    for cell in _read(name).cells:
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            stripped = line.strip()
            assert not (stripped.startswith("!") and "landmark-" in stripped), line
            assert "subprocess" not in stripped, line


def _parameters(name: str) -> str:
    return next(c.source for c in _read(name).cells
                if "parameters" in c.metadata.get("tags", []))


def test_train_notebook_runs_jax_with_automatic_accumulation_on_kaggle(monkeypatch):
    """Kaggle's TPU image has no working tensorflow-tpu: the notebook picks JAX there (without
    the TensorFlow TPU probe), and under JAX the global batch is split to fit the chip."""
    monkeypatch.delenv("LANDMARK_NOTEBOOK_BACKEND", raising=False)
    monkeypatch.delenv("LANDMARK_NOTEBOOK_LOCAL", raising=False)
    source = _parameters("train_tpu.ipynb")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    kaggle = {}
    exec(source, kaggle)
    assert kaggle["BACKEND"] == "jax" and kaggle["PACKAGE"].startswith("/kaggle/input/")
    assert kaggle["BATCH_SIZE"] == 64 and not kaggle["LOCAL"]
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    colab = {}
    exec(source, colab)
    assert colab["BACKEND"] == "auto" and colab["PACKAGE"].startswith("/content/")
    train_cell = next(c.source for c in _read("train_tpu.ipynb").cells
                      if "train.train(model_cfg, train_cfg)" in c.source)
    assert 'grad_accum_steps=0 if BACKEND == "jax" else 1' in train_cell
