"""``reco bench precision``: each way of running the image tower, its speed and its quality against fp32.

Speed (every model): the same pre-processed Flickr8k test images encoded by each variant in one process,
variants interleaved round by round (order rotated), wall clock and process CPU time per image (on the
shared machine CPU time says how much work a variant does whatever share of the cores it got). A variant
stops after ``max_seconds`` a round (bf16 without native support would take many minutes). Batch sizes
and torch threads are measured for the model's default variant.

Quality (against fp32, same images): mean and minimum cosine of the image embeddings; Flickr8k test R@1
both ways (only meaningful with trained weights: the base encoder reco-base); top-10 neighbour agreement
with the fp32 memory — the memory is the test images, a query's top 10 among the variant's memory against
its fp32 top 10 among the fp32 memory, image→image (the method's uni-modal search) and caption→image.
Random-weight models (ViT-B-32 here: no trained ViT can be downloaded) get cosine and agreement on the
speed sample only, flagged. As the closest real-weights evidence for int8 on a trained transformer, the
probe ``int8 text tower`` quantizes reco-base's pretrained MiniLM text tower the same way.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import BASE_MODEL, BASE_PRETRAINED
from app.encoder.openclip import OpenClipEncoder
from app.encoder.runtime import Runtime, cpu_flags, default_runtime, visual_family
from programs.bench.common import load_average, machine_info
from programs.pretrain.data import CaptionedImages, load_image, read_manifest
from programs.pretrain.evaluate import retrieval_recalls

GOALS = {"cosine": 0.999, "r1_points": 0.2, "agreement": 0.98}
VARIANTS: dict[str, tuple[Runtime, ...]] = {
    "conv": (Runtime(), Runtime(channels_last=True), Runtime(precision="int8"),
             Runtime(precision="int8", channels_last=True), Runtime(precision="bf16"),
             Runtime(channels_last=True, compile=True)),
    "vit": (Runtime(), Runtime(precision="int8"), Runtime(precision="bf16"), Runtime(compile=True)),
}
DEFAULT_MODELS = ((BASE_MODEL, BASE_PRETRAINED), ("ViT-B-32", ""))


def _encoder(model: str, pretrained: str, runtime: Runtime, batch: int) -> OpenClipEncoder:
    return OpenClipEncoder(model, pretrained, device="cpu", precision=runtime.precision, batch_size=batch,
                           channels_last="on" if runtime.channels_last else "off", compile_model=runtime.compile)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed_encode(encoder: OpenClipEncoder, pixels: torch.Tensor, max_seconds: float, threads: int = 0
                  ) -> dict[str, Any]:
    """Batches of ``pixels`` until done or ``max_seconds`` passed (at least one batch)."""
    out: list[np.ndarray] = []
    load = load_average()[:1]
    with _threads(threads):
        start, cpu = time.perf_counter(), time.process_time()
        for lo in range(0, len(pixels), encoder.batch_size):
            out.append(encoder.encode_images(pixels[lo: lo + encoder.batch_size]))
            if time.perf_counter() - start > max_seconds:
                break
        wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    emb = np.concatenate(out)
    return {"images": len(emb), "wall_s": wall, "cpu_s": cpu_s, "load_1m": load, "emb": emb}


def _speed_row(label: str, legs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    images = sum(x["images"] for x in legs)
    wall, cpu = sum(x["wall_s"] for x in legs), sum(x["cpu_s"] for x in legs)
    return {"variant": label, "images": images, "img_s": round(images / wall, 3),
            "cpu_ms_per_img": round(cpu / images * 1e3, 2),
            "rounds": [{"images": x["images"], "wall_s": round(x["wall_s"], 3), "cpu_s": round(x["cpu_s"], 3),
                        "load_1m": x["load_1m"]} for x in legs]}


def _cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    n = min(len(a), len(b))
    cos = (a[:n] * b[:n]).sum(axis=1)
    return float(cos.mean()), float(cos.min())


def topk_agreement(queries: np.ndarray, memory: np.ndarray, ref_queries: np.ndarray, ref_memory: np.ndarray,
                   k: int = 10, *, exclude_self: bool = False) -> float:
    """Mean |top-k(variant) ∩ top-k(fp32)| / k; with ``exclude_self`` query i is memory row i."""
    def top(q: np.ndarray, m: np.ndarray) -> np.ndarray:
        sims = q @ m.T
        if exclude_self:
            np.fill_diagonal(sims, -np.inf)
        return np.argpartition(-sims, k, axis=1)[:, :k]

    mine, ref = top(queries, memory), top(ref_queries, ref_memory)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(mine, ref, strict=True)]))


def quality_against(ref: dict[str, np.ndarray], var: dict[str, np.ndarray], caption_image: np.ndarray | None
                    ) -> dict[str, Any]:
    """Cosine, agreement and (with captions) R@1 of one variant's embeddings against fp32's."""
    mean_cos, min_cos = _cosine(var["images"], ref["images"])
    n = min(len(var["images"]), len(ref["images"]))
    out: dict[str, Any] = {"images": n, "cosine_mean": round(mean_cos, 6), "cosine_min": round(min_cos, 6),
                           "agree_i2i_top10": round(topk_agreement(var["images"][:n], var["images"][:n],
                                                                   ref["images"][:n], ref["images"][:n],
                                                                   exclude_self=True), 4)}
    if caption_image is not None and "texts" in var:
        out["text_cosine_mean"] = round(_cosine(var["texts"], ref["texts"])[0], 6)
        out["agree_t2i_top10"] = round(topk_agreement(var["texts"], var["images"], ref["texts"], ref["images"]), 4)
        mine, base = (retrieval_recalls(e["images"], e["texts"], caption_image, ks=(1,)) for e in (var, ref))
        out |= {"i2t_r1": round(mine["i2t_r1"] * 100, 2), "t2i_r1": round(mine["t2i_r1"] * 100, 2),
                "i2t_r1_delta": round((mine["i2t_r1"] - base["i2t_r1"]) * 100, 2),
                "t2i_r1_delta": round((mine["t2i_r1"] - base["t2i_r1"]) * 100, 2)}
    return out


def meets_goals(q: dict[str, Any]) -> bool:
    ok = q.get("cosine_mean", 0) >= GOALS["cosine"] and q.get("agree_i2i_top10", 0) >= GOALS["agreement"]
    if "i2t_r1_delta" in q:
        ok = ok and abs(q["i2t_r1_delta"]) <= GOALS["r1_points"] and abs(q["t2i_r1_delta"]) <= GOALS["r1_points"]
        ok = ok and q.get("agree_t2i_top10", 0) >= GOALS["agreement"]
    return bool(ok)


def _flickr_test(data_root: Path, n: int | None) -> CaptionedImages:
    data = CaptionedImages.from_rows(read_manifest(data_root / "flickr8k" / "manifest.csv", "test"))
    return data.subset(n) if n is not None and n < len(data.images) else data


def _pixels(encoder: OpenClipEncoder, paths: Sequence[Path]) -> torch.Tensor:
    return torch.stack([encoder.preprocess(load_image(p)) for p in paths])


def _text_tower_int8(encoder: OpenClipEncoder) -> OpenClipEncoder:
    """The probe: reco-base's pretrained MiniLM text tower with every Linear dynamically quantized."""
    probe = copy.copy(encoder)
    probe._model = copy.deepcopy(encoder._model)  # noqa: SLF001 - a bench-only variant of a loaded encoder
    probe._model.text = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
        probe._model.text, {torch.nn.Linear},
                                                                dtype=torch.qint8)
    return probe


