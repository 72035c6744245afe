"""A SavedModel written by today's TensorFlow that older ones (Kaggle GLR2020's TF 2.2) load
cleanly with `tf.saved_model.load`: no unknown op, no warning.

What TF 2.21 writes and TF 2.2 cannot take, and why each change is safe for an inference model:
- The native saver (`__inference__traced_save_*`, `saver_def`) uses `DisableCopyOnRead`, an op
  TF 2.2 lacks. `SaveOptions(experimental_skip_saver=True)` leaves it out. TF2's
  `tf.saved_model.load` (Kaggle's loader and ours) never runs it: it restores variables from the
  checkpoint in Python. Only TF1 session loaders (TF Serving, `saved_model_cli run`) need it.
- Ops under `tf.custom_gradient` (swish) carry `_gradient_op_type`, the name of a gradient
  function. `experimental_custom_gradients=False` does not save those functions (they make saving
  and loading slow), so every loader warns per function that a gradient would fail. The attribute
  is dropped: the forward ops are all in the graph, so a gradient, if ever asked, is autodiff's.
- The checkpoint's object graph lists functions and signatures (nodes with no values). TF 2.2
  does not track functions, so it warns "Unresolved object in checkpoint" for each. The graph is
  rewritten without nodes that hold no value and lead to none; values are keyed by path, so
  every variable restores as before, in either TensorFlow (both match by name from the root).
- A grouped Conv2D (Keras `Conv2D(groups=...)`: ConvNeXt's 7x7 depthwise convolutions) is one
  Conv2D op whose filter has fewer input channels than the image. TF 2.2 has the op but no CPU
  kernel for it ("Fused conv implementation does not support grouped convolutions for now",
  measured); `native_depthwise_convolutions` traces those with groups == input channels as
  DepthwiseConv2dNative of the same kernel, reshaped: the same function, and the SavedModel's
  variables stay the Keras model's.
"""

from __future__ import annotations

import contextlib
import itertools

import keras
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2, trackable_object_graph_pb2

from landmark_tf import fileio

_GRADIENT_ATTR = "_gradient_op_type"
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def save(obj: tf.Module, path: str, signatures: dict) -> None:
    """`tf.saved_model.save(obj, path, signatures)` in the portable form described above."""
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False,
                                         experimental_skip_saver=True)
    tf.saved_model.save(obj, path, signatures=signatures, options=options)
    _drop_gradient_names(path)
    _prune_checkpoint_graph(fileio.join(path, "variables", "variables"))
    _rewrite_fingerprint(path)


@contextlib.contextmanager
def native_depthwise_convolutions(model: keras.Model):
    """While active, each Conv2D of `model` (nested models included) with one input channel
    per group computes as a depthwise convolution: kernel [kh, kw, 1, G * M] read as
    [kh, kw, G, M] (output channel g * M + m of group g is depthwise channel g, multiplier m).
    For tracing a serving function; the layers are as before afterwards."""
    patched = []
    for layer in model._flatten_layers(include_self=False):
        if (isinstance(layer, keras.layers.Conv2D) and layer.groups > 1
                and layer.kernel.shape[2] == 1 and layer.data_format == "channels_last"):
            layer.convolution_op = _depthwise_op(layer)
            patched.append(layer)
    try:
        yield len(patched)
    finally:
        for layer in patched:
            del layer.convolution_op


def _depthwise_op(layer: keras.layers.Conv2D):
    def convolution_op(inputs, kernel):
        kh, kw, _, filters = kernel.shape
        depthwise = keras.ops.reshape(kernel, (kh, kw, layer.groups, filters // layer.groups))
        return keras.ops.depthwise_conv(inputs, depthwise, strides=layer.strides,
                                        padding=layer.padding,
                                        dilation_rate=layer.dilation_rate)

    return convolution_op


def _drop_gradient_names(path: str) -> None:
    pb = fileio.join(path, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(fileio.read_bytes(pb))
    for meta_graph in proto.meta_graphs:
        library = meta_graph.graph_def.library
        for node in itertools.chain(meta_graph.graph_def.node,
                                    (n for f in library.function for n in f.node_def)):
            if _GRADIENT_ATTR in node.attr:
                del node.attr[_GRADIENT_ATTR]
    fileio.write_bytes_atomic(pb, proto.SerializeToString())


def pruned_object_graph(
    graph: trackable_object_graph_pb2.TrackableObjectGraph,
) -> trackable_object_graph_pb2.TrackableObjectGraph:
    """The object graph restricted to nodes that hold a value or lead to one (root kept)."""
    holds: dict[int, bool] = {}

    def visit(node_id: int, path: frozenset) -> bool:
        if node_id not in holds:
            if node_id in path:  # a cycle: it leads nowhere new
                return False
            node = graph.nodes[node_id]
            below = [visit(c.node_id, path | {node_id}) for c in node.children]
            holds[node_id] = bool(node.attributes) or any(below)
        return holds[node_id]

    visit(0, frozenset())
    kept = [i for i in range(len(graph.nodes)) if i == 0 or holds.get(i)]
    new_id = {old: new for new, old in enumerate(kept)}
    out = trackable_object_graph_pb2.TrackableObjectGraph()
    for old in kept:
        node = out.nodes.add()
        node.CopyFrom(graph.nodes[old])
        del node.children[:]
        for child in graph.nodes[old].children:
            if child.node_id in new_id:
                node.children.add(node_id=new_id[child.node_id], local_name=child.local_name)
        del node.slot_variables[:]
        for slot in graph.nodes[old].slot_variables:
            if {slot.original_variable_node_id, slot.slot_variable_node_id} <= new_id.keys():
                node.slot_variables.add(
                    original_variable_node_id=new_id[slot.original_variable_node_id],
                    slot_name=slot.slot_name,
                    slot_variable_node_id=new_id[slot.slot_variable_node_id])
    return out


def _prune_checkpoint_graph(prefix: str) -> None:
    """Rewrites the checkpoint at `prefix` with `pruned_object_graph`; values unchanged."""
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)  # any filesystem: gs://, ram://
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
    pruned = pruned_object_graph(graph)
    if len(pruned.nodes) == len(graph.nodes):
        return
    names = sorted(reader.get_variable_to_dtype_map())
    tensors = [pruned.SerializeToString() if name == _OBJECT_GRAPH_KEY else
               reader.get_tensor(name) for name in names]  # fmt: skip
    del reader
    folder = prefix.rsplit("/", 1)[0]
    tmp = fileio.tmp_name(folder)
    with tf.device("CPU"):
        tf.raw_ops.SaveV2(prefix=fileio.join(tmp, "variables"), tensor_names=names,
                          shape_and_slices=[""] * len(names), tensors=tensors)
    for name in tf.io.gfile.listdir(folder):
        tf.io.gfile.remove(fileio.join(folder, name))
    for name in tf.io.gfile.listdir(tmp):  # file by file: object stores rename no folders
        tf.io.gfile.rename(fileio.join(tmp, name), fileio.join(folder, name))
    tf.io.gfile.rmtree(tmp)


def _rewrite_fingerprint(path: str) -> None:
    """fingerprint.pb hashes saved_model.pb and the checkpoint: TF's own writer, after the edits."""
    from tensorflow.python.saved_model import fingerprinting_utils

    fingerprinting_utils.write_fingerprint(path)
