"""phi_image / phi_text: the paper's size, attention over [query, neighbours], L2 output, separate weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from app.fusion.config import FusionCfg, get_fusion_config, list_fusion_configs
from app.fusion.model import CLIP_INIT_LOGIT_SCALE, FusionModule, MeanFusion, RecoFusion, count_parameters
from app.schemas import Modality

PAPER_BOTH_MODULES = 3.16e6  # paper Sec. 3.2, CLIP-B/32 (d = 512)


def test_default_config_has_the_papers_parameter_count_at_d512() -> None:
    model = RecoFusion(get_fusion_config("reco-fusion-b"), 512)
    per_module = count_parameters(model.image)
    assert per_module == count_parameters(model.text)
    assert abs(per_module - PAPER_BOTH_MODULES / 2) / (PAPER_BOTH_MODULES / 2) < 0.01
    assert abs(count_parameters(model) - PAPER_BOTH_MODULES) / PAPER_BOTH_MODULES < 0.01


def test_configs_load_and_take_dim_from_the_encoder() -> None:
    assert {"reco-fusion-b", "reco-fusion-mean"} <= set(list_fusion_configs())
    cfg = get_fusion_config("reco-fusion-b")
    assert cfg.dim is None and cfg.with_dim(64).dim == 64 and cfg.with_dim(64).resolved_mlp_dim == 64
    with pytest.raises(ValueError):
        cfg.with_dim(60)  # 8 heads do not divide 60
    with pytest.raises(ValueError):
        get_fusion_config("no-such-config")
    with pytest.raises(ValueError):
        FusionCfg.from_dict({"kind": "transformer", "layers": 3})


def _batch(b: int = 4, k: int = 5, d: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(b, k, dtype=torch.bool)
    valid[0, 2:] = False
    return F.normalize(torch.randn(b, d, generator=g), dim=-1), torch.randn(b, k, d, generator=g), valid


def test_output_is_l2_normalised_and_attention_sums_to_one_over_valid_positions() -> None:
    model = RecoFusion(FusionCfg(heads=4), 32)
    q, nb, valid = _batch()
    for modality in Modality:
        out = model.refine(modality, q, nb, valid)
        torch.testing.assert_close(out.embedding.norm(dim=-1), torch.ones(4))
        assert out.attention.shape == (4, 6)
        torch.testing.assert_close(out.attention.sum(dim=-1), torch.ones(4))
        assert (out.attention[0, 3:] == 0).all()  # missing neighbours get no attention


def test_query_position_output_equals_running_the_full_layer() -> None:
    torch.manual_seed(0)
    module = FusionModule(FusionCfg(heads=4, dim=32)).eval()
    q, nb, _ = _batch()
    seq = torch.cat([q[:, None], nb], dim=1)
    x = module.norm_attn(seq)
    full, _ = module.attn(x, x, x, need_weights=False)  # every position attends: the textbook layer
    hidden = seq + full
    hidden = hidden + module.mlp(module.norm_mlp(hidden))
    torch.testing.assert_close(module(q, nb).embedding, F.normalize(hidden[:, 0], dim=-1))


def test_image_and_text_modules_have_separate_weights() -> None:
    model = RecoFusion(FusionCfg(heads=4), 32)
    image_params = {p.data_ptr() for p in model.image.parameters()}
    assert image_params.isdisjoint({p.data_ptr() for p in model.text.parameters()})
    q, nb, valid = _batch()
    before = model.refine(Modality.TEXT, q, nb, valid).embedding.detach().clone()
    with torch.no_grad():
        for p in model.image.parameters():
            p.add_(1.0)
    torch.testing.assert_close(model.refine(Modality.TEXT, q, nb, valid).embedding, before)
    assert not torch.allclose(model.refine(Modality.IMAGE, q, nb, valid).embedding, before)


def test_temperature_starts_at_clip_init() -> None:
    model = RecoFusion(get_fusion_config("reco-fusion-b"), 64)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    assert CLIP_INIT_LOGIT_SCALE == pytest.approx(math.log(1 / 0.07))
    assert model.temperature == pytest.approx(0.07)


def test_mean_fusion_averages_query_and_valid_neighbours() -> None:
    q, nb, valid = _batch()
    out = MeanFusion()(q, nb, valid)
    want0 = F.normalize((q[0] + nb[0, 0] + nb[0, 1]) / 3, dim=-1)
    torch.testing.assert_close(out.embedding[0], want0)
    torch.testing.assert_close(out.attention[0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0, 0, 0]))
    assert count_parameters(RecoFusion(get_fusion_config("reco-fusion-mean"), 32)) == 1  # the temperature


def test_gated_fusion_starts_exactly_at_mean_fusion() -> None:
    q, nb, valid = _batch()
    gated = FusionModule(FusionCfg(heads=4, dim=32, gated=True))
    torch.testing.assert_close(gated(q, nb, valid).embedding, MeanFusion()(q, nb, valid).embedding)


def test_query_dropout_hides_the_query() -> None:
    module = FusionModule(FusionCfg(heads=4, dim=32)).eval()
    q, nb, valid = _batch()
    drop = torch.tensor([True, False, False, False])
    dropped = module(q, nb, valid, drop_query=drop).embedding
    torch.testing.assert_close(dropped[0], module(torch.zeros_like(q), nb, valid).embedding[0])
    torch.testing.assert_close(dropped[1:], module(q, nb, valid).embedding[1:])
