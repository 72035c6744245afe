"""Config objects the CLIs build from flags and the library takes; serialised into config.json.

Library code never reads flags: it takes these dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

BACKBONES = tuple(f"efficientnet-b{i}" for i in range(8))
POOLINGS = ("gap", "gem")
HEADS = ("cosface", "arcface", "adacos", "subcenter_arcface", "softmax")


@dataclasses.dataclass
class ModelConfig:
    """Architecture: backbone -> pooling -> Dense(embedding_dim) -> BN -> cosine head.

    `scale=None` means "auto": the fixed AdaCos scale sqrt(2) * ln(C - 1).
    """

    backbone: str = "efficientnet-b0"
    image_size: int = 512
    pooling: str = "gap"
    gem_p: float = 3.0
    embedding_dim: int = 512
    head: str = "cosface"
    scale: float | None = None
    margin: float = 0.15
    subcenters: int = 3
    num_classes: int = 0

    def effective_scale(self) -> float:
        """The logit scale actually used; auto is sqrt(2) * ln(C - 1) (AdaCos fixed scale)."""
        if self.scale is not None:
            return float(self.scale)
        return math.sqrt(2.0) * math.log(max(self.num_classes - 1, 2))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
