"""What a Kaggle GLR2020 submission must satisfy, checked on the SavedModel files at export.

The competition's rule: the model "must be compatible with TensorFlow 2.2", loaded with
`tf.saved_model.load` and called as `serving_default(input_image=uint8 [H, W, 3])`, returning
`global_descriptor` (float32 [D]). A SavedModel written by a newer TensorFlow fails to load in
2.2 when any function in it uses an op 2.2 does not register ("Op type not registered") or an
attribute the op did not have yet. `tf2.2_ops.json` beside this file is TF 2.2.0's op registry
(op -> attribute names), written by `scripts/dump_op_registry.py` run in a real TF 2.2.
One op TF 2.2 registers fails at run time instead: a grouped Conv2D (filter input channels
fewer than the image's), which has no CPU kernel there ("Fused conv implementation does not
support grouped convolutions for now"); it is found from the shapes the graph records.

Only `saved_model.pb` is read (no TensorFlow graph is built), so the check costs milliseconds.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

from landmark_tf import fileio

TARGET_TF = "2.2"
OPS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf2.2_ops.json")
SIGNATURE = "serving_default"
INPUT = "input_image"
OUTPUT = "global_descriptor"


@functools.lru_cache(maxsize=1)
def target_registry() -> dict[str, frozenset[str]]:
    """TF 2.2's ops: name -> attribute names."""
    with open(OPS_FILE) as f:
        data = json.load(f)
    return {name: frozenset(attrs) for name, attrs in data["ops"].items()}


def read_savedmodel(export_dir: str) -> saved_model_pb2.SavedModel:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(fileio.read_bytes(fileio.join(export_dir, "saved_model.pb")))
    return proto


def used_ops(proto: saved_model_pb2.SavedModel) -> dict[str, set[str]]:
    """Every op type in the function library -> the attributes set on it.

    What `tf.saved_model.load` builds: the functions. The meta graph's own nodes (variable
    handles for TF1 session loaders, which need the saver that `portable_savedmodel` leaves out)
    are not imported by it. Calls of library functions by name are not ops; attributes starting
    with "_" are internal annotations that a loader ignores.
    """
    used: dict[str, set[str]] = {}
    for meta_graph in proto.meta_graphs:
        library = meta_graph.graph_def.library
        functions = {f.signature.name for f in library.function}
        for node in (n for f in library.function for n in f.node_def):
            if node.op not in functions:
                used.setdefault(node.op, set()).update(a for a in node.attr if a[:1] != "_")
    return used


def op_problems(proto: saved_model_pb2.SavedModel) -> list[str]:
    """What TF 2.2 would refuse: ops it does not register, attributes its ops do not have."""
    registry, problems = target_registry(), []
    for op, attrs in sorted(used_ops(proto).items()):
        if op not in registry:
            problems.append(f"op {op} is not in TensorFlow {TARGET_TF}")
        elif attrs - registry[op]:
            extra = ", ".join(sorted(attrs - registry[op]))
            problems.append(f"op {op} has attribute(s) {extra} unknown to TensorFlow {TARGET_TF}")
    return problems


def grouped_convolutions(proto: saved_model_pb2.SavedModel) -> list[str]:
    """Conv2D nodes whose filter [kh, kw, c, f] takes fewer input channels c than its input has
    (Keras `Conv2D(groups > 1)`), where the graph records both shapes."""
    found = []
    for function in (f for m in proto.meta_graphs for f in m.graph_def.library.function):
        nodes = {n.name: n for n in function.node_def}
        args = {a.name: i for i, a in enumerate(function.signature.input_arg)}
        for node in (n for n in function.node_def if n.op == "Conv2D"):
            image = _recorded_shape(function, nodes, args, node.input[0])
            kernel = _recorded_shape(function, nodes, args, node.input[1])
            if image and kernel and len(kernel) == 4 and 0 < kernel[2] < image[-1]:
                found.append(f"{function.signature.name}/{node.name}")
    return found


def _recorded_shape(function, nodes: dict, args: dict, ref: str) -> list[int] | None:
    """The `_output_shapes` the graph records for input `ref` (node:output:index or a function
    argument), None where it records none."""
    name, *rest = ref.split(":")
    if name in nodes:
        attr, index = nodes[name].attr, int(rest[-1]) if rest else 0
    elif name in args:
        attr, index = function.arg_attr[args[name]].attr, 0
    else:
        return None
    if "_output_shapes" not in attr or len(attr["_output_shapes"].list.shape) <= index:
        return None
    shape = attr["_output_shapes"].list.shape[index]
    return None if shape.unknown_rank else [d.size for d in shape.dim]


def signature_problems(proto: saved_model_pb2.SavedModel) -> list[str]:
    """Kaggle's call: serving_default(input_image: uint8 [H, W, 3]) -> global_descriptor [D]."""
    signatures = proto.meta_graphs[0].signature_def if proto.meta_graphs else {}
    if SIGNATURE not in signatures:
        return [f"no {SIGNATURE} signature"]
    sig, problems = signatures[SIGNATURE], []
    if list(sig.inputs) != [INPUT]:
        problems.append(f"{SIGNATURE} inputs are {sorted(sig.inputs)}, expected [{INPUT!r}]")
    else:
        spec = sig.inputs[INPUT]
        dims = [d.size for d in spec.tensor_shape.dim]
        if spec.dtype != types_pb2.DT_UINT8 or len(dims) != 3 or dims[2] != 3:
            problems.append(f"{SIGNATURE} {INPUT} must be uint8 [H, W, 3], got "
                            f"{types_pb2.DataType.Name(spec.dtype)} {dims}")
    if OUTPUT not in sig.outputs:
        problems.append(f"{SIGNATURE} outputs are {sorted(sig.outputs)}, expected {OUTPUT!r}")
    else:
        spec = sig.outputs[OUTPUT]
        if spec.dtype != types_pb2.DT_FLOAT or len(spec.tensor_shape.dim) != 1:
            problems.append(f"{SIGNATURE} {OUTPUT} must be float32 [D]")
    return problems


def check(export_dir: str) -> dict[str, Any]:
    """The closing-JSON facts of the contract for the SavedModel at `export_dir`."""
    proto = read_savedmodel(export_dir)
    ops, signature = op_problems(proto), signature_problems(proto)
    grouped = grouped_convolutions(proto)
    if grouped:
        ops.append(f"{len(grouped)} grouped Conv2D (no CPU kernel in TensorFlow {TARGET_TF}), "
                   f"e.g. {grouped[0]}")
    return {"loads_in_tf": TARGET_TF, "tf_problems": ops, "signature_problems": signature,
            "ok": not ops and not signature}
