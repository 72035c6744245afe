"""Thin absl apps, one per stage: flags -> config object -> one library call -> one JSON line."""

import os

# Before any CLI module imports TensorFlow: keep its C++ start-up chatter off the user's screen.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
