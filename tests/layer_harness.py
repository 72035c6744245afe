"""Shared Keras layer test harness (in the spirit of keras-hub's TestCase.run_layer_test).

One call checks what every custom layer must do: build and call on concrete inputs, return the
expected shape and dtype, round-trip get_config/from_config, serialize/deserialize through JSON,
and save/load inside a `.keras` model with identical outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np


def run_layer_test(
    layer_cls: type,
    init_kwargs: dict[str, Any],
    inputs: Sequence[np.ndarray],
    tmp_dir: str | os.PathLike,
    *,
    expected_output_shape: tuple[int, ...],
    expected_output_dtype: str = "float32",
    expected_num_trainable_weights: int | None = None,
    expected_num_non_trainable_weights: int | None = None,
) -> keras.layers.Layer:
    """Runs all checks; `inputs` are the layer's positional tensor arguments. Returns the layer."""
    layer = layer_cls(**init_kwargs)
    output = layer(*inputs)
    assert tuple(output.shape) == tuple(expected_output_shape)
    assert keras.backend.standardize_dtype(output.dtype) == expected_output_dtype
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights
    if expected_num_non_trainable_weights is not None:
        assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights
    _check_config_round_trip(layer)
    _check_serialization(layer)
    _check_saved_model_file(layer_cls, init_kwargs, inputs, tmp_dir)
    return layer


def _as_stored(config: dict) -> dict:
    """A config as a .keras file stores it (JSON: tuples become lists), e.g. the nested model of
    a wrapper layer, whose input shapes are tuples before and lists after the round trip."""
    return json.loads(json.dumps(config))


def _check_config_round_trip(layer: keras.layers.Layer) -> None:
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert _as_stored(clone.get_config()) == _as_stored(config)


def _check_serialization(layer: keras.layers.Layer) -> None:
    serialized = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(restored) is type(layer)
    assert _as_stored(restored.get_config()) == _as_stored(layer.get_config())


def _check_saved_model_file(layer_cls, init_kwargs, inputs, tmp_dir) -> None:
    symbolic = [
        keras.Input(shape=np.shape(x)[1:], dtype=keras.backend.standardize_dtype(x.dtype))
        for x in inputs
    ]
    model = keras.Model(symbolic, layer_cls(**init_kwargs)(*symbolic))
    path = os.path.join(tmp_dir, f"{layer_cls.__name__}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert any(type(la) is layer_cls for la in loaded.layers)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(list(inputs))),
        keras.ops.convert_to_numpy(model(list(inputs))),
        rtol=1e-6,
        atol=1e-6,
    )
