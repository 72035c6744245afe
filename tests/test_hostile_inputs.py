"""Hostile but realistic inputs (issue 25), table-driven: every CLI run as its console script on
binary files, folders where files belong and files where folders belong, empty and truncated
files, non-UTF-8 text, non-JSON metadata and a missing optional extra. Each must exit 2 with one
line on stderr naming the problem, and leave no file behind. Ids that would escape an image
folder are skipped and reported by every stage that turns ids into paths, never read; a damaged
kept shard is rewritten on resume; a SIGKILLed landmark-embed resumes to the uninterrupted file.

Cheap CLIs (no TensorFlow import: landmark-evaluate on .npz files, landmark-train's checks)
carry most cases; each TensorFlow-importing case costs ~5 s, so those cover one row each.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from landmark_tf.cli import native_log

BIN = os.path.dirname(sys.executable)
TRAVERSAL = "../../../../outside/photo"  # an id that os.path.join would take out of the root


def _jpeg(seed: int, size=(24, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    """One of each hostile input, plus valid small files to pair them with."""
    root = tmp_path_factory.mktemp("hostile")
    p = {"root": str(root)}

    def put(name: str, data: bytes) -> str:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        return str(root / name)

    p["binary"] = put("binary.dat", b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)) * 4)
    p["empty"] = put("empty.dat", b"")
    p["file"] = put("plain_file", b"just a file\n")
    p["dir"] = str(root / "a_folder")
    os.makedirs(p["dir"])
    # Valid header, then bytes that are not UTF-8 (a Latin-1 export of a CSV, say).
    p["latin1_train_csv"] = put("latin1_train.csv", b"id,url,landmark_id\nabc\xe9\xff12,u,1\n")
    p["latin1_id_csv"] = put("latin1_ids.csv", b"id\n\xff\xfeabc\n")
    p["latin1_solution"] = put("latin1_solution.csv", b"id,images,Usage\nq\xe90,i0,Public\n")
    buf = io.BytesIO()
    np.savez(buf, ids=np.array(["q0", "q1"]), embeddings=np.eye(2, 4, dtype=np.float32))
    p["queries"] = put("queries.npz", buf.getvalue())
    p["truncated_npz"] = put("truncated.npz", buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    np.savez(buf, ids=np.array(["i0", "i1", "i2"]), embeddings=np.eye(3, 4, dtype=np.float32))
    p["index"] = put("index.npz", buf.getvalue())
    for name, info in (("data_not_json", b"{not json"), ("data_list", b"[1, 2]"),
                       ("data_latin1", b'{"num_classes": "\xe9"}')):
        p[name] = os.path.dirname(put(f"{name}/dataset_info.json", info))
    p["data_info_dir"] = str(root / "data_info_dir")
    os.makedirs(os.path.join(p["data_info_dir"], "dataset_info.json"))
    p["foreign_out"] = os.path.dirname(put("foreign_out/dataset_info.json", b"{}"))
    p["images"] = str(root / "images")
    put("train.csv", b"id,url,landmark_id\nabc123,u,1\n")
    p["train_csv"] = str(root / "train.csv")
    p["nompl"] = os.path.dirname(put("nompl/sitecustomize.py", textwrap.dedent("""\
        import sys

        class _NoMatplotlib:  # as if the report extra were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "matplotlib":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, _NoMatplotlib())
        """).encode()))
    return p


# (case id, console script, arguments, words the one stderr line must hold). {name} is a path
# from `bad`. Ordered cheap first.
CASES = [
    ("evaluate-index-is-folder", "landmark-evaluate",
     ["--queries={queries}", "--index={dir}"], ["{dir}", "folder"]),
    ("evaluate-queries-binary", "landmark-evaluate",
     ["--queries={binary}", "--index={index}"], ["{binary}", ".npz"]),
    ("evaluate-queries-empty", "landmark-evaluate",
     ["--queries={empty}", "--index={index}"], ["{empty}", ".npz"]),
    ("evaluate-queries-truncated", "landmark-evaluate",
     ["--queries={truncated_npz}", "--index={index}"], ["{truncated_npz}"]),
    ("evaluate-queries-under-a-file", "landmark-evaluate",
     ["--queries={file}/q.npz", "--index={index}"], ["{file}/q.npz"]),
    ("evaluate-submission-is-folder", "landmark-evaluate",
     ["--queries={queries}", "--index={index}", "--submission={dir}"], ["--submission", "folder"]),
    ("evaluate-submission-under-a-file", "landmark-evaluate",
     ["--queries={queries}", "--index={index}", "--submission={file}/s.csv"], ["{file}"]),
    ("train-info-not-json", "landmark-train",
     ["--data_dir={data_not_json}", "--workdir={root}/w", "--train_steps=1"], ["not valid JSON"]),
    ("train-info-is-folder", "landmark-train",
     ["--data_dir={data_info_dir}", "--workdir={root}/w", "--train_steps=1"], ["folder"]),
    ("evaluate-solution-binary", "landmark-evaluate",
     ["--queries={queries}", "--index={index}", "--solution={binary}"], ["{binary}", "UTF-8"]),
    ("evaluate-solution-is-folder", "landmark-evaluate",
     ["--queries={queries}", "--index={index}", "--solution={dir}"], ["{dir}", "folder"]),
    ("tfrecords-csv-latin1", "landmark-tfrecords",
     ["--train_csv={latin1_train_csv}", "--image_dir={images}", "--output_dir={root}/out"],
     ["{latin1_train_csv}", "UTF-8"]),
    ("tfrecords-output-is-file", "landmark-tfrecords",
     ["--train_csv={train_csv}", "--image_dir={images}", "--output_dir={file}"],
     ["--output_dir", "is a file"]),
    ("tfrecords-foreign-output", "landmark-tfrecords",
     ["--train_csv={train_csv}", "--image_dir={images}", "--output_dir={foreign_out}"],
     ["{foreign_out}", "--output_dir"]),
    ("embed-csv-latin1", "landmark-embed",
     ["--model={dir}", "--csv={latin1_id_csv}", "--image_dir={images}", "--output={root}/e.npz"],
     ["{latin1_id_csv}", "UTF-8"]),
    ("pseudolabel-labelled-is-folder", "landmark-pseudolabel",
     ["--labelled={dir}", "--unlabelled={queries}", "--output={root}/p.csv"], ["{dir}", "folder"]),
    ("report-without-matplotlib", "landmark-report",
     ["--output_dir={root}/report", "--timings={file}"], ["pip install 'landmark-tf[report]'"]),
]


def _tree(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root)
            for d, dirs, files in os.walk(root) for n in [*dirs, *files]}


def _error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines, less TensorFlow's start-up lines (CPU dependent: AVX-512 CPUs
    print some whatever the log level, and cli/native_log filters them; tests must not care)."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and not native_log.is_noise(ln.encode())
            and not ln.startswith("To enable the following instructions")]


@pytest.mark.parametrize("cli,args,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_leaves_nothing(bad, cli, args, needles):
    before = _tree(bad["root"])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    if cli == "landmark-report":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [bad["nompl"], env.get("PYTHONPATH")]))
    proc = subprocess.run([os.path.join(BIN, cli), *(a.format(**bad) for a in args)],
                          capture_output=True, text=True, env=env, timeout=120)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{cli}: error: ")
    for needle in needles:
        assert needle.format(**bad) in lines[0], lines[0]
    assert "np.str_" not in lines[0]
    assert _tree(bad["root"]) == before  # no stray .tmp-*, no half-made output folder


@pytest.mark.parametrize("name,needle", [("data_list", "not a JSON object"),
                                         ("data_latin1", "not UTF-8"), ("file", "not found")])
def test_dataset_info_kinds_name_the_file(bad, name, needle):
    """The rest of landmark-train's dataset_info.json kinds, in-process (as its CLI reads it)."""
    from landmark_tf.data import records
    from landmark_tf.errors import UserError

    with pytest.raises(UserError, match=needle) as e:
        records.load_dataset_info(bad[name])
    assert bad[name] in str(e.value) and "\n" not in str(e.value)


