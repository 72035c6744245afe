"""Kaggle GLR2020's contract: every SavedModel we write loads in the real TensorFlow 2.2 with no
warning and gives TF 2.21's descriptors; the export-time op check catches what TF 2.2 lacks.

The exports of trained workdirs (B0 from either backend, ensembles) are loaded in TF 2.2 in
test_export, test_jax_train and test_ensemble, where they are built; here: every pooling x neck
in one SavedModel, and the check itself.
"""

import json
import os
import subprocess

import fixtures_export as fx
import keras
import numpy as np
import pytest
import tensorflow as tf
from stage_named_backbone import stage_named_backbone
from tiny_convnext import tiny_convnext

from landmark_tf import config
from landmark_tf.config import ModelConfig
from landmark_tf.modeling import model as model_lib
from landmark_tf.serving import export, kaggle_contract, portable_savedmodel, signatures

SIZES = "37x501,64x48,33x33"


# The pooling and neck ops are what differ per option; EfficientNet's own ops are in the B0
# exports loaded in TF 2.2 by test_export / test_jax_train (B1-B7 use the same layer types).
# ConvNeXt's (grouped convolutions, LayerNorm, gelu) come from a ConvNeXt branch per pooling;
# a convnext-tiny CLI export loads in TF 2.2 in test_convnext (slow).
# (backbone, its stand-in, pooling, neck) of each branch of `every_neck`.
_BRANCHES = [("efficientnet-b0", stage_named_backbone, p, n)
             for p in config.POOLINGS for n in config.NECKS] + [
    ("convnext-tiny", tiny_convnext, p, "dense_bn") for p in config.POOLINGS]


@pytest.fixture(scope="module")
def every_neck(tmp_path_factory):
    """One SavedModel whose descriptor concatenates an embedding model per pooling x neck, and
    per pooling on a ConvNeXt."""
    root = tmp_path_factory.mktemp("necks")
    original = model_lib.backbones.build_backbone
    try:
        branches, want = [], []
        images = [tf.constant(im) for im in _images()]
        for i, (backbone, stand_in, pooling, neck) in enumerate(_BRANCHES):
            keras.utils.set_random_seed(i)
            model_lib.backbones.build_backbone = stand_in
            cfg = ModelConfig(backbone=backbone, image_size=32, embedding_dim=8, num_classes=4,
                              pooling=pooling, neck=neck)
            model = model_lib.build_models(cfg).embedding_model
            branches.append(signatures.KerasBranch(model, [32],
                                                   name=f"{backbone[:8]}_{pooling}_{neck}"))
        module = signatures.DescriptorModule(branches, [1.0] * len(branches))
        want = np.stack([module.serving_default(im)["global_descriptor"].numpy()
                         for im in images])
    finally:
        model_lib.backbones.build_backbone = original
    path = str(root / "export")
    metadata = {"format": export.FORMAT, "kind": "ensemble", "embedding_dim": 8 * len(branches)}
    export.write_savedmodel(module, path, metadata, overwrite=False)
    return {"path": path, "want": want, "root": str(root), "branches": len(branches)}


def _images():
    import load_savedmodel

    return load_savedmodel.make_images(SIZES)


def test_every_pooling_and_neck_loads_in_tf22_with_the_same_descriptors(every_neck):
    assert every_neck["branches"] == len(_BRANCHES)
    with open(os.path.join(every_neck["path"], "metadata.json")) as f:
        meta = json.load(f)
    assert meta["kaggle"]["ok"], meta["kaggle"]
    r = fx.load_in_tf22(every_neck["path"], SIZES, os.path.join(every_neck["root"], "tf22.npz"))
    assert r["signatures"] == ["serving_batch", "serving_default", "serving_padded"]
    assert r["padded_max_diff"] < 1e-5 and r["batch_max_diff"] < 1e-5 and r["deterministic"]
    got = np.load(os.path.join(every_neck["root"], "tf22.npz"))["default"]
    np.testing.assert_allclose(got, every_neck["want"], atol=1e-4, rtol=0)


def test_check_finds_what_tf22_lacks_in_a_plain_tf_save(tmp_path):
    """TF 2.21's default SavedModel (its saver uses DisableCopyOnRead) fails TF 2.2: the check
    says so; the portable form of the same module passes."""
    model = fx.tiny_model(embedding_dim=4, seed=0)
    module = signatures.DescriptorModule([signatures.KerasBranch(model, [32])], [1.0])
    plain, portable = str(tmp_path / "plain"), str(tmp_path / "portable")
    tf.saved_model.save(module, plain, signatures=module.signatures())
    problems = kaggle_contract.check(plain)["tf_problems"]
    assert any("DisableCopyOnRead" in p for p in problems), problems
    portable_savedmodel.save(module, portable, module.signatures())
    assert kaggle_contract.check(portable) == {
        "loads_in_tf": "2.2", "tf_problems": [], "signature_problems": [], "ok": True}


