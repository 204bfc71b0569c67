"""What ``reco reproduce`` runs: the recipe, the seeds, and the named variants (each one switch off the paper's).

A :class:`Variant` is one trained fusion (or an untrained baseline) with the options that differ from the
paper recipe. ``paper`` is the default recipe and is run with every main seed; each other variant is run
with the ablation seeds and compared with ``paper`` on the same seeds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.fusion.recipe import PAPER_RECIPE

ZERO_SHOT_SETS = ("cub100", "flowers12", "imagenette", "cifar10")
DOMAIN_SETS = ("cub100", "flowers12", "imagenette")  # their captioned train rows form the domain memory
DOMAIN_HINTS = {"cub100": "bird", "flowers12": "flower"}
GENERIC = "generic"
GENERIC_DOMAIN = "generic+domain"
MISMATCHED = "mismatched"  # each domain set with generic + the *other* domains' pairs (its own classes absent)
MEMORIES = (GENERIC, GENERIC_DOMAIN)
ALL_MEMORIES = (GENERIC, GENERIC_DOMAIN, MISMATCHED)
PAPER = "paper"

VariantKind = Literal["trained", "mean", "knn"]


class Variant(BaseModel):
    """One row group of the report: a trained fusion, the mean-fusion baseline, or the kNN vote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    group: str  # table it belongs to: main, ablation, k, options, exclusion
    description: str
    kind: VariantKind = "trained"
    search: Literal["uni", "cross"] = "uni"
    fusion: Literal["uni", "cross"] = "cross"
    dedupe_by_image: bool = True
    query_dropout: float = 0.0
    gated_init: bool = False
    self_exclusion: Literal["pair", "image", "near-duplicates"] = "image"
    k: int = PAPER_RECIPE.k
    k_infer: tuple[int, ...] = ()  # extra k' evaluated besides k (k' > k, paper Fig. 3 right)
    extra_pairs: tuple[str, ...] = ()  # datasets whose train rows join the training pairs and training memory
    train_pairs: Literal["flickr8k-train", "flickr8k-val-half"] = "flickr8k-train"  # val-half: unseen by the base
    caption_like_prompts: bool = False  # class prompts: the ensemble plus templates worded like memory captions
    reuse: str | None = None  # evaluation-only variant: the fusion of this variant, evaluated differently
    # issue 16 levers
    augmented_queries: bool = False  # image queries: the base's embeddings of strongly augmented training views
    score_bias: bool = False  # neighbours' search similarities as an attention bias
    fallback: bool = False  # keep CLIP when the top neighbour is below a threshold chosen on validation
    mean_mix: bool = False  # blend mean fusion into the output (weight per query modality chosen on validation)
    candidate: bool = True  # may be chosen as the project's default recipe (trained variants only)

    def train_key(self) -> str:
        """Variants with the same key share one trained fusion."""
        return self.reuse or self.name


def _levers(name: str, description: str, **levers: Any) -> list[Variant]:
    """A trained lever combination; the same fusion with the validation-chosen fallback toward CLIP; and with the
    blend toward mean fusion (weights per task chosen on validation) before that fallback."""
    return [Variant(name=name, group="levers", description=description, **levers),
            Variant(name=f"{name}+fallback", group="levers", reuse=name, fallback=True,
                    description=f"{name}, CLIP kept where the top neighbour is below a validation threshold"),
            Variant(name=f"{name}+mix+fallback", group="levers", reuse=name, fallback=True, mean_mix=True,
                    description=f"{name}, blended with mean fusion (weights per task and query modality chosen on "
                                "validation), then the fallback")]


def default_variants() -> list[Variant]:
    """What a plain ``reco reproduce`` runs (fits the time budget): the paper recipe, the training-free
    baselines, the search x fusion ablation and the issue-16 levers, each with and without."""
    return [
        Variant(name=PAPER, group="main", description="paper recipe: uni-modal search, cross-modal fusion, k=10"),
        Variant(name="paper+fallback", group="levers", reuse=PAPER, fallback=True,
                description="paper recipe, CLIP kept where the top neighbour is below a validation threshold"),
        Variant(name="paper+mix+fallback", group="levers", reuse=PAPER, fallback=True, mean_mix=True,
                description="paper recipe blended with mean fusion (weights chosen on validation), then the fallback"),
        Variant(name="mean-fusion", group="ablation", kind="mean", candidate=False,
                description="mean of the query and its neighbours (no training)"),
        Variant(name="knn-vote", group="ablation", kind="knn", candidate=False,
                description="majority vote of the neighbours' captions over the class prompts (image side)"),
        Variant(name="search-cross/fusion-cross", group="ablation", search="cross", fusion="cross", candidate=False,
                description="cross-modal search, cross-modal fusion"),
        Variant(name="search-uni/fusion-uni", group="ablation", search="uni", fusion="uni", candidate=False,
                description="uni-modal search, uni-modal fusion"),
        Variant(name="search-cross/fusion-uni", group="ablation", search="cross", fusion="uni", candidate=False,
                description="cross-modal search, uni-modal fusion"),
        *_levers("aug", "image queries from strongly augmented views (memory keeps clean embeddings)",
                 augmented_queries=True),
        *_levers("score-bias", "neighbours' search similarities as an attention bias", score_bias=True),
        *_levers("gated+query-dropout", "initialised at mean fusion (learned gate) + query dropout 0.5",
                 gated_init=True, query_dropout=0.5),
        *_levers("gated+query-dropout+exclude-pair", "gate at mean fusion + query dropout; training excludes only "
                 "the query's own pair, so its image's other captions stay as close neighbours it learns to trust",
                 gated_init=True, query_dropout=0.5, self_exclusion="pair"),
        *_levers("gated+query-dropout+clothing10-pairs", "gate at mean fusion + query dropout; class-captioned pairs "
                 "(clothing10 train, never evaluated) join the training pairs and training memory",
                 gated_init=True, query_dropout=0.5, extra_pairs=("clothing10",)),
    ]


