"""Diagnostics: the measured reasons behind the numbers (what the memory can tell, how much the fusion
listens to it, what the base has memorised)."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.fusion.model import RecoFusion
from app.memory.exact import ExactIndex
from app.retrieval import RetrievalCfg, SearchKind, gather_embeddings
from app.schemas import Modality
from app.zeroshot import resolve_templates
from programs.reproduce.data import held_out
from programs.reproduce.evaluation import memory_label, templates_for
from programs.reproduce.plan import DOMAIN_SETS, GENERIC, GENERIC_DOMAIN, MISMATCHED, Variant
from programs.reproduce.training import training_neighbours
from programs.reproduce.workspace import GENERIC_SET, UNSEEN, CachedRefiner, CachedTexts, Workspace, retrieval_set

SEARCHES: tuple[SearchKind, ...] = ("uni", "cross")
OVERFIT_SAMPLE = 1000  # Flickr8k train images scored as a diagnostic (CLIP only): the base has seen them


def row_labels(ws: Workspace, index: ExactIndex) -> tuple[np.ndarray, np.ndarray]:
    """(dataset name, label) of every memory row; label -1 for caption-only rows."""
    names, labels = [], []
    for item in index.ids:
        name, _, row = item.partition(":")
        data = ws.sets[name]
        names.append(name)
        labels.append(int(data.image_label[data.caption_image[int(row)]]))
    return np.asarray(names, dtype=str), np.asarray(labels, np.int64)


def neighbour_purity(ws: Workspace, texts: CachedTexts | None, k: int = 10, caption_like: bool = False
                     ) -> list[dict[str, Any]]:
    """Fraction of the k neighbours in the generic+domain memory that carry the query's class.

    Image queries (test images) by image->image and image->text search; class prompts by text->text
    and text->image search. This is what any fusion can at best read from the memory.
    """
    index = ws.memories[GENERIC_DOMAIN].index
    names, labels = row_labels(ws, index)
    out = []
    for zs in ws.zero_shot:
        if zs.split != "test" or zs.dataset not in DOMAIN_SETS or len(zs.labels) == 0:
            continue
        record: dict[str, Any] = {"dataset": zs.dataset, "k": k}
        for search in SEARCHES:
            rows = ws.neighbours.rows(index, zs.image_emb, Modality.IMAGE, k, RetrievalCfg(search, "cross", True))
            hit = (rows >= 0) & (names[np.maximum(rows, 0)] == zs.dataset) & (
                labels[np.maximum(rows, 0)] == zs.labels[:, None])
            record[f"image_{search}_search"] = float(hit.mean())
        if texts is not None:
            templates = resolve_templates(templates_for(zs.dataset, caption_like))
            prompts = [t.replace("{c}", c) for c in zs.class_names for t in templates]
            prompt_labels = np.repeat(np.arange(len(zs.class_names)), len(templates))
            emb = texts.encode_texts(prompts)
            for search in SEARCHES:
                rows = ws.neighbours.rows(index, emb, Modality.TEXT, k, RetrievalCfg(search, "cross", True))
                hit = (rows >= 0) & (names[np.maximum(rows, 0)] == zs.dataset) & (
                    labels[np.maximum(rows, 0)] == prompt_labels[:, None])
                record[f"prompt_{search}_search"] = float(hit.mean())
        out.append(record)
    return out


def neighbour_attention(ws: Workspace, model: RecoFusion, variant: Variant) -> list[dict[str, Any]]:
    """Mean attention of the query on its neighbours (1 - on itself), per memory and query kind."""
    out = []
    retrieval = RetrievalCfg(variant.search, variant.fusion, variant.dedupe_by_image)
    queries = [(zs.image_emb, Modality.IMAGE, f"{zs.dataset} test images")
               for zs in ws.zero_shot if zs.split == "test" and len(zs.image_emb)]
    queries += [(rs.text_emb, Modality.TEXT, f"{rs.dataset} test captions")
                for rs in ws.retrieval if rs.split == "test" and len(rs.text_emb)]
    for memory, clean in ws.memories.items():
        if memory_label(memory) == MISMATCHED:
            continue
        refiner = CachedRefiner(model, clean.index, ws.neighbours, k=variant.k, retrieval=retrieval)
        for query_emb, modality, label in queries:
            found = ws.neighbours.get(clean.index, query_emb, modality, variant.k, retrieval)
            emb, valid = gather_embeddings(clean.index, found.rows, retrieval.fused(modality))
            _, attention = refiner._fuse(query_emb, emb, modality, valid, found.scores)
            out.append({"memory": memory, "queries": label,
                        "neighbour_attention": float(1.0 - attention[:, 0].mean())})
    return out


def training_leak(ws: Workspace, k: int = 10) -> list[dict[str, Any]]:
    """Per self-exclusion policy: how often a training caption's own image is among its text->text neighbours.

    Under "pair" the other four captions of the query's image stay in the memory, so the fusion is
    handed the answer during training, which it never gets at test time.
    """
    index = ws.memories[GENERIC].index
    out = []
    for policy in ("pair", "image", "near-duplicates"):
        _, text_nb = training_neighbours(ws, index, ws.pairs, k, RetrievalCfg(), policy)
        hashes = np.asarray(index.image_hashes)
        own = np.asarray(ws.pairs.image_hashes)
        found = (text_nb.rows >= 0) & (hashes[np.maximum(text_nb.rows, 0)] == own[:, None])
        out.append({"self_exclusion": policy, "own_image_in_neighbours": float(found.any(axis=1).mean())})
    return out


def embedding_cone(ws: Workspace, sample: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean cosine of random pairs: near 1 means every embedding sits in a narrow cone (a weak encoder),
    so a neighbour's embedding differs from any other's only in a small component."""
    index = ws.memories[GENERIC].index
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(index), (2, min(sample, len(index))))
    image = np.asarray(index.matrix(Modality.IMAGE), np.float32)
    text = np.asarray(index.matrix(Modality.TEXT), np.float32)
    distinct = np.asarray(index.image_hashes)[a] != np.asarray(index.image_hashes)[b]
    return {"image_image": float((image[a] * image[b]).sum(1)[distinct].mean()),
            "text_text": float((text[a] * text[b]).sum(1)[distinct].mean()),
            "image_text_unpaired": float((image[a] * text[b]).sum(1)[distinct].mean()),
            "image_text_paired": float((image * text).sum(1).mean())}


