"""Shared test settings: quiet TensorFlow, CPU only, and one thread pool per test process."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
