"""``reco reproduce``: aggregation, mode choice on validation, near-duplicate rules, training options, report schema.

Everything runs on synthetic embeddings (no encoder), so the whole plan takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.evaluation.near_duplicates import dhash
from app.evaluation.report import METRICS
from app.fusion.train import TrainingPairs, exclusion_lists, precompute_neighbours
from app.memory.exact import ExactIndex
from app.retrieval import RetrievalCfg
from app.schemas import Modality
from app.zeroshot import caption_like_set, resolve_templates
from programs.reproduce.aggregate import aggregate, choose_modes, with_best_rows
from programs.reproduce.data import EncodedSet, held_out
from programs.reproduce.evaluation import knn_vote_logits
from programs.reproduce.memory import EvalImages, MemoryRows, clean_memory
from programs.reproduce.plan import ALL_MEMORIES, ReproPlan, default_variants, extended_variants
from programs.reproduce.report import REQUIRED_KEYS, build_results, render_from_json, write_report
from programs.reproduce.runner import run_plan
from programs.reproduce.training import train_variant
from programs.reproduce.workspace import NeighbourCache, prepare

DIM = 32


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one thread avoids OpenMP spinning against other work on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# --- aggregation ------------------------------------------------------------------------------------
def _row(value: float, seed: int, mode: str = "text", split: str = "test", dataset: str = "cub100",
         variant: str = "paper") -> dict[str, object]:
    return {"dataset": dataset, "task": "zeroshot", "metric": "top1", "mode": mode, "memory": "generic+domain",
            "variant": variant, "split": split, "k": 10, "k_infer": 10, "value": value, "seed": seed}


def test_aggregate_gives_mean_and_sample_std_over_seeds() -> None:
    rows = [_row(0.1, 0), _row(0.2, 1), _row(0.6, 2)]
    (out,) = aggregate(rows)
    assert out["value"] == pytest.approx(0.3)
    assert out["std"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert out["seeds"] == [0, 1, 2] and out["per_seed"] == {"0": 0.1, "1": 0.2, "2": 0.6}
    (single,) = aggregate([_row(0.4, 5)])
    assert single["std"] == 0.0 and single["seeds"] == [5]


def test_aggregate_refuses_a_seed_twice() -> None:
    with pytest.raises(ValueError, match="duplicate seeds"):
        aggregate([_row(0.1, 0), _row(0.2, 0)])


def test_best_mode_is_chosen_on_validation_not_on_test() -> None:
    # validation prefers "both"; test would prefer "text": best must report both's test value
    rows = [_row(0.30, 0, "text", "val"), _row(0.50, 0, "both", "val"),
            _row(0.90, 0, "text", "test"), _row(0.40, 0, "both", "test")]
    assert choose_modes(rows)[("paper", "generic+domain", 10, 10, 0)]["zeroshot"] == "both"
    best = [r for r in aggregate(with_best_rows(rows)) if r["mode"] == "best"]
    assert len(best) == 1 and best[0]["value"] == pytest.approx(0.40) and best[0]["chosen_modes"] == ["both"]


# --- near-duplicates -----------------------------------------------------------------------------------
def test_dhash_survives_resizing_and_separates_different_images() -> None:
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((64, 64))
    b = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    smooth = Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))).convert("RGB")
    assert bin(dhash(smooth) ^ dhash(smooth.resize((40, 40)))).count("1") <= 2
    assert bin(dhash(a) ^ dhash(b)).count("1") > 10


def test_clean_memory_counts_each_rule_and_drops_every_caption_of_a_removed_image() -> None:
    rng = np.random.default_rng(1)
    eval_emb = _unit(rng.standard_normal((3, DIM)))
    memory_images = _unit(rng.standard_normal((6, DIM)))
    memory_images[2] = _unit(eval_emb[2] + 0.01 * rng.standard_normal(DIM))  # an embedding near-copy
    hashes = [f"m{i}" for i in range(6)]
    hashes[0] = "e0"  # the same file as evaluation image 0
    dh = np.asarray([0x5555_0000_0000_0000 >> (8 * i) for i in range(6)], np.uint64)  # pairwise far apart
    far = 0xFFFF_FFFF_FFFF_FFFF
    eval_dh = np.asarray([far, int(dh[1]) ^ 0b11, far], np.uint64)  # memory image 1: 2 bits from eval image 1
    owner = np.repeat(np.arange(6), 2)  # two captions per image
    rows = MemoryRows([f"r{i}" for i in range(12)], memory_images[owner], _unit(rng.standard_normal((12, DIM))),
                      [hashes[i] for i in owner], dh[owner])
    evaluation = EvalImages(eval_emb, ["e0", "e1", "e2"], eval_dh)
    cleaned = clean_memory("generic", rows, evaluation, threshold=0.9, dhash_distance=4)
    c = cleaned.counts
    assert (c["by_content_hash"], c["by_perceptual_hash"], c["by_embedding"]) == (2, 2, 2)
    assert c["removed_rows"] == 6 and c["rows_after"] == 6 and c["images_after"] == 3
    assert set(cleaned.index.image_hashes) == {"m3", "m4", "m5"}
    assert len(cleaned.dhashes) == len(cleaned.index)
    # without the perceptual rule (distance 1), image 1 stays
    assert clean_memory("g", rows, evaluation, threshold=0.9, dhash_distance=1).counts["by_perceptual_hash"] == 0


# --- training self-exclusion -----------------------------------------------------------------------------
def _five_caption_memory(rng: np.random.Generator) -> tuple[ExactIndex, TrainingPairs]:
    n_images = 30
    images = _unit(rng.standard_normal((n_images, DIM)))
    images[1] = _unit(images[0] + 0.02 * rng.standard_normal(DIM))  # image 1 is a near-copy of image 0
    owner = np.repeat(np.arange(n_images), 5)
    texts = _unit(images[owner] + 0.05 * rng.standard_normal((len(owner), DIM)))  # captions near their image
    ids = [f"r{i}" for i in range(len(owner))]
    hashes = [f"h{i}" for i in owner]
    index = ExactIndex(ids, images[owner], texts, hashes)
    return index, TrainingPairs(images[owner], texts, ids=ids, image_hashes=hashes)


def test_self_exclusion_policies_exclude_pair_image_or_near_duplicates() -> None:
    index, pairs = _five_caption_memory(np.random.default_rng(2))
    hashes = np.asarray(index.image_hashes)
    own = np.asarray(pairs.image_hashes)
    leaks = {}
    for policy in ("pair", "image", "near-duplicates"):
        _, text_nb = precompute_neighbours(index, pairs, 4, RetrievalCfg(), self_exclusion=policy,
                                           near_duplicate_threshold=0.95)
        leaks[policy] = float((hashes[text_nb.rows] == own[:, None]).any(axis=1).mean())
        assert not (text_nb.rows == np.arange(len(own))[:, None]).any()  # never the query's own pair
    assert leaks["pair"] > 0.9 and leaks["image"] == 0.0 and leaks["near-duplicates"] == 0.0
    _, near = exclusion_lists(index, pairs, "near-duplicates", 0.95)
    assert near is not None and "h1" in near[0] and "h0" in near[5]  # the near-copy goes both ways
    with pytest.raises(ValueError):
        exclusion_lists(index, pairs, "near-duplicates", None)
    with pytest.raises(ValueError):
        exclusion_lists(index, pairs, "nothing")


# --- prompts ---------------------------------------------------------------------------------------------
def test_caption_like_templates_join_the_ensemble() -> None:
    assert caption_like_set("bird") == "caption-like-bird" and caption_like_set(None) == "caption-like"
    assert caption_like_set("car") == "caption-like"
    joined = resolve_templates("clip-short+caption-like-bird")
    assert joined[: len(resolve_templates("clip-short"))] == resolve_templates("clip-short")
    assert "a photo of a {c}, a type of bird." in joined
    with pytest.raises(ValueError):
        resolve_templates("clip-short+no-such-set")


# --- a synthetic world for the whole plan ------------------------------------------------------------------
def _encoded(name: str, rng: np.random.Generator, centres: np.ndarray, splits: dict[str, int],
             captioned: tuple[str, ...], generic: bool = False) -> EncodedSet:
    """Images cluster by class; captioned rows' text sits at the class centre (a caption naming the class)."""
    files, split, label, emb = [], [], [], []
    for s, n in splits.items():
        for i in range(n):
            c = int(rng.integers(len(centres)))
            files.append(f"images/{name}_{s}_{i}.jpg")
            split.append(s)
            label.append(-1 if generic else c)
            emb.append(centres[c] + 0.1 * rng.standard_normal(DIM))
    image_emb = _unit(np.asarray(emb))
    per_image = 5 if generic else 1
    owner = [i for i, s in enumerate(split) if s in captioned for _ in range(per_image)]
    text = _unit(image_emb[owner] + 0.3 * rng.standard_normal((len(owner), DIM))) if generic else \
        _unit(centres[[label[i] for i in owner]] + 0.1 * rng.standard_normal((len(owner), DIM)))
    sha = [f"{name}-{i}" for i in range(len(files))]
    return EncodedSet(name, files, image_emb, sha, rng.integers(0, 2**63, len(files)).astype(np.uint64),
                      np.asarray(split, dtype=str), np.asarray(label, np.int64),
                      [f"caption {i}" for i in range(len(owner))], text.reshape(len(owner), DIM),
                      np.asarray(owner, np.int64), None if generic else [f"class{c}" for c in range(len(centres))])


