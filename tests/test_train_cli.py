"""landmark-train as a user runs it: --helpfull, --flagfile, one-line errors with exit 2.

The full CLI run (flagfile, kill -9, resume, closing JSON line) is in test_train.py.
"""

import dataclasses
import os
import subprocess
import sys

import pytest

from landmark_tf.config import ModelConfig, TrainConfig

BIN = os.path.join(os.path.dirname(sys.executable), "landmark-train")


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([BIN, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_helpfull_documents_every_setting():
    proc = _run("--helpfull")
    assert proc.returncode in (0, 1)  # absl exits 1 after printing help
    text = proc.stdout + proc.stderr
    section = text[text.index("landmark_tf.cli.train:"):]
    model_flags = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "num_classes"]
    for name in [f.name for f in dataclasses.fields(TrainConfig)] + model_flags:
        line = next((ln for ln in section.splitlines() if ln.strip().startswith(f"--{name}:")),
                    None)
        assert line is not None, f"--{name} missing from --helpfull"
        assert len(line.split(":", 1)[1].strip()) > 10, f"--{name} has no real help"
    assert "flagfile" in text


def _one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("landmark-train: error: ") and expected in lines[-1], lines
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""


def test_bad_data_dir_is_a_one_line_error(tmp_path):
    proc = _run(f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}", "--train_steps=5")
    _one_line_error(proc, "dataset_info.json not found: --data_dir must be a folder written by "
                          "landmark-tfrecords")


@pytest.mark.parametrize("flag, expected", [
    ("--train_steps=-1", "--train_steps=-1: must be >= 0"),
    ("--epochs=2", "give --train_steps or --epochs, not both"),
    ("--backbone=resnet50", "--backbone=resnet50: expected one of efficientnet-b0"),
    ("--head=triplet", "--head=triplet: expected one of"),
    ("--scale=big", "--scale=big: expected a number or 'auto'"),
    ("--batch_classes=3", "--batch_classes=3: --batch_size=64 must be a multiple of it"),
    ("--process_id=1", "--num_processes and --process_id go with --coordinator_address"),
    ("--coordinator_address=localhost", "--coordinator_address=localhost: expected HOST:PORT"),
    ("--grad_accum_steps=two", "--grad_accum_steps=two: expected a whole number >= 1 or auto"),
])
def test_bad_flag_values_are_one_line_errors(tmp_path, flag, expected):
    proc = _run(f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}", "--train_steps=5", flag)
    _one_line_error(proc, expected)


def test_joining_processes_needs_a_whole_setting_and_the_jax_backend(tmp_path):
    common = (f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}", "--train_steps=5",
              "--coordinator_address=localhost:1234")
    _one_line_error(_run(*common, "--num_processes=2", "--process_id=2"),
                    "--process_id=2: must be within 0..1")
    _one_line_error(_run(*common, "--num_processes=2", "--process_id=0", "--backend=tensorflow"),
                    "--coordinator_address joins JAX processes")


def test_flagfile_is_read(tmp_path):
    flagfile = tmp_path / "stage.flags"
    flagfile.write_text(f"--data_dir={tmp_path}\n--workdir={tmp_path / 'w'}\n"
                        "--train_steps=5\n--sampling=sqrt\n")
    _one_line_error(_run(f"--flagfile={flagfile}"), "--sampling=sqrt: expected one of uniform")


def test_stray_arguments_are_rejected(tmp_path):
    _one_line_error(_run(f"--data_dir={tmp_path}", "extra"), "unexpected arguments: extra")


def test_memory_check_needs_no_run_length():
    """--memory_check compiles one step: it asks for no --train_steps (here it gets as far as
    the TPU type, checked before any compilation)."""
    proc = _run("--memory_check", "--num_classes=10", "--tpu_type=v9-8")
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("landmark-train:")]
    assert lines == [lines[0]] and "--tpu_type=v9-8: expected e.g." in lines[0], proc.stderr