def test_latin1_solution_names_the_file(bad):
    from landmark_tf.errors import UserError
    from landmark_tf.retrieval import solutions

    with pytest.raises(UserError, match="not UTF-8 text") as e:
        solutions.read_solution(bad["latin1_solution"], "retrieval")
    assert str(e.value).startswith(bad["latin1_solution"] + ": ")


def test_report_refusing_an_input_creates_no_output_folder(bad, tmp_path):
    from landmark_tf.errors import UserError
    from landmark_tf.report import page

    out = tmp_path / "report"
    with pytest.raises(UserError, match="not UTF-8"):
        page.write_report(page.ReportConfig(output_dir=str(out), metrics={"m": bad["binary"]}))
    assert not out.exists()


# --- ids that would escape their root: skipped and listed, never read ---------------------


@pytest.fixture()
def traversal_tree(tmp_path, monkeypatch):
    """An image tree with one good image, and a JPEG outside it where TRAVERSAL points;
    `reads` records every path fileio reads."""
    from landmark_tf import fileio
    from landmark_tf.data import gldv2

    image_dir = tmp_path / "root" / "x" / "y" / "z" / "images"
    good = "abc123def"
    path = Path(gldv2.image_path(str(image_dir), good))
    path.parent.mkdir(parents=True)
    path.write_bytes(_jpeg(0))
    # Where the old os.path.join(IMAGE_DIR, id[0], id[1], id[2], id + ".jpg") led: outside.
    outside = Path(os.path.normpath(f"{image_dir}/{TRAVERSAL}.jpg"))
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_bytes(_jpeg(1))
    reads: list[str] = []
    real = fileio.read_bytes
    monkeypatch.setattr(fileio, "read_bytes", lambda p: (reads.append(p), real(p))[1])
    return {"dir": str(image_dir), "good": good, "outside": str(outside), "reads": reads}