class FakeTextEncoder:
    """Class prompts land at their class centre, so CLIP is good and every mode is defined."""

    encoder_id = "fake/test"
    dim = DIM

    def __init__(self, centres: dict[str, np.ndarray]) -> None:
        self.centres = centres

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for t in texts:
            c = next(int(w.removeprefix("class").rstrip(".,")) for w in t.split() if w.startswith("class"))
            out.append(self.centres["all"][c] + 0.05 * np.random.default_rng(len(t)).standard_normal(DIM))
        return _unit(np.asarray(out))


@pytest.fixture(scope="module")
def world() -> tuple[dict[str, EncodedSet], FakeTextEncoder]:
    rng = np.random.default_rng(3)
    centres = _unit(rng.standard_normal((6, DIM)))
    sets = {
        "flickr8k": _encoded("flickr8k", rng, _unit(rng.standard_normal((20, DIM))),
                             {"train": 80, "val": 12, "test": 12}, ("train", "val", "test"), generic=True),
        "cub100": _encoded("cub100", rng, centres, {"train": 40, "test": 30}, ("train",)),
        "flowers12": _encoded("flowers12", rng, centres, {"train": 40, "test": 30}, ("train",)),
        "imagenette": _encoded("imagenette", rng, centres, {"train": 40, "test": 30}, ("train",)),
        "cifar10": _encoded("cifar10", rng, centres, {"test": 30}, ()),
        "clothing10": _encoded("clothing10", rng, centres, {"train": 20}, ("train",)),
    }
    return sets, FakeTextEncoder({"all": centres})


