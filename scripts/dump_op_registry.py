"""Writes the op registry of the TensorFlow that runs this script, for the export check.

Run once with the TensorFlow that a submission must load in (Kaggle GLR2020: TF 2.2):

  python3.8 -m venv /tmp/tf22 && /tmp/tf22/bin/pip install tensorflow-cpu==2.2.0 \
      "numpy<1.19" "h5py<2.11" "protobuf<3.21"
  /tmp/tf22/bin/python scripts/dump_op_registry.py landmark_tf/serving/tf2.2_ops.json

The output maps every registered op to its attribute names: an op a SavedModel uses that is not
listed fails to load there ("Op type not registered"), and so does an attribute the op did not
have yet. Only TensorFlow and the standard library are imported (any TF 2.x, Python 3.6+).
"""

import json
import sys

import tensorflow as tf
from tensorflow.core.framework import op_def_pb2
from tensorflow.python.client import pywrap_tf_session


def registry() -> dict:
    buffer = pywrap_tf_session.TF_GetAllOpList()
    ops = op_def_pb2.OpList()
    ops.ParseFromString(pywrap_tf_session.TF_GetBuffer(buffer))
    return {op.name: sorted(a.name for a in op.attr) for op in ops.op}


if __name__ == "__main__":
    ops = registry()
    lines = ",\n".join(f"{json.dumps(name)}: {json.dumps(attrs)}"
                        for name, attrs in sorted(ops.items()))
    with open(sys.argv[1], "w") as f:  # one op per line, so a regenerated file diffs readably
        f.write(f'{{"tensorflow": {json.dumps(tf.__version__)}, "ops": {{\n{lines}\n}}}}\n')
    print(json.dumps({"tensorflow": tf.__version__, "ops": len(ops), "path": sys.argv[1]}))
