"""The paper's fusion training recipe (Sec. 4): the one source of every fusion training default.

``Settings.train_*`` and ``Settings.k_train`` (``RECO_TRAIN_*`` overrides), :class:`~app.fusion.train.TrainOptions`
and the programs built on them (``reco reproduce``, ``reco bench train``) take their defaults from
:data:`PAPER_RECIPE`; a program that departs from it (a shorter schedule for a time budget) says so where it
does. Plain data, no torch: :mod:`app.config` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainRecipe:
    """AdamW with a cosine learning rate after a linear warm-up; the temperature is learned (CLIP's init)."""

    k: int = 10  # neighbours per training query
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-5
    batch_size: int = 4096
    epochs: int = 10
    warmup_steps: int = 50
    seed: int = 0


PAPER_RECIPE = TrainRecipe()
