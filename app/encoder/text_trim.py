"""Text encoding cut to the batch's longest prompt: for an open_clip ``CLIP`` text tower (causal mask, pooled
at the end-of-text token) the features equal the full 77-token pass at a fraction of the compute."""

from __future__ import annotations

from typing import Any, cast

import torch


def trimmable_text_tower(model: Any) -> bool:
    """An open_clip ``CLIP`` text tower with a causal mask, pooled at the end-of-text token: its output does
    not depend on the padding after that token, so a batch can be cut to its longest prompt."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    return (all(hasattr(model, a) for a in needed) and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "argmax") == "argmax"
            and type(model).encode_text.__qualname__ == "CLIP.encode_text")


def encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``CLIP.encode_text`` over the first L positions only, L = the batch's longest prompt (its end-of-text
    token, the highest id, included). Under the causal mask a position sees only those before it, so the
    pooled features are those of the full 77-token pass; a 10-token class prompt costs ~1/6 of the compute."""
    length = int(tokens.argmax(dim=-1).max().item()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return cast(torch.Tensor, x)
