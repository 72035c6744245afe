"""landmark-tf: Google Landmarks v2 retrieval and recognition on TensorFlow/Keras, TPU first."""

__version__ = "0.1.0"