def bench_model(model: str, pretrained: str, data: CaptionedImages, *, batch: int = 64, speed_n: int = 256,
                rounds: int = 2, max_seconds: float = 60.0, batches: Sequence[int] = (16, 32, 128),
                compile_variants: bool = True, log: Any = print) -> dict[str, Any]:
    """Speed of every variant of this model's family, then quality against fp32 (see the module docstring)."""
    ref_enc = _encoder(model, pretrained, Runtime(), batch)
    family = visual_family(ref_enc.image_tower)
    default = default_runtime(torch.device("cpu"), family)
    trained = not ref_enc.is_random
    variants = [v for v in VARIANTS.get(family, VARIANTS["vit"]) if compile_variants or not v.compile]
    pixels = _pixels(ref_enc, data.images[: (len(data.images) if trained else speed_n)])
    speed_px = pixels[:speed_n]
    encoders = {r.label: (ref_enc if r == Runtime() else _encoder(model, pretrained, r, batch)) for r in variants}
    warm: dict[str, float] = {}
    for label, enc in encoders.items():  # load, quantize, compile: untimed, reported
        start = time.perf_counter()
        enc.encode_images(speed_px[: min(8, batch)])  # a compiled tower pads it to the batch shape
        warm[label] = round(time.perf_counter() - start, 2)
    legs: dict[str, list[dict[str, Any]]] = {label: [] for label in encoders}
    for r in range(rounds):
        order = list(encoders)[r % len(encoders):] + list(encoders)[: r % len(encoders)]
        for label in order:
            log(f"{model}: {label} round {r + 1}/{rounds}")
            legs[label].append(_timed_encode(encoders[label], speed_px, max_seconds))
    speed = [_speed_row(label, legs[label]) | {"first_batch_s": warm[label]} for label in encoders]
    fp32 = speed[0]
    for row in speed:
        row["speedup_wall"] = round(row["img_s"] / fp32["img_s"], 3)
        row["speedup_cpu"] = round(fp32["cpu_ms_per_img"] / row["cpu_ms_per_img"], 3)
    quality = _quality(encoders, legs, pixels, data, trained, log)
    extra = _default_sweeps(encoders[default.label] if default.label in encoders else ref_enc, speed_px,
                            batches, max_seconds, default.label, log)
    best = _recommend(speed, quality)
    return {"model": model, "pretrained": pretrained or None, "random_weights": not trained, "family": family,
            "coded_default": default.label, "recommended": best, "default_matches_measurement": best == default.label,
            "speed_images": len(speed_px), "batch": batch, "speed": speed, "quality": quality,
            "sweeps": extra, "load_avg_end": load_average()}


