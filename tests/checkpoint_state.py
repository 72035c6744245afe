"""Reading a workdir's latest checkpoint (modeling/checkpoint's format) as plain arrays, for
tests that compare runs: {"<part>/<h5 dataset path>": array, "seed_states/<i>": array}."""

from __future__ import annotations

import glob
import json
import os
import re

import h5py
import numpy as np


def latest_dir(workdir: str) -> str | None:
    found = []
    for path in glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*")):
        match = re.search(r"ckpt-(\d+)$", path)
        if match and os.path.exists(os.path.join(path, "state.json")):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def latest_step(workdir: str) -> int:
    path = latest_dir(workdir)
    return int(path.rsplit("-", 1)[1]) if path else 0


def read(path: str) -> dict[str, np.ndarray]:
    """Every array of the checkpoint folder `path` (weights, optimizer, seed states, step)."""
    out = {}
    for file in sorted(glob.glob(os.path.join(path, "*.weights.h5"))):
        part = os.path.basename(file).split(".")[0]
        with h5py.File(file, "r") as f:
            f.visititems(lambda name, obj, part=part: out.__setitem__(
                f"{part}/{name}", np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    for i, value in enumerate(state["seed_states"]):
        out[f"seed_states/{i}"] = np.asarray(value)
    out["step"] = np.asarray(state["step"])
    return out


def read_latest(workdir: str) -> dict[str, np.ndarray]:
    return read(latest_dir(workdir))
