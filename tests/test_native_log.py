"""TF's native start-up lines stay off stderr on every CPU (they appear on AVX-512 ones only).

The subprocess tests make the lines appear wherever they run: a stand-in CLI module writes them
to fd 2 at import, as TensorFlow 2.21 does on AVX-512 CPUs, so the promise is tested on CPUs
that print them and on those that do not.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from landmark_tf.cli import native_log
from landmark_tf.cli.native_log import LineFilter

BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = (b"I0000 00:00:1796013546.858557    3020 port.cc:153] oneDNN custom operations are on. "
          b"You may see slightly different numerical results.\n")
CPU_GUARD = (b"I1130 04:39:06.123456  123 cpu_feature_guard.cc:210] This TensorFlow binary is "
             b"optimized to use available CPU instructions.\n")
KEPT = [
    b"landmark-x: error: --model: no such file\n",
    b"W0000 00:00:1796013546.858557    3020 loader.cc:1] a real warning\n",
    b"E1130 04:39:06.123456  123 tpu.cc:12] could not connect\n",
    b"F1130 04:39:06.123456  123 check.cc:99] Check failed: x\n",
    b"Traceback (most recent call last):\n",
    b"Images 12%|###\n",
    b"INFO: something of ours\n",
]


def _run_filter(chunks):
    f = LineFilter()
    return b"".join(f.feed(c) for c in chunks) + f.flush()


def test_drops_native_info_lines_and_banner_keeps_everything_else():
    data = BANNER + ONEDNN + b"".join(KEPT) + CPU_GUARD + BANNER + ONEDNN
    assert _run_filter([data]) == b"".join(KEPT)


def test_same_result_when_lines_arrive_byte_by_byte():
    data = BANNER + ONEDNN + b"".join(KEPT) + CPU_GUARD
    assert _run_filter([data[i:i + 1] for i in range(len(data))]) == b"".join(KEPT)


def test_partial_lines_that_cannot_be_noise_pass_at_once():
    f = LineFilter()
    assert f.feed(b"\rshards  40%|####") == b"\rshards  40%|####"  # a live progress bar
    assert f.feed(b"\rshards  50%|#####") == b"\rshards  50%|#####"
    assert f.feed(b" done\nI000") == b" done\n"  # "I000" could still start a native line: held
    assert f.flush() == b"I000"  # nothing more came: written as it is
    assert f.feed(b"0 not a log line\n") == b"0 not a log line\n"


@pytest.mark.parametrize("argv, env, shown", [
    ([], {}, False),
    (["--verbosity=1"], {}, True),
    (["-v", "2"], {}, True),
    (["--verbosity=0"], {}, False),
    ([], {native_log.ENV: "1"}, True),
])
def test_wants_native_log(monkeypatch, argv, env, shown):
    monkeypatch.delenv(native_log.ENV, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert native_log.wants_native_log(["landmark-x", *argv]) is shown


_FAKE_CLI = textwrap.dedent("""
    import os
    os.write(2, {noise!r})  # what TF 2.21 writes at import on AVX-512 CPUs
    import tensorflow  # and whatever the real import writes on this CPU
    from landmark_tf.cli import app as app_lib
    from landmark_tf.errors import UserError

    def main(argv):
        if os.environ.get("FAKE_ABORT"):
            os.write(2, {fatal!r})
            os.abort()
        raise UserError("--model: not a SavedModel folder")

    def run():
        app_lib.run_main(main, "landmark-fake")
""")


@pytest.fixture(scope="module")
def fake_cli(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake_cli")
    source = _FAKE_CLI.format(noise=BANNER + ONEDNN, fatal=KEPT[3])
    (folder / "fake_cli.py").write_text(source)
    return str(folder)


def _launch(folder, *args, **env):
    code = "from landmark_tf.cli.entry import launch; launch('fake_cli')"
    full_env = {**os.environ, "PYTHONPATH": folder, **env}
    full_env.pop(native_log.ENV, None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_bad_input_is_one_line_on_stderr_even_when_tf_prints_start_up_lines(fake_cli):
    proc = _launch(fake_cli)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["landmark-fake: error: --model: not a SavedModel folder"]


def test_verbosity_1_shows_the_native_lines(fake_cli):
    proc = _launch(fake_cli, "--verbosity=1")
    assert proc.returncode == 2, proc.stderr
    assert BANNER.decode().strip() in proc.stderr and "oneDNN" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("landmark-fake: error: ")


def test_nothing_is_lost_when_the_process_aborts(fake_cli):
    proc = _launch(fake_cli, FAKE_ABORT="1")
    assert proc.returncode != 0
    # The child drains the pipe after the parent died: the fatal line and Python's report arrive.
    assert proc.stderr.splitlines()[0] == KEPT[3].decode().strip()
    assert "Fatal Python error: Aborted" in proc.stderr


_INTERLEAVED = textwrap.dedent("""
    import json, os, sys
    from landmark_tf.cli import native_log
    native_log.install(sys.argv)
    os.write(2, {noise!r})
    for i in range(40):
        print(f"table line {{i:02d}}", file=sys.stderr)
        if i % 7 == 0:
            print(f"stdout line {{i:02d}}", flush=True)
    print(json.dumps({{"done": True}}), flush=True)
""")


def test_one_file_for_both_streams_keeps_the_order_they_were_written_in(tmp_path):
    """`>log 2>&1`: stderr goes through the filter, yet the combined log has every line whole,
    in the order written, and the JSON line last (stdout shares the filter's pipe)."""
    script = tmp_path / "interleaved.py"
    script.write_text(_INTERLEAVED.format(noise=BANNER + ONEDNN))
    want = []
    for i in range(40):
        want.append(f"table line {i:02d}")
        if i % 7 == 0:
            want.append(f"stdout line {i:02d}")
    want.append('{"done": true}')
    env = {k: v for k, v in os.environ.items() if k != native_log.ENV}
    for attempt in range(3):
        log = tmp_path / f"log{attempt}"
        with open(log, "w") as f:
            subprocess.run([sys.executable, str(script)], stdout=f, stderr=subprocess.STDOUT,
                           env=env, timeout=60, check=True)
        assert log.read_text().splitlines() == want


def test_separate_destinations_keep_stdout_apart(tmp_path):
    script = tmp_path / "interleaved.py"
    script.write_text(_INTERLEAVED.format(noise=BANNER + ONEDNN))
    env = {k: v for k, v in os.environ.items() if k != native_log.ENV}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    assert proc.stdout.splitlines()[-1] == '{"done": true}' and "table" not in proc.stdout
    assert proc.stderr.splitlines() == [f"table line {i:02d}" for i in range(40)]