def base_overfit(ws: Workspace) -> list[dict[str, Any]]:
    """CLIP R@1 on Flickr8k images the base trained on vs unseen ones (1,000 images each at most).

    On its own training pairs the frozen base already matches image and caption well, so a fusion
    trained on those pairs learns that the query alone suffices.
    """
    from app.evaluation.metrics import recall_at_k

    generic = ws.sets[GENERIC_SET]
    val_images = generic.images_of("val")
    unseen = held_out([generic.image_files[i] for i in val_images], 2, UNSEEN)
    parts = {"train (seen by the base)": generic.images_of("train")[:OVERFIT_SAMPLE],
             "val (unseen)": val_images[:OVERFIT_SAMPLE], "test (unseen)": generic.images_of("test")[:OVERFIT_SAMPLE],
             "val half for unseen-pairs": val_images[unseen][:OVERFIT_SAMPLE]}
    out = []
    for name, images in parts.items():
        rs = retrieval_set(generic, "", images)
        if len(rs.text_emb) == 0:
            continue
        recall = recall_at_k(rs.image_emb, rs.text_emb, rs.image_of_text, ks=(1, 10))
        out.append({"images": name, "n": len(images), **recall})
    if ws.augmented_images is not None:  # the same train images as strongly augmented views (lever a's queries)
        images = generic.images_of("train")[:OVERFIT_SAMPLE]
        rs = retrieval_set(generic, "", images, ws.augmented_images[0][:len(images)])
        if len(rs.text_emb):
            recall = recall_at_k(rs.image_emb, rs.text_emb, rs.image_of_text, ks=(1, 10))
            out.insert(1, {"images": "train, augmented views (queries of `aug`)", "n": len(images), **recall})
    return out