def extended_variants() -> list[Variant]:
    """Issue 5's variants (k, dedupe, exclusion, extra pairs): run by naming them with ``--variants``."""
    return [
        *_levers("all-levers", "augmented queries + similarity bias + gate at mean fusion + query dropout",
                 augmented_queries=True, score_bias=True, gated_init=True, query_dropout=0.5),
        *_levers("aug+score-bias", "augmented queries + similarity bias", augmented_queries=True, score_bias=True),
        *_levers("aug+gated+query-dropout", "augmented queries + gate at mean fusion + query dropout",
                 augmented_queries=True, gated_init=True, query_dropout=0.5),
        Variant(name="k=1", group="k", k=1, k_infer=(10,), description="trained with k=1", candidate=False),
        Variant(name="k=5", group="k", k=5, k_infer=(10,), description="trained with k=5", candidate=False),
        Variant(name="k=20", group="k", k=20, k_infer=(30,), description="trained with k=20", candidate=False),
        Variant(name="no-dedupe", group="options", dedupe_by_image=False,
                description="neighbours NOT deduplicated by image (k rows may be one image's five captions)"),
        Variant(name="query-dropout", group="options", query_dropout=0.5,
                description="query hidden from the fusion for half of the training queries"),
        Variant(name="gated", group="options", gated_init=True,
                description="fusion initialised at mean fusion (learned gate, 0 at start)"),
        Variant(name="clothing10-pairs", group="options", extra_pairs=("clothing10",),
                description="class-captioned generic pairs (clothing10 train, never evaluated) added to training"),
        Variant(name="unseen-pairs", group="options", train_pairs="flickr8k-val-half",
                description="fusion trained on Flickr8k pairs the base never saw (half of val; the other half "
                            "tunes), same number of steps"),
        Variant(name="caption-like-prompts", group="options", reuse="paper", caption_like_prompts=True,
                description="paper fusion; class prompts include templates worded like the memory captions"),
        Variant(name="exclude-pair", group="exclusion", self_exclusion="pair",
                description="training self-exclusion: the query's own pair only (its image's other captions stay)"),
        Variant(name="exclude-near-duplicates", group="exclusion", self_exclusion="near-duplicates",
                description="training self-exclusion: own image and its near-duplicates (calibrated threshold)"),
    ]


class ReproPlan(BaseModel):
    """The recipe of one ``reco reproduce`` run (paper values where the scale allows)."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Seeds of the main table.")
    ablation_seeds: list[int] = Field(default_factory=lambda: [0], description="Seeds of every other variant.")
    variants: list[Variant] = Field(default_factory=default_variants)
    # The paper recipe (PAPER_RECIPE) where the scale allows; shorter where the time budget or the data size asks.
    epochs: int = 5  # paper: 10; 5 keeps ~15 fusions within the 35-minute budget on 2 cores
    batch_size: int = 1024  # paper: 4096 on 27M pairs; 30k pairs would give 7 steps an epoch
    lr: float = PAPER_RECIPE.lr
    weight_decay: float = PAPER_RECIPE.weight_decay
    warmup_steps: int = 20  # paper: 50 of many more steps; ~150 steps here
    validation_every: int = 5  # 1 in N domain train images (sha1 of the name) held out for validation
    near_duplicate_percentile: float = 99.5
    dhash_distance: int = 4
    limit: int | None = None  # images per split and dataset (smoke runs)
    threads: int | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> ReproPlan:
        """A few minutes: small subsets, one seed, few epochs; every variant still runs once."""
        values: dict[str, Any] = {"seeds": [0], "ablation_seeds": [0], "epochs": 2, "batch_size": 256,
                                  "warmup_steps": 5, "limit": 300}
        values.update(overrides)
        return cls(**values)

    augmented_views: int = 1  # strongly augmented views per Flickr8k train image (lever a)
    default_seeds_for: list[str] = Field(default_factory=list, description="Variants run with every main seed "
                                         "besides the paper recipe (the runner adds the chosen default).")

    def seeds_of(self, variant: Variant) -> list[int]:
        if variant.name == PAPER or variant.name in self.default_seeds_for or (
                variant.reuse is not None and variant.reuse in (PAPER, *self.default_seeds_for)):
            return sorted(set(self.seeds) | set(self.ablation_seeds))
        return list(self.ablation_seeds)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)