def _plan(**overrides: object) -> ReproPlan:
    values: dict[str, object] = {"seeds": [0, 1], "ablation_seeds": [0], "epochs": 1, "batch_size": 64,
                                 "warmup_steps": 1, "threads": 1,
                                 "variants": [*default_variants(), *extended_variants()]}
    values.update(overrides)
    return ReproPlan(**values)  # type: ignore[arg-type]


def _views(sets: dict[str, EncodedSet], noise: float = 0.5) -> np.ndarray:
    """One "augmented view" per Flickr8k train image: its embedding plus noise (what a strong crop does)."""
    g = sets["flickr8k"]
    clean = g.image_emb[g.images_of("train")]
    return _unit(clean + noise * np.random.default_rng(3).standard_normal(clean.shape))[None]


def test_held_out_is_deterministic_and_about_one_in_n() -> None:
    files = [f"images/x_{i}.jpg" for i in range(1000)]
    first, again = held_out(files, 5, "a"), held_out(files, 5, "a")
    assert (first == again).all() and 150 < first.sum() < 250
    # within a split made by sha1(name) mod 8, a salted mod 2 still halves it
    split = [f for f in files if int(__import__("hashlib").sha1(Path(f).name.encode()).hexdigest(), 16) % 8 == 1]
    assert 0.3 < held_out(split, 2, "b").mean() < 0.7