def _quality(encoders: dict[str, OpenClipEncoder], legs: dict[str, list[dict[str, Any]]], pixels: torch.Tensor,
             data: CaptionedImages, trained: bool, log: Any) -> list[dict[str, Any]]:
    ref_label = next(iter(encoders))
    ref_enc = encoders[ref_label]
    if not trained:  # random weights: the speed sample, cosine and image agreement only
        ref = {"images": legs[ref_label][0]["emb"]}
        return [{"variant": label, "sample": "speed sample, random weights: indicative only"}
                | quality_against(ref, {"images": legs[label][0]["emb"]}, None) for label in encoders]
    log(f"quality: fp32 on {len(pixels)} images and {len(data.captions)} captions")
    ref = {"images": ref_enc.encode_images(pixels), "texts": ref_enc.encode_texts(data.captions)}
    rows: list[dict[str, Any]] = []
    for label, enc in encoders.items():
        first = legs[label][0]
        slow = first["images"] < len(legs[ref_label][0]["emb"])  # cut by max_seconds: too slow to be a choice
        if slow:
            rows.append({"variant": label, "sample": "speed sample only (slower than fp32 by far)"}
                        | quality_against(ref, {"images": first["emb"]}, None))
            continue
        log(f"quality: {label}")
        var = {"images": ref["images"] if enc is ref_enc else enc.encode_images(pixels),
               "texts": enc.encode_texts(data.captions) if enc.runtime.precision in ("bf16", "fp16")
               else ref["texts"]}  # int8, channels-last, compile change the image tower only
        rows.append({"variant": label, "sample": "Flickr8k test"} | quality_against(ref, var, data.caption_image))
    probe = _text_tower_int8(ref_enc)
    log("quality: probe int8 text tower (pretrained MiniLM)")
    var = {"images": ref["images"], "texts": probe.encode_texts(data.captions)}
    rows.append({"variant": "probe: int8 text tower", "sample": "Flickr8k test"}
                | quality_against(ref, var, data.caption_image)
                | {"text_agree_t2t_top10": round(topk_agreement(var["texts"], var["texts"], ref["texts"],
                                                                ref["texts"], exclude_self=True), 4)})
    return rows


def _default_sweeps(encoder: OpenClipEncoder, pixels: torch.Tensor, batches: Sequence[int], max_seconds: float,
                    label: str, log: Any) -> list[dict[str, Any]]:
    """Batch sizes and torch threads for the default variant (one pass each)."""
    rows: list[dict[str, Any]] = []
    original = encoder.batch_size
    for b in (*batches, original):
        encoder.batch_size = b
        log(f"sweep: {label} batch {b}")
        rows.append(_speed_row(f"{label}, batch {b}", [_timed_encode(encoder, pixels, max_seconds)]) | {"batch": b})
    encoder.batch_size = original
    for threads in (1, torch.get_num_threads()):
        log(f"sweep: {label} {threads} torch thread(s)")
        rows.append(_speed_row(f"{label}, {threads} thread(s)", [_timed_encode(encoder, pixels, max_seconds,
                                                                               threads)]) | {"threads": threads})
    return rows


def _recommend(speed: list[dict[str, Any]], quality: list[dict[str, Any]]) -> str:
    """Fastest by CPU time per image among variants that meet every quality goal (fp32 always does)."""
    ok = {q["variant"] for q in quality if meets_goals(q)} | {speed[0]["variant"]}
    return str(min((row for row in speed if row["variant"] in ok), key=lambda row: row["cpu_ms_per_img"])["variant"])


def run_precision_bench(data_root: Path, *, models: Sequence[tuple[str, str]] = DEFAULT_MODELS,
                        quality_n: int | None = None, speed_n: int = 256, rounds: int = 2, max_seconds: float = 60.0,
                        batch: int = 64, compile_models: Sequence[str] | None = None, log: Any = print,
                        checkpoint: Path | None = None) -> dict[str, Any]:
    """``compile_models``: models whose torch.compile variants run (None: all; compiling costs minutes each)."""
    """Every model in ``models``; the machine, its CPU flags and the load around the run."""
    started = time.perf_counter()
    data = _flickr_test(data_root, quality_n)
    results: dict[str, Any] = {"machine": machine_info(), "cpu_flags": cpu_flags(), "goals": GOALS,
                               "variants": {k: [asdict(r) | {"label": r.label} for r in v]
                                            for k, v in VARIANTS.items()},
                               "quality_images": len(data.images), "quality_captions": len(data.captions),
                               "models": []}
    for model, pretrained in models:
        results["models"].append(bench_model(
            model, pretrained, data, batch=batch, speed_n=speed_n, rounds=rounds, max_seconds=max_seconds, log=log,
            compile_variants=compile_models is None or model in compile_models))
        gc.collect()
        if checkpoint is not None:  # models so far: a run cut short keeps them
            checkpoint.write_text(json.dumps(results, indent=1, default=str) + "\n")
    results["duration_s"] = round(time.perf_counter() - started, 1)
    results["pid"] = os.getpid()
    return results
