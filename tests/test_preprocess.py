"""resize_for_model: the one resize shared by training, export and embedding."""

import numpy as np
import pytest
import tensorflow as tf

from landmark_tf.errors import UserError
from landmark_tf.preprocess import resize_for_model


def test_uint8_image_becomes_float32_square_in_0_255():
    image = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    out = resize_for_model(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0


def test_batch_and_float_input_match_uint8_path():
    image = np.random.default_rng(1).integers(0, 256, size=(2, 20, 10, 3), dtype=np.uint8)
    out = resize_for_model(image, 8)
    assert out.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(out, resize_for_model(image.astype(np.float32), 8), atol=1e-4)
    np.testing.assert_allclose(out[1], resize_for_model(image[1], 8), atol=1e-4)


def test_same_size_is_identity_and_constant_stays_constant():
    image = np.random.default_rng(2).integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    np.testing.assert_allclose(resize_for_model(image, 12), image.astype(np.float32))
    flat = np.full((7, 40, 3), 255, np.uint8)
    np.testing.assert_allclose(resize_for_model(flat, 9), 255.0)


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="3 channels"):
        resize_for_model(np.zeros((8, 8, 4), np.uint8), 4)
    with pytest.raises(UserError, match=r"\[H, W, 3\]"):
        resize_for_model(np.zeros((8, 8), np.uint8), 4)
    with pytest.raises(UserError, match="positive integer"):
        resize_for_model(np.zeros((8, 8, 3), np.uint8), 0)
