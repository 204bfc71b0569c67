"""phi_image and phi_text: one transformer encoder layer each over ``[query, n_1 ... n_k]`` (paper Sec. 3.2).

The refined embedding is the layer's output at the query position, L2-normalised. Only that position
is computed: with a single layer the other positions' outputs never reach it, so attending from the
query alone gives exactly the same result as running the full layer, at 1/(k+1) of the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.fusion.config import FusionCfg
from app.schemas import Modality

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100


@dataclass
class FusionOutput:
    embedding: torch.Tensor  # (B, d), L2-normalised
    attention: torch.Tensor  # (B, 1 + k): the query's attention over [itself, n_1..n_k], rows sum to 1


def _sequence(query: torch.Tensor, neighbours: torch.Tensor, drop_query: torch.Tensor | None) -> torch.Tensor:
    if drop_query is not None:  # query dropout: the module must then work from the neighbours alone
        query = torch.where(drop_query[:, None], torch.zeros_like(query), query)
    return torch.cat([query[:, None, :], neighbours], dim=1)


def _valid_mask(neighbours: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, 1 + k) bool; the query position is always valid."""
    batch, k = neighbours.shape[:2]
    nb_valid = torch.ones(batch, k, dtype=torch.bool, device=neighbours.device) if valid is None else valid.bool()
    return torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=neighbours.device), nb_valid], dim=1)


def _masked_mean(seq: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = mask.to(seq.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("bl,bld->bd", weights, seq), weights


class MeanFusion(nn.Module):
    """Baseline of the ablation (paper Tab. 3): average of the query and its neighbours, no parameters."""

    def forward(
        self,
        query: torch.Tensor,
        neighbours: torch.Tensor,
        valid: torch.Tensor | None = None,
        drop_query: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> FusionOutput:
        seq = _sequence(query, neighbours, drop_query)
        mean, weights = _masked_mean(seq, _valid_mask(neighbours, valid))
        return FusionOutput(F.normalize(mean, dim=-1), weights)


class FusionModule(nn.Module):
    """One pre-norm (ViT-style) encoder layer: multi-head self-attention + MLP, output at the query."""

    def __init__(self, cfg: FusionCfg) -> None:
        super().__init__()
        if cfg.dim is None:
            raise ValueError("FusionModule needs cfg.dim (FusionCfg.with_dim)")
        dim = cfg.dim
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = cfg.resolved_mlp_dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.gate = nn.Parameter(torch.zeros(())) if cfg.gated else None
        self.heads = cfg.heads
        # attention bias on neighbour j, per head: score_weight * s_j + score_offset (0 at init: the paper's layer)
        self.score_weight = nn.Parameter(torch.zeros(cfg.heads)) if cfg.score_bias else None
        self.score_offset = nn.Parameter(torch.zeros(cfg.heads)) if cfg.score_bias else None

    def _score_mask(self, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Float attention mask (B * heads, 1, 1 + k): the score bias, -inf on missing neighbours."""
        assert self.score_weight is not None and self.score_offset is not None
        s = torch.where(mask[:, 1:], scores.to(self.score_weight.dtype), torch.zeros_like(scores))
        bias = self.score_weight[None, :, None] * s[:, None, :] + self.score_offset[None, :, None]  # (B, h, k)
        bias = torch.cat([torch.zeros_like(bias[..., :1]), bias], dim=-1)
        bias = bias.masked_fill(~mask[:, None, :], float("-inf"))
        return bias.reshape(-1, 1, bias.shape[-1])

    def forward(
        self,
        query: torch.Tensor,
        neighbours: torch.Tensor,
        valid: torch.Tensor | None = None,
        drop_query: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> FusionOutput:
        seq = _sequence(query, neighbours, drop_query)
        mask = _valid_mask(neighbours, valid)
        x = self.norm_attn(seq)
        if self.score_weight is not None:
            if scores is None:
                raise ValueError("this fusion takes the neighbours' search scores (score_bias); pass scores")
            attended, weights = self.attn(x[:, :1], x, x, attn_mask=self._score_mask(mask, scores),
                                          need_weights=True, average_attn_weights=True)
        else:
            attended, weights = self.attn(
                x[:, :1], x, x, key_padding_mask=~mask, need_weights=True, average_attn_weights=True
            )
        hidden = seq[:, 0] + self.drop(attended[:, 0])
        hidden = hidden + self.drop(self.mlp(self.norm_mlp(hidden)))
        if self.gate is not None:
            mean, _ = _masked_mean(seq, mask)
            hidden = mean + torch.tanh(self.gate) * (hidden - mean)
        return FusionOutput(F.normalize(hidden, dim=-1), weights[:, 0])


def build_fusion_module(cfg: FusionCfg) -> nn.Module:
    return MeanFusion() if cfg.kind == "mean" else FusionModule(cfg)


class RecoFusion(nn.Module):
    """phi_image and phi_text (same architecture, separate weights) and the learned temperature."""

    def __init__(self, cfg: FusionCfg, dim: int) -> None:
        super().__init__()
        self.cfg = cfg.with_dim(dim)
        self.image = build_fusion_module(self.cfg)
        self.text = build_fusion_module(self.cfg)
        self.logit_scale = nn.Parameter(torch.tensor(CLIP_INIT_LOGIT_SCALE))

    @property
    def dim(self) -> int:
        assert self.cfg.dim is not None
        return self.cfg.dim

    def branch(self, modality: Modality) -> nn.Module:
        """phi_image refines image queries, phi_text text queries."""
        return self.image if Modality(modality) is Modality.IMAGE else self.text

    def refine(
        self,
        modality: Modality,
        query: torch.Tensor,
        neighbours: torch.Tensor,
        valid: torch.Tensor | None = None,
        drop_query: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> FusionOutput:
        """``scores``: (B, k) search similarities of the neighbours (used by ``score_bias`` fusions)."""
        out: FusionOutput = self.branch(modality)(query, neighbours, valid, drop_query, scores)
        return out

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
