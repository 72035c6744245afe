"""Thin absl apps, one per stage: flags -> config object -> one library call -> one JSON line."""
