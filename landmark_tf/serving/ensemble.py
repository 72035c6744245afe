"""landmark-ensemble's library: several of our SavedModels -> one SavedModel, same signatures.

descriptor = l2n(concat_i(w_i * l2n(d_i))), d_i the member's own descriptor (each member keeps
its own image size, scales and embedding dim). The GLR2020 winner used B7 1.0, B6 0.8, B5 0.5.
The members are loaded with `tf.saved_model.load` and wrapped, so the result needs only TF.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from landmark_tf.data import provenance
from landmark_tf.errors import UserError
from landmark_tf.serving import export, signatures


@dataclasses.dataclass
class EnsembleConfig:
    """`weights=None` gives every member weight 1."""

    models: Sequence[str]
    export_dir: str
    weights: Sequence[float] | None = None
    overwrite: bool = False


def check_weights(models: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    """One finite, positive weight per model (default 1 each); UserError otherwise."""
    if not models:
        raise UserError("--models: give at least one export folder")
    if weights is None or len(weights) == 0:
        return [1.0] * len(models)
    if len(weights) != len(models):
        raise UserError(
            f"--weights has {len(weights)} values but --models has {len(models)}: "
            "give one weight per model"
        )
    for model, w in zip(models, weights, strict=True):
        if not (math.isfinite(w) and w > 0):
            raise UserError(f"--weights: weight {w} for {model} must be a positive number")
    return [float(w) for w in weights]


def build_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Writes the ensemble SavedModel + metadata.json; returns the closing-JSON facts."""
    weights = check_weights(cfg.models, cfg.weights)
    export.check_target(cfg.export_dir, cfg.overwrite)
    metas = [export.read_metadata(m, "--models") for m in cfg.models]
    branches = [
        signatures.SavedModelBranch(_load_member(path), name=f"member_{i}")
        for i, path in enumerate(cfg.models)
    ]
    module = signatures.DescriptorModule(branches, weights)
    members = [
        {"path": path, "weight": w, **{k: v for k, v in meta.items() if k != "signatures"}}
        for path, w, meta in zip(cfg.models, weights, metas, strict=True)
    ]
    metadata = {
        "format": export.FORMAT,
        "kind": "ensemble",
        "embedding_dim": sum(int(m["embedding_dim"]) for m in metas),
        "weights": weights,
        "members": members,
        "signatures": list(signatures.SIGNATURES),
        provenance.KEY: provenance.combine([m.get(provenance.KEY) for m in metas]),
    }
    size = export.write_savedmodel(module, cfg.export_dir, metadata, cfg.overwrite)
    return {**export.summary(cfg.export_dir, metadata, size), "members": len(members)}


def _load_member(path: str):
    loaded = signatures.load_quietly(path)
    missing = [s for s in signatures.SIGNATURES if s not in loaded.signatures]
    if missing:
        raise UserError(f"--models {path}: SavedModel lacks signature(s) {missing}")
    return loaded
