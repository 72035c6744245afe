"""landmark-embed --workdir: the training workdir's model under a 2-replica MirroredStrategy
(2 logical CPUs) gives the SavedModel path's rows, in order, with the same skipped images."""

import json
import os
import subprocess
import sys
import textwrap

import fixtures_export as fx
import numpy as np
import pytest

from landmark_tf.retrieval.embeddings import load_embeddings
from landmark_tf.serving import embed, export

SIZES = {f"{i:x}{i:x}cd{i:04x}": (20 + 11 * i % 50, 28 + 17 * i % 60) for i in range(1, 12)}

_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from landmark_tf.serving import embed, embed_accel
    workdir, csv, image_dir, out, precision = sys.argv[1:6]
    accel = embed_accel.AccelConfig(workdir=workdir, strategy="mirrored", precision=precision,
                                    scales=(1.0, 1.5))
    cfg = embed.EmbedConfig(model="", accel=accel, output=out, csv=csv, image_dir=image_dir,
                            batch_size=3, chunk_size=5, num_threads=2)
    print(json.dumps(embed.embed_set(cfg)))
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("accel")
    workdir, export_dir = str(root / "run"), str(root / "export")
    os.makedirs(workdir)
    fx.make_workdir(workdir, image_size=32, embedding_dim=16, seed=4)
    export.export_model(export.ExportConfig(workdir=workdir, export_dir=export_dir,
                                            scales=(1.0, 1.5)))  # fmt: skip
    image_dir = str(root / "images")
    fx.write_image_tree(image_dir, SIZES)
    ids = list(SIZES)
    ids.insert(4, "aaamissing")
    csv = str(root / "set.csv")
    with open(csv, "w") as f:
        f.write("id,landmark_id\n" + "".join(f"{i},{n % 3}\n" for n, i in enumerate(ids)))
    reference = str(root / "savedmodel.npz")
    embed.embed_set(embed.EmbedConfig(model=export_dir, output=reference, csv=csv,
                                      image_dir=image_dir, batch_size=4, num_threads=2))
    return {"root": root, "workdir": workdir, "export": export_dir, "csv": csv,
            "image_dir": image_dir, "reference": reference}  # fmt: skip


def _accel(setup, precision: str) -> tuple[dict, object]:
    out = str(setup["root"] / f"accel_{precision}.npz")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, setup["export"], setup["csv"],
                           setup["image_dir"], out, precision],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), load_embeddings(out)


def test_two_replicas_equal_the_savedmodel_path(setup):
    """Given the export, its workdir is used (metadata.json names the checkpoint)."""
    result, es = _accel(setup, "float32")
    ref = load_embeddings(setup["reference"])
    assert result["replicas"] == 2 and result["policy"] == "float32"
    assert result["workdir"] == setup["workdir"] and result["skipped"] == 1
    assert es.ids.tolist() == ref.ids.tolist() and len(es) == len(SIZES)
    np.testing.assert_array_equal(es.landmark_ids, ref.landmark_ids)
    np.testing.assert_allclose(es.embeddings, ref.embeddings, atol=2e-5, rtol=0)
    assert not os.path.exists(str(setup["root"] / "accel_float32.npz.parts"))


@pytest.mark.slow
def test_mixed_bfloat16_is_close_to_the_savedmodel_path(setup):
    result, es = _accel(setup, "bfloat16")
    ref = load_embeddings(setup["reference"])
    assert result["policy"] == "mixed_bfloat16"
    cosine = np.sum(es.embeddings * ref.embeddings, axis=1)
    assert cosine.min() > 0.98


def test_model_and_workdir_together_are_refused(setup, tmp_path):
    proc = fx.run_cli("landmark-embed", f"--model={setup['export']}",
                      f"--workdir={setup['workdir']}", f"--csv={setup['csv']}",
                      f"--image_dir={setup['image_dir']}", f"--output={tmp_path}/o.npz")
    fx.assert_one_line_error(proc, "either --model", "--workdir")
