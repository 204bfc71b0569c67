"""Miniature reproduction of the paper's tables on a frozen self-trained base model (``reco reproduce``).

``plan`` says what is run (seeds, variants, recipe), ``data`` encodes the datasets once per encoder,
``memory`` builds the generic and generic+domain memories without near-duplicates of the evaluation
images, ``workspace`` gathers them with the evaluation sets, ``runner`` trains (``training``) and
evaluates (``evaluation``) every variant and measures the reasons (``diagnostics``), ``aggregate``
reduces over seeds and ``report`` writes ``docs/reproduction.json``, ``docs/reproduction.md`` and the
plots (``plots``; the sections in ``tables``, ``recipe_sections`` and ``conclusions``, read from the
results through ``readout``).
"""

from programs.reproduce.plan import ReproPlan, Variant, default_variants

__all__ = ["ReproPlan", "Variant", "default_variants"]