def _read_outside(t) -> list[str]:
    """Images read from outside the image folder (the fake model's fingerprint is no image)."""
    return [p for p in t["reads"]
            if p.endswith(".jpg") and not os.path.normpath(p).startswith(t["dir"] + os.sep)]


def _fake_model(folder: Path) -> str:
    """A folder landmark-embed fingerprints (saved_model.pb) for a test that fakes the model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "saved_model.pb").write_bytes(b"a stand-in; Embedder is replaced")
    return str(folder)


@pytest.mark.parametrize("bad_id", [TRAVERSAL, "abc/../../x", "ab", "a.b.c..", "/etc/passwd"])
def test_embed_skips_and_lists_ids_outside_the_image_folder(traversal_tree, tmp_path,
                                                            monkeypatch, bad_id):
    from landmark_tf.serving import embed

    class FakeEmbedder:  # the model is not what this test is about
        dim = 4

        def __init__(self, path):
            pass

        def __call__(self, images):
            return np.tile(np.eye(1, 4, dtype=np.float32), (len(images), 1))

    monkeypatch.setattr(embed, "Embedder", FakeEmbedder)
    csv_path = tmp_path / "set.csv"
    csv_path.write_text(f"id\n{traversal_tree['good']}\n{bad_id}\n")
    out = tmp_path / "out" / "set.npz"
    result = embed.embed_set(embed.EmbedConfig(
        model=_fake_model(tmp_path / "model"), output=str(out), csv=str(csv_path),
        image_dir=traversal_tree["dir"]))
    assert (result["count"], result["skipped"]) == (1, 1)
    listed = json.loads((tmp_path / "out" / "set.skipped.json").read_text())["skipped"]
    assert [s["id"] for s in listed] == [bad_id] and "refused" in listed[0]["reason"]
    assert not _read_outside(traversal_tree)


def test_revisitop_names_outside_the_image_folder_are_skipped(traversal_tree, tmp_path):
    from landmark_tf.serving import embed_sources

    gnd = tmp_path / "gnd.pkl"
    (Path(traversal_tree["dir"]) / f"{traversal_tree['good']}.jpg").write_bytes(_jpeg(2))
    gnd.write_bytes(pickle.dumps({"imlist": [traversal_tree["good"], TRAVERSAL], "qimlist": [],
                                  "gnd": []}))
    source = embed_sources.revisitop_source(str(gnd), traversal_tree["dir"], "database")
    got = [embed_sources.load_image(item) for item in source.items]
    assert isinstance(got[0], np.ndarray) and "refused" in got[1]
    assert not _read_outside(traversal_tree)


def test_report_never_reads_a_submitted_id_outside_the_dataset(traversal_tree, tmp_path):
    from landmark_tf.report import inputs

    skipped: dict[str, str] = {}
    thumb = inputs.thumbnail(traversal_tree["dir"], TRAVERSAL, skipped)
    assert thumb.shape == (inputs.THUMB, inputs.THUMB, 3) and TRAVERSAL in skipped
    assert inputs.thumbnail(traversal_tree["dir"], traversal_tree["good"], skipped).size
    assert not _read_outside(traversal_tree) and len(traversal_tree["reads"]) == 1


def test_pseudolabel_leaves_out_and_lists_ids_no_stage_could_read(tmp_path):
    from landmark_tf.curation import pseudolabel
    from landmark_tf.retrieval.embeddings import save_embeddings

    save_embeddings(str(tmp_path / "l.npz"), ["lab001", "lab002"],
                    np.eye(2, 4, dtype=np.float32), [7, 8])
    save_embeddings(str(tmp_path / "u.npz"), ["unl001", TRAVERSAL],
                    np.eye(2, 4, dtype=np.float32))
    out = tmp_path / "p.csv"
    result = pseudolabel.pseudolabel(pseudolabel.PseudoLabelConfig(
        labelled=str(tmp_path / "l.npz"), unlabelled=str(tmp_path / "u.npz"), output=str(out),
        threshold=0.0, k=1))
    assert [s["id"] for s in result["skipped"]] == [TRAVERSAL]
    assert result["labelled"] == 1 and TRAVERSAL not in out.read_text()


def test_no_path_is_built_for_a_refused_id():
    from landmark_tf.data import gldv2

    for bad_id in (TRAVERSAL, "abc/def", "ab", "abc.jpg", "abc\\..\\x", ""):
        assert gldv2.id_problem(bad_id)
        with pytest.raises(ValueError):
            gldv2.image_path("/root", bad_id)
    assert gldv2.id_problem("all_souls_000013") is None  # revisitop names pass
    assert gldv2.image_path("/r", "abcdef") == "/r/a/b/c/abcdef.jpg"


# --- atomic writes: no temporary survives a failed rename --------------------------------


def test_atomic_write_onto_a_folder_leaves_no_temporary(tmp_path):
    from landmark_tf import fileio
    from landmark_tf.errors import BadFile
    from landmark_tf.retrieval import npzstream

    (tmp_path / "target").mkdir()
    with pytest.raises(BadFile, match="target"):
        fileio.write_bytes_atomic(str(tmp_path / "target"), b"x" * 1000)
    with pytest.raises(BadFile, match="target"), npzstream.NpzWriter(str(tmp_path / "target")) as w:
        w.write("ids", np.array(["a"]))
    assert sorted(os.listdir(tmp_path)) == ["target"] and not os.listdir(tmp_path / "target")


# --- resume: a damaged kept shard is rewritten --------------------------------------------


def _tiny_conversion(tmp_path, n=12):
    """A GLDv2 train.csv + image tree of `n` images in two classes, converted into 3 shards."""
    from landmark_tf.data import convert, gldv2

    ids = [f"{i:02x}c0ffee{i:04d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        path = Path(gldv2.image_path(str(tmp_path / "img"), image_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(i))
    (tmp_path / "train.csv").write_text("id,url,landmark_id\n" + "".join(
        f"{image_id},u,{i % 2}\n" for i, image_id in enumerate(ids)))
    cfg = convert.ConvertConfig(train_csv=str(tmp_path / "train.csv"),
                                image_dir=str(tmp_path / "img"), output_dir=str(tmp_path / "out"),
                                val_fraction=0.0, num_shards=3)
    convert.convert_dataset(cfg, progress=False)
    return cfg


def test_another_conversion_is_refused_naming_flags(tmp_path):
    import dataclasses

    from landmark_tf.data import convert
    from landmark_tf.errors import UserError

    cfg = _tiny_conversion(tmp_path)
    with pytest.raises(UserError) as e:
        convert.convert_dataset(dataclasses.replace(cfg, jpeg_quality=50), progress=False)
    assert str(e.value).startswith(f"--output_dir {cfg.output_dir} holds a conversion")
    assert f"--jpeg_quality {cfg.jpeg_quality} -> 50" in str(e.value)


def test_resume_rewrites_a_truncated_or_altered_shard(tmp_path):
    from landmark_tf.data import convert

    cfg = _tiny_conversion(tmp_path)
    shards = sorted(p for p in (tmp_path / "out").iterdir() if p.suffix == ".tfrec")
    original = {p.name: p.read_bytes() for p in shards}
    shards[0].write_bytes(original[shards[0].name][:-100])  # cut short
    tail = bytearray(original[shards[1].name])
    tail[-1] ^= 0xFF  # same size, last CRC byte flipped
    shards[1].write_bytes(bytes(tail))
    result = convert.convert_dataset(cfg, progress=False)
    assert result["shards_damaged"] == sorted([shards[0].name, shards[1].name])
    assert (result["shards_written"], result["shards_kept"]) == (2, 1)
    assert {p.name: p.read_bytes() for p in shards} == original
    assert convert.convert_dataset(cfg, progress=False)["up_to_date"]


# --- kill -9 of landmark-embed, then rerun ------------------------------------------------

_KILLED_EMBED = """
import os, signal, sys
import numpy as np
from landmark_tf.retrieval import npzstream
from landmark_tf.serving import embed