def test_check_finds_attributes_tf22_ops_did_not_have(tmp_path):
    export_dir = str(tmp_path / "e")
    fx.write_tiny_export(export_dir)
    proto = kaggle_contract.read_savedmodel(export_dir)
    node = next(n for f in proto.meta_graphs[0].graph_def.library.function
                for n in f.node_def if n.op == "Conv2D")  # fmt: skip
    node.attr["a_future_attr"].b = True
    problems = kaggle_contract.op_problems(proto)
    assert problems == ["op Conv2D has attribute(s) a_future_attr unknown to TensorFlow 2.2"]


def test_grouped_convolutions_are_found_and_traced_as_depthwise(tmp_path):
    """TF 2.2 has no CPU kernel for a grouped Conv2D: the check names it in a plain trace of a
    ConvNeXt; `native_depthwise_convolutions` computes the same as depthwise convolutions, here
    with 2 outputs per group (ConvNeXt has 1), and leaves the layers as they were."""
    keras.utils.set_random_seed(0)
    image = keras.Input((None, None, 4))
    model = keras.Model(image, keras.layers.Conv2D(8, 3, groups=4, strides=2)(image))
    x = np.random.default_rng(0).normal(size=(2, 9, 7, 4)).astype("float32")
    want = keras.ops.convert_to_numpy(model(x))
    with portable_savedmodel.native_depthwise_convolutions(model) as patched:
        graph = tf.function(model).get_concrete_function(tf.TensorSpec(x.shape)).graph
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), want, atol=1e-5)
    assert patched == 1
    assert {"DepthwiseConv2dNative"} <= {op.type for op in graph.get_operations()}
    assert not any("convolution_op" in vars(la) for la in model.layers)

    convnext = tiny_convnext()
    plain = tf.Module()
    plain.variables_ = list(convnext.variables)
    plain.serve = tf.function(lambda im: {"global_descriptor": convnext(im)},
                              input_signature=[tf.TensorSpec([1, 32, 32, 3], tf.float32)])
    path = str(tmp_path / "plain")
    portable_savedmodel.save(plain, path, {"serving_default": plain.serve})
    problems = kaggle_contract.check(path)["tf_problems"]
    assert any(p.startswith("4 grouped Conv2D (no CPU kernel in TensorFlow 2.2)")
               for p in problems), problems


def test_signature_that_kaggle_cannot_call_is_reported(tmp_path):
    class Wrong(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
        def serve(self, image):
            return {"embedding": tf.reduce_mean(image, axis=[0, 1])}

    path = str(tmp_path / "wrong")
    module = Wrong()
    portable_savedmodel.save(module, path, {"serving_default": module.serve})
    problems = kaggle_contract.check(path)["signature_problems"]
    assert problems == [
        "serving_default inputs are ['image'], expected ['input_image']",
        "serving_default outputs are ['embedding'], expected 'global_descriptor'"], problems


def test_pruned_checkpoint_graph_keeps_every_value_and_drops_function_nodes(tmp_path):
    export_dir = str(tmp_path / "e")
    model = fx.write_tiny_export(export_dir)
    reader = tf.train.load_checkpoint(os.path.join(export_dir, "variables", "variables"))
    values = [k for k in reader.get_variable_to_shape_map() if "VARIABLE_VALUE" in k]
    assert len(values) == len(model.weights)
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    names = {c.local_name for n in graph.nodes for c in n.children}
    assert not names & {"serving_default", "signatures", "trace_0"}, names
    assert portable_savedmodel.pruned_object_graph(graph) == graph  # nothing left to prune


def test_the_checked_in_registry_is_tf22s_own(tmp_path):
    """scripts/dump_op_registry.py run in the real TF 2.2 writes the file the check reads."""
    if not os.path.exists(fx.TF22_PYTHON):
        pytest.skip("no .venv-tf22: `make test` builds it where a Python 3.8 exists")
    out = tmp_path / "ops.json"
    subprocess.run([fx.TF22_PYTHON, os.path.join(fx.REPO, "scripts", "dump_op_registry.py"),
                    str(out)], check=True, capture_output=True, timeout=120,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ""})
    with open(kaggle_contract.OPS_FILE, "rb") as f:
        assert out.read_bytes() == f.read()
