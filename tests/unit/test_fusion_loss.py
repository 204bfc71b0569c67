"""Symmetric InfoNCE and the RECO objective NCE(V̄,T̄) + NCE(V̄,T) + NCE(V,T̄)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from app.fusion.loss import info_nce, reco_loss


def _emb(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_matches_the_formula() -> None:
    v, t, scale = _emb(6, 8, 0), _emb(6, 8, 1), torch.tensor(10.0)
    logits = (scale * v @ t.T).double()
    i2t = -torch.log_softmax(logits, dim=1).diagonal().mean()
    t2i = -torch.log_softmax(logits, dim=0).diagonal().mean()
    assert float(info_nce(v, t, scale)) == pytest.approx(float((i2t + t2i) / 2), rel=1e-5)


def test_info_nce_is_symmetric_and_small_for_aligned_pairs() -> None:
    v, t = _emb(16, 32, 0), _emb(16, 32, 1)
    scale = torch.tensor(20.0)
    assert float(info_nce(v, t, scale)) == pytest.approx(float(info_nce(t, v, scale)), rel=1e-6)
    assert float(info_nce(v, v, scale)) < 0.05 < math.log(16) * 0.5 < float(info_nce(v, t, scale))


def test_reco_loss_is_the_sum_of_the_three_terms() -> None:
    v, t, vb, tb = (_emb(8, 16, s) for s in range(4))
    scale = torch.tensor(14.3)
    total, parts = reco_loss(v, t, vb, tb, scale)
    want = info_nce(vb, tb, scale) + info_nce(vb, t, scale) + info_nce(v, tb, scale)
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    assert sum(parts.values()) == pytest.approx(float(total), rel=1e-5)
    assert set(parts) == {"nce_vbar_tbar", "nce_vbar_t", "nce_v_tbar"}


def test_gradient_reaches_the_temperature() -> None:
    scale = torch.tensor(2.0, requires_grad=True)
    total, _ = reco_loss(*(_emb(8, 16, s) for s in range(4)), scale)
    total.backward()
    assert scale.grad is not None and scale.grad != 0
