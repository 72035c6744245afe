"""--backend=auto: which Keras backend a run gets, and one-line errors when it cannot."""

import pytest

from landmark_tf.errors import UserError
from landmark_tf.training import backend


def test_auto_backend_follows_a_named_tf_strategy_and_says_when_jax_is_missing(monkeypatch):
    assert backend.resolve("auto", "nonexistent", "tpu") == "tensorflow"
    monkeypatch.setattr(backend, "_tf_tpu_resolves", lambda tpu: False)
    monkeypatch.setattr(backend, "_jax_installed", lambda: False)
    with pytest.raises(UserError, match="JAX is not installed"):
        backend.resolve("auto", "nonexistent")
    with pytest.raises(UserError, match="JAX is not installed"):
        backend.select("jax")