def test_prepare_builds_both_memories_and_keeps_validation_out(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sets, enc = world
    ws = prepare(enc, tmp_path, tmp_path, _plan(), datasets=sets, progress=False, augmented=_views(sets))  # type: ignore[arg-type]
    generic, full = ws.memories["generic"].index, ws.memories["generic+domain"].index
    assert len(generic) == 80 * 5 and len(full) > len(generic)  # synthetic images: no near-duplicates
    val_sets = {z.dataset for z in ws.zero_shot if z.split == "val"}
    assert val_sets == {"cub100", "flowers12", "imagenette"}
    for z in ws.zero_shot:  # no validation or test image is in the memory
        if z.split == "val":
            data = sets[z.dataset]
            val_sha = {data.image_sha256[i] for i in np.flatnonzero(np.isin(
                data.image_emb.view([("", data.image_emb.dtype, DIM)]).ravel(),
                z.image_emb.view([("", z.image_emb.dtype, DIM)]).ravel()))}
            assert val_sha and not (val_sha & set(full.image_hashes))
    assert len(ws.pairs) == 400 and ws.extra_pairs["clothing10"][0].image.shape == (20, DIM)


def test_training_options_reach_the_trained_model(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sets, enc = world
    plan = _plan()
    ws = prepare(enc, tmp_path, tmp_path, plan, datasets=sets, progress=False, augmented=_views(sets))  # type: ignore[arg-type]
    model, metrics = train_variant(ws, plan, plan.variant("gated"), 0)
    assert getattr(model.image, "gate", None) is not None and len(metrics["gate_tanh"]) == 2
    model, metrics = train_variant(ws, plan, plan.variant("paper"), 0)
    assert getattr(model.image, "gate", None) is None and "gate_tanh" not in metrics
    _, metrics = train_variant(ws, plan, plan.variant("clothing10-pairs"), 0)
    assert metrics["pairs"] == 400 + 20 and metrics["memory_size"] == len(ws.memories["generic"].index) + 20
    _, metrics = train_variant(ws, plan, plan.variant("k=5"), 0)
    assert metrics["pairs"] == 400
    assert any(key[3] == 5 for key in ws.training_neighbours)  # k reached the neighbour search
    _, metrics = train_variant(ws, plan, plan.variant("unseen-pairs"), 0)
    unseen_pairs = len(ws.extra_pairs["flickr8k-val-half"][0])
    assert 0 < unseen_pairs < 12 * 5 and metrics["pairs"] == unseen_pairs  # half of val, never in the memory
    assert metrics["steps"] >= 1
    policies = {key[-1] for key in ws.training_neighbours}
    train_variant(ws, plan, plan.variant("exclude-pair"), 0)
    assert {key[-1] for key in ws.training_neighbours} - policies == {"pair"}


def test_knn_vote_follows_the_neighbours_captions(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sets, enc = world
    ws = prepare(enc, tmp_path, tmp_path, _plan(), datasets=sets, progress=False, augmented=_views(sets))  # type: ignore[arg-type]
    index = ws.memories["generic+domain"].index
    test = next(z for z in ws.zero_shot if z.dataset == "cub100" and z.split == "test")
    class_emb = enc.centres["all"]
    logits = knn_vote_logits(index, test.image_emb, class_emb, 5, NeighbourCache())
    accuracy = float((logits.argmax(1) == test.labels).mean())
    assert accuracy > 0.8  # captions name the class and images cluster by class
    # with the captions' class shuffled away (text matrix replaced by random), the vote is near chance
    noise = ExactIndex(index.ids, np.asarray(index.matrix(Modality.IMAGE)),
                       _unit(np.random.default_rng(9).standard_normal((len(index), DIM))), index.image_hashes,
                       version="noise")
    shuffled = knn_vote_logits(noise, test.image_emb, class_emb, 5, NeighbourCache())
    assert float((shuffled.argmax(1) == test.labels).mean()) < 0.5


def test_a_small_plan_writes_the_documented_schema(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sets, enc = world
    names = {"paper", "paper+fallback", "paper+mix+fallback", "mean-fusion", "knn-vote", "k=5", "aug", "score-bias",
             "score-bias+fallback",
             "caption-like-prompts", "exclude-pair", "search-cross/fusion-cross"}
    plan = _plan(variants=[v for v in (*default_variants(), *extended_variants()) if v.name in names])
    ws = prepare(enc, tmp_path, tmp_path, plan, datasets=sets, progress=False, augmented=_views(sets))  # type: ignore[arg-type]
    output = run_plan(ws, plan, enc, progress=False)  # type: ignore[arg-type]
    meta = {"default_variant": output.default_variant, "encoder_id": enc.encoder_id, "dim": DIM, "command": "test",
            "cpu_threads": 1, "seconds": 1.0,
            "near_duplicates": {"threshold": ws.threshold, "evaluation_images": 1,
                                "memories": {k: m.counts for k, m in ws.memories.items()}},
            "selection": output.selection, "calibration": output.calibration,
            "training": output.training, "diagnostics": output.diagnostics}
    json_path, md_path = write_report(tmp_path / "docs", output.rows, plan, meta)
    doc = json.loads(json_path.read_text())
    results = doc["results"]
    # the default recipe: a trained candidate, chosen on validation, named at the top level and in its rows
    candidates = {v.name for v in plan.variants if v.candidate and v.kind == "trained"}
    assert doc["default_variant"] in candidates and {s["variant"] for s in output.selection} == candidates
    assert results and all(all(k in r for k in REQUIRED_KEYS) and r["variant"] for r in results)
    assert {r["memory"] for r in results} == set(ALL_MEMORIES)
    assert {r["dataset"] for r in results if r["memory"] == "mismatched"} == {"cub100", "flowers12", "imagenette"}
    new_metrics = {"ece", "ece@100", "image_queries", "class_prompts", "caption_queries"}
    assert {r["metric"] for r in results} <= set(METRICS) | new_metrics
    assert all(0.0 <= r["value"] <= 1.0 and r["std"] >= 0.0 and r["seeds"] for r in results)
    paper_clip = [r for r in results if r["variant"] == "paper" and r["mode"] == "clip" and r["split"] == "test"]
    assert paper_clip and all(r["seeds"] == [0, 1] for r in paper_clip)  # main table: every main seed
    default_best = [r for r in results if r["variant"] == doc["default_variant"] and r["mode"] == "best"
                    and r["metric"] == "top1"]
    assert default_best and all(r["seeds"] == [0, 1] for r in default_best)  # the default runs every main seed
    assert all(r["seeds"] == [0] for r in results if r["variant"] == "aug")
    assert any(r["mode"] == "best" and r["chosen_modes"] for r in results)
    assert {r["k_infer"] for r in results if r["variant"] == "k=5"} == {5, 10}
    # calibration: an ECE for CLIP and for RECO on every zero-shot set; a fitted scale per mode
    eces = {(r["dataset"], r["mode"]) for r in results if r["metric"] == "ece" and r["split"] == "test"}
    assert {("cifar10", "clip"), ("cub100", "best"), ("cub100", "clip")} <= eces
    scales = output.calibration["paper/0/10"]["softmax_scale"]
    assert set(scales) == {"clip", "image", "text", "both"} and all(s > 0 for s in scales.values())
    # the fallback variants report how often they kept CLIP, per set
    rates = [r for r in results if r["variant"] == "score-bias+fallback" and r["metric"] == "image_queries"]
    assert {r["memory"] for r in rates} == set(ALL_MEMORIES) or output.calibration[
        "score-bias+fallback/0/10"]["fallback"] is None
    assert len(output.calibration["paper+fallback/0/10"]["fallback_candidates"]) >= 2
    # the blend toward mean fusion: a 3 x 3 grid per trained fusion, one weight pair per task
    mixed = output.calibration["paper+mix+fallback/0/10"]
    assert len(mixed["mean_mix_candidates"]) == 9
    assert mixed["mean_mix"] is None or set(mixed["mean_mix"]) == {"zeroshot", "retrieval"}
    cub_clip = next(r for r in paper_clip if r["dataset"] == "cub100" and r["metric"] == "top1"
                    and r["memory"] == "generic+domain" and r["k_infer"] == 10)
    assert cub_clip["value"] > 0.5
    text = md_path.read_text()
    for part in ("Goals of issue 16", "mismatched", "expected calibration error", "Near-duplicates",
                 "Why: the measured chain", "levers", "caption-like-prompts", "paper+mix+fallback"):
        assert part in text, part
    for png in ("zeroshot.png", "k.png", "options.png"):
        assert (tmp_path / "docs" / "reproduction" / png).stat().st_size > 1000
    leak = {r["self_exclusion"]: r["own_image_in_neighbours"] for r in output.diagnostics["training_leak"]}
    assert leak["pair"] > 0.5 and leak["image"] == 0.0
    overfit = {r["images"]: r for r in output.diagnostics["base_overfit"]}
    assert overfit["train (seen by the base)"]["n"] == 80 and "val (unseen)" in overfit
    assert overfit["train, augmented views (queries of `aug`)"]["n"] == 80
    assert build_results(output.rows) == results
    md_path.unlink()
    assert render_from_json(tmp_path / "docs").read_text() == text  # the JSON alone re-renders the same doc


def test_augmented_queries_and_score_bias_reach_training(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sets, enc = world
    plan = _plan()
    views = _views(sets)
    ws = prepare(enc, tmp_path, tmp_path, plan, datasets=sets, progress=False, augmented=views)  # type: ignore[arg-type]
    assert ws.augmented is not None and ws.augmented.shape == (1, len(ws.pairs), DIM)
    # each training pair's query is the view of its own image; the memory keeps the clean embeddings
    g = sets["flickr8k"]
    first = int(ws.pairs.ids[0].partition(":")[2])  # type: ignore[index]
    image_row = list(g.images_of("train")).index(g.caption_image[first])
    assert np.allclose(ws.augmented[0, 0], views[0, image_row])
    assert not np.allclose(ws.augmented[0, 0], ws.pairs.image[0])
    model, metrics = train_variant(ws, plan, plan.variant("all-levers"), 0)
    assert model.image.score_weight is not None and model.image.gate is not None  # type: ignore[union-attr]
    assert metrics["options"]["score_bias"] and metrics["options"]["query_dropout"] == 0.5
    with pytest.raises(ValueError, match="augmented"):
        bare = prepare(enc, tmp_path, tmp_path, _plan(variants=[plan.variant("paper")]), datasets=sets,
                       progress=False)  # type: ignore[arg-type]
        train_variant(bare, plan, plan.variant("aug"), 0)


def test_quick_plan_runs_every_variant_once() -> None:
    plan = ReproPlan.quick()
    assert plan.seeds == [0] and plan.limit is not None
    assert {v.name for v in plan.variants} == {v.name for v in default_variants()}
    assert plan.seeds_of(plan.variant("paper")) == [0]
    full = ReproPlan()
    assert full.seeds_of(full.variant("paper")) == [0, 1, 2] and full.seeds_of(full.variant("aug")) == [0]
    assert full.seeds_of(full.variant("paper+fallback")) == [0, 1, 2]  # reuses the paper fusion
    assert ReproPlan(default_seeds_for=["aug"]).seeds_of(full.variant("aug+fallback")) == [0, 1, 2]
    assert "paper" in {v.name for v in default_variants()}  # the paper recipe stays a named variant


class _PixelEncoder:
    """Embeds an image by its mean colour and size: enough to see that views differ and are cached."""

    encoder_id = "pixels/test"
    dim = 4

    def __init__(self) -> None:
        self.calls = 0

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        self.calls += 1
        out = [np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3).mean(0).tolist() + [im.size[0] / 100]
               for im in images]
        return np.asarray(out, np.float32)


def test_augmented_views_are_encoded_once_and_differ_from_the_clean_image(tmp_path: Path) -> None:
    from programs.reproduce.data import encode_augmented_views

    folder = tmp_path / "flickr8k"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.jpg")
        files.append(f"images/{i}.jpg")
    (folder / "manifest.csv").write_text("image,caption,label,split\n")
    data = EncodedSet("flickr8k", files, np.zeros((3, 4), np.float32), ["a", "b", "c"], np.zeros(3, np.uint64),
                      np.asarray(["train"] * 3), np.full(3, -1), [], np.zeros((0, 4), np.float32),
                      np.zeros(0, np.int64))
    enc = _PixelEncoder()
    views = encode_augmented_views(enc, folder, data, np.arange(3), tmp_path / "cache", views=2, progress=False)  # type: ignore[arg-type]
    assert views.shape == (2, 3, 4) and np.allclose(np.linalg.norm(views, axis=2), 1.0, atol=1e-5)
    assert not np.allclose(views[0], views[1])  # two random views
    calls = enc.calls
    again = encode_augmented_views(enc, folder, data, np.arange(3), tmp_path / "cache", views=2, progress=False)  # type: ignore[arg-type]
    assert enc.calls == calls and np.array_equal(again, views)  # from the cache
