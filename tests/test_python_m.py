"""Every CLI module runs as `python -m landmark_tf.cli.NAME` exactly as its console script: same
one-line errors on stderr (TF's start-up lines filtered), same exit codes, same closing JSON."""

import json
import os
import subprocess
import sys

import pytest
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _console_scripts() -> dict[str, str]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    return {name: target.split(":")[1] for name, target in scripts.items()}


SCRIPTS = _console_scripts()


def _run(cmd, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LANDMARK_TF_NATIVE_LOG"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell: the CLI sets what it needs
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_python_m_runs_the_cli_with_its_one_line_errors(script, tmp_path):
    """A misspelt flag: one line naming it, exit 2 (TF's start-up lines filtered out)."""
    proc = _run([sys.executable, "-m", f"landmark_tf.cli.{SCRIPTS[script]}", "--no_such_flag=1"],
                tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"{script}: error: Unknown command line flag 'no_such_flag'"], proc.stderr


def test_python_m_equals_the_console_script(tmp_path):
    args = ["--index=/missing.npz", "--queries=/missing-q.npz"]
    as_module = _run([sys.executable, "-m", "landmark_tf.cli.evaluate", *args], tmp_path)
    as_script = _run([os.path.join(BIN, "landmark-evaluate"), *args], tmp_path)
    assert (as_module.returncode, as_module.stdout, as_module.stderr) == (
        as_script.returncode, as_script.stdout, as_script.stderr)
    assert as_module.returncode == 2


def test_python_m_evaluate_of_a_missing_file_is_one_line_exit_2(tmp_path):
    proc = _run([sys.executable, "-m", "landmark_tf.cli.evaluate", "--index=/missing.npz",
                 "--queries=/missing-q.npz"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("landmark-evaluate: error: "), proc.stderr
    assert "missing" in lines[0]


def test_python_m_synth_runs_and_prints_its_json_last(tmp_path):
    out = tmp_path / "synth"
    proc = _run([sys.executable, "-m", "landmark_tf.cli.synth", f"--output_dir={out}",
                 "--num_landmarks=3", "--min_images=2", "--max_images=3", "--image_size=32",
                 "--noprogress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "output_dir" in json.loads(proc.stdout.strip().splitlines()[-1])
