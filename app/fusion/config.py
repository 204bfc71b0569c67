"""Fusion architectures are data: one JSON per config in ``configs/``, mapped 1:1 onto :class:`FusionCfg`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

CONFIG_DIR = Path(__file__).with_name("configs")

FusionKind = Literal["transformer", "mean"]


@dataclass(frozen=True)
class FusionCfg:
    """One fusion module (phi_image and phi_text each get one, with separate weights)."""

    name: str = "custom"
    kind: FusionKind = "transformer"  # "mean" = the untrained averaging baseline of the ablation
    dim: int | None = None  # taken from the encoder at build time when null
    heads: int = 8
    mlp_dim: int | None = None  # hidden width of the MLP; null = dim (MLP ratio 1 gives the paper's 1.58M at d=512)
    dropout: float = 0.0
    gated: bool = False  # output = mean + tanh(g) * (transformer - mean), g = 0 at init: starts as mean fusion
    # The neighbours' search similarities to the query as an attention bias (per head: w * score + c, both 0 at
    # init), so the fusion can learn to trust close neighbours fully and unrelated ones not at all (issue 16).
    score_bias: bool = False

    def with_dim(self, dim: int) -> FusionCfg:
        if self.dim is not None and self.dim != dim:
            raise ValueError(f"fusion config {self.name!r} is for d={self.dim}, the encoder gives d={dim}")
        if self.kind == "transformer" and dim % self.heads:
            raise ValueError(f"d={dim} is not divisible by {self.heads} heads (fusion config {self.name!r})")
        return replace(self, dim=dim)

    @property
    def resolved_mlp_dim(self) -> int:
        if self.dim is None:
            raise ValueError("fusion config has no dim yet; call with_dim(encoder.dim)")
        return self.mlp_dim or self.dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str | None = None) -> FusionCfg:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fusion config fields: {sorted(unknown)}")
        values = dict(data)
        if name is not None:
            values["name"] = name
        if values.get("kind", "transformer") not in ("transformer", "mean"):
            raise ValueError(f"fusion kind must be 'transformer' or 'mean', not {values['kind']!r}")
        return cls(**values)


def list_fusion_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_fusion_config(name_or_path: str | Path) -> FusionCfg:
    """A config by name (``reco-fusion-b``) or by the path of a JSON file."""
    path = Path(name_or_path)
    if not path.suffix == ".json" or not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"unknown fusion config {name_or_path!r}; known: {list_fusion_configs()}")
    return FusionCfg.from_dict(json.loads(path.read_text()), name=path.stem)