class FakeEmbedder:
    dim = 4
    def __init__(self, path):
        pass
    def __call__(self, images):
        return np.stack([np.r_[im.mean(axis=(0, 1)), 1.0] for im in images]).astype(np.float32)

embed.Embedder = FakeEmbedder
real = npzstream.os.replace
def replace(src, dst):  # SIGKILL with the merged file written under its temporary name
    if dst.endswith("set.npz"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
npzstream.os.replace = replace
embed.embed_set(embed.EmbedConfig(model=sys.argv[4], output=sys.argv[1], csv=sys.argv[2],
                                  image_dir=sys.argv[3], chunk_size=2))
"""


def test_embed_killed_while_publishing_resumes_to_the_uninterrupted_file(tmp_path,
                                                                        monkeypatch):
    from landmark_tf.data import gldv2
    from landmark_tf.serving import embed

    ids = [f"{i:02x}beef{i:04d}" for i in range(5)]
    for i, image_id in enumerate(ids):
        path = Path(gldv2.image_path(str(tmp_path / "img"), image_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(i))
    (tmp_path / "set.csv").write_text("id\n" + "".join(f"{i}\n" for i in ids))
    killed, whole = tmp_path / "killed" / "set.npz", tmp_path / "whole" / "set.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    model = _fake_model(tmp_path / "model")
    proc = subprocess.run([sys.executable, "-c", _KILLED_EMBED, str(killed),
                           str(tmp_path / "set.csv"), str(tmp_path / "img"), model],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = os.listdir(killed.parent)
    assert any(n.startswith(".tmp-") for n in left) and "set.npz" not in left

    class FakeEmbedder:  # the same as in the killed process
        dim = 4

        def __init__(self, path):
            pass

        def __call__(self, images):
            rows = [np.r_[im.mean(axis=(0, 1)), 1.0] for im in images]
            return np.stack(rows).astype(np.float32)

    monkeypatch.setattr(embed, "Embedder", FakeEmbedder)
    for out in (killed, whole):
        embed.embed_set(embed.EmbedConfig(model=model, output=str(out),
                                          csv=str(tmp_path / "set.csv"),
                                          image_dir=str(tmp_path / "img"), chunk_size=2))
    assert sorted(os.listdir(killed.parent)) == sorted(os.listdir(whole.parent))
    a, b = np.load(killed), np.load(whole)
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        assert np.array_equal(a[key], b[key]), key


def test_export_rerun_removes_what_a_killed_export_left(tmp_path):
    """What SIGKILL leaves of an export (the SavedModel under its temporary name, and the old
    export moved aside while being replaced) goes on the rerun; other targets' stay."""
    import fixtures_export as fx

    export_dir = tmp_path / "model"
    for leftover in (".tmp-0123456789ab-model", ".tmp-ba9876543210-model"):
        (tmp_path / leftover / "variables").mkdir(parents=True)
        (tmp_path / leftover / "saved_model.pb").write_bytes(b"half")
    (tmp_path / ".tmp-0123456789ab-other").write_bytes(b"not ours")
    fx.write_tiny_export(str(export_dir))
    assert sorted(os.listdir(tmp_path)) == [".tmp-0123456789ab-other", "model"]
    assert (export_dir / "metadata.json").exists()
