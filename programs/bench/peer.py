"""``reco bench ingest --peer``: ``reco ingest`` against the peer ``clip-retrieval inference``, whole commands.

Both commands embed the same folder (the first ``n`` JPEGs, images only) with the same model and the
same weights file (the peer's random-init ViT-B-32 safetensors, written by
``../shared/tools/peer/setup_peer.sh``), batch 64, 2 decode workers, each timed from process start to
exit: imports, model load, warm-up, decoding, encoding, writing vectors (and for ``reco``: SQLite
metadata and the embedded memory store on disk). Rounds alternate which command goes first. ``reco ingest``
runs with the project's defaults (``RECO_PRECISION=auto``: fp32 for a ViT on CPU, see
app/encoder/runtime.py) unless ``reco_precision`` says otherwise (e.g. ``int8``, to see what it would give).

Each round also times our own fp32 encoder-only figure in this process (the same weights file, ``encoder_n``
images decoded and preprocessed beforehand, untimed), so both goals — ``reco ingest`` ≥ 1.5 × the peer and
≥ 1.5 × fp32 encoder-only — are ratios measured in the same rounds. Every leg records the load average
(1, 5, 15 min) at its start and end: the machine is shared, and a round under load says so.

This takes ~4 minutes a round on 2 cores, so it is its own mode, outside ``reco bench all``'s 20-minute
budget; the report includes its last result when there is one.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from app.encoder.openclip import OpenClipEncoder
from app.encoder.runtime import default_runtime, visual_family
from programs.bench.common import load_average, machine_info
from programs.bench.ingest import BenchError, first_images, stage_images

PEER_MODEL, PEER_TAG = "ViT-B-32", "laion2b_s34b_b79k"
PEER_REPO_DIR = "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"


class PeerBenchResult(BaseModel):
    n: int
    reco_img_s: float
    peer_img_s: float
    ratio: float
    model: str
    encoder_fp32_img_s: float | None = None
    ratio_vs_encoder_fp32: float | None = None
    reco_runtime: str | None = None
    details: dict[str, Any] = Field(default_factory=dict, exclude=True)


def peer_weights(peer_dir: Path) -> Path:
    found = sorted((peer_dir / "hf_cache" / PEER_REPO_DIR / "snapshots").glob("*/open_clip_model.safetensors"))
    if not found:
        raise BenchError(f"no peer checkpoint under {peer_dir}/hf_cache: run ../shared/tools/peer/setup_peer.sh")
    return found[0]


def _peer_command(peer_dir: Path, images: Path, out: Path, batch: int, workers: int) -> list[str]:
    exe = peer_dir / "venv" / "bin" / "clip-retrieval"
    if not exe.is_file():
        raise BenchError(f"{exe} missing: run ../shared/tools/peer/setup_peer.sh (PEER_DIR={peer_dir})")
    return [str(exe), "inference", "--input_dataset", str(images), "--output_folder", str(out),
            "--clip_model", f"open_clip:{PEER_MODEL}/{PEER_TAG}", "--enable_text", "False",
            "--batch_size", str(batch), "--num_prepro_workers", str(workers)]


def _reco_command(images: Path) -> list[str]:
    script = Path(sys.executable).with_name("reco")
    base = [str(script)] if script.is_file() else [sys.executable, "-c", "from app.cli import main; main()"]
    return [*base, "ingest", str(images), "--json"]


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"{cmd[0]} exited {done.returncode}; see {log}")
    return wall


def _encoder_only_fp32(weights: Path, files: list[Path], batch: int) -> tuple[OpenClipEncoder, Any]:
    """Our fp32 ViT-B-32 with the peer's weights and its input tensor (decoded once, untimed)."""
    from app.imaging import ImageLimits, open_image_safely

    encoder = OpenClipEncoder(PEER_MODEL, str(weights), device="cpu", precision="fp32", channels_last="off",
                              batch_size=batch)
    import torch

    pixels = torch.stack([encoder.preprocess(open_image_safely(f.read_bytes(), ImageLimits())) for f in files])
    encoder.encode_images(pixels[:8])  # warm-up
    return encoder, pixels


def _leg(row: dict[str, Any], name: str, fn: Any) -> None:
    row[f"{name}_load_start"] = load_average()
    fn()
    row[f"{name}_load_end"] = load_average()


def run_peer_bench(
    images: Path, n: int = 1000, *, rounds: int = 3, batch: int = 64, workers: int = 2,
    peer_dir: Path | None = None, workdir: Path | None = None, encoder_n: int = 256,
    reco_precision: str | None = None, log: Any = None,
) -> PeerBenchResult:
    """``peer_dir``: where setup_peer.sh put the peer (default ``$PEER_DIR`` or /tmp/peer)."""
    peer_dir = peer_dir or Path(os.environ.get("PEER_DIR", "/tmp/peer"))
    weights = peer_weights(peer_dir)
    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="reco-bench-peer-", dir=workdir))
    files = first_images(images, n)
    folder = stage_images(files, root / "images", 1)[0]
    peer_env = os.environ | {"HF_HUB_CACHE": str(peer_dir / "hf_cache"), "HF_HUB_OFFLINE": "1",
                             "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    encoder, pixels = _encoder_only_fp32(weights, files[:encoder_n], batch) if encoder_n else (None, None)
    runs: list[dict[str, Any]] = []
    say = log or (lambda message: None)
    try:
        for r in range(rounds):
            row: dict[str, Any] = {"round": r, "load_avg_1m": load_average()[:1]}
            legs = {"peer": partial(_peer_leg, row, r, peer_dir, folder, root, batch, workers, peer_env),
                    "reco": partial(_reco_leg, row, r, folder, root, weights, batch, workers, reco_precision)}
            if encoder is not None:
                legs["encoder"] = partial(_encoder_leg, row, encoder, pixels)
            order = ("peer", "reco", "encoder") if r % 2 == 0 else ("encoder", "reco", "peer")
            for leg in (name for name in order if name in legs):
                say(f"round {r + 1}/{rounds}: {leg} (load {load_average()})")
                _leg(row, leg, legs[leg])
            runs.append(row)
            # rounds so far, beside the logs: a long run cut short still leaves its measurements
            (root.parent / f"{root.name}-rounds.json").write_text(json.dumps(runs, indent=1, default=str))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    runtime = _reco_runtime_label(encoder, reco_precision)
    return _peer_result(runs, info, weights, runtime)


def _peer_leg(row: dict[str, Any], r: int, peer_dir: Path, folder: Path, root: Path, batch: int, workers: int,
              env: dict[str, str]) -> None:
    out = root / f"peer-out-{r}"
    row["peer_s"] = _timed(_peer_command(peer_dir, folder, out, batch, workers), env,
                           root.parent / f"{root.name}-peer{r}.log")
    stats = json.loads((out / "stats" / "0.json").read_text())
    row["peer_images"], row["peer_loop_s"] = int(stats["sample_count"]), stats["total_duration"]


def _reco_leg(row: dict[str, Any], r: int, folder: Path, root: Path, weights: Path, batch: int, workers: int,
              precision: str | None) -> None:
    env = _reco_env(root / f"reco-data-{r}", weights, batch, workers, precision)
    log = root.parent / f"{root.name}-reco{r}.log"
    row["reco_s"] = _timed(_reco_command(folder), env, log)
    row["reco_images"] = int(json.loads(log.read_text().strip().splitlines()[-1])["ingested"])


def _encoder_leg(row: dict[str, Any], encoder: OpenClipEncoder, pixels: Any) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    encoder.encode_images(pixels)
    row["encoder_fp32_s"], row["encoder_fp32_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    row["encoder_fp32_images"] = len(pixels)


def _reco_runtime_label(encoder: OpenClipEncoder | None, precision: str | None) -> str:
    if precision and precision != "auto":
        return precision
    if encoder is None:
        return "auto"
    import torch

    tower = encoder.image_tower
    return default_runtime(torch.device("cpu"), visual_family(tower)).label


def _reco_env(data_dir: Path, weights: Path, batch: int, workers: int, precision: str | None = None
              ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    if precision:
        env["RECO_PRECISION"] = precision
    return env | {"RECO_DATA_DIR": str(data_dir), "RECO_CLIP_MODEL": PEER_MODEL,
                  "RECO_CLIP_PRETRAINED": str(weights), "RECO_REQUIRE_CAPTION": "false",
                  "RECO_INGEST_BATCH_SIZE": str(batch), "RECO_ENCODE_BATCH_SIZE": str(batch),
                  "RECO_DECODE_WORKERS": str(workers), "RECO_DEVICE": "cpu"}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def _peer_result(runs: list[dict[str, Any]], info: dict[str, Any], weights: Path, runtime: str) -> PeerBenchResult:
    if any(r["reco_images"] != r["peer_images"] for r in runs):
        raise BenchError(f"the commands embedded different numbers of images: {runs}")
    n = runs[0]["reco_images"]
    for r in runs:
        r["reco_img_s"], r["peer_img_s"] = round(n / r["reco_s"], 3), round(n / r["peer_s"], 3)
        r["ratio"] = round(r["peer_s"] / r["reco_s"], 4)
        if "encoder_fp32_s" in r:
            r["encoder_fp32_img_s"] = round(r["encoder_fp32_images"] / r["encoder_fp32_s"], 3)
            r["ratio_vs_encoder_fp32"] = round(r["reco_img_s"] / r["encoder_fp32_img_s"], 4)
    reco_s = statistics.median(r["reco_s"] for r in runs)
    peer_s = statistics.median(r["peer_s"] for r in runs)
    enc = [r["encoder_fp32_img_s"] for r in runs if "encoder_fp32_img_s" in r]
    enc_median = statistics.median(enc) if enc else None
    details = {"machine": info, "rounds": runs, "weights": str(weights), "load_avg_end": load_average(),
               "peer_loop_img_s": round(n / statistics.median(r["peer_loop_s"] for r in runs), 3),
               "spread": {key: _spread([r[key] for r in runs]) for key in
                          ("reco_img_s", "peer_img_s", "ratio", "encoder_fp32_img_s", "ratio_vs_encoder_fp32")
                          if all(key in r for r in runs)},
               "timing": "whole command wall clock, median over rounds; encoder-only fp32 in this process"}
    return PeerBenchResult(n=n, reco_img_s=round(n / reco_s, 3), peer_img_s=round(n / peer_s, 3),
                           ratio=round(peer_s / reco_s, 4), model=f"{PEER_MODEL} (peer's random-init weights file)",
                           encoder_fp32_img_s=round(enc_median, 3) if enc_median else None,
                           ratio_vs_encoder_fp32=round(n / reco_s / enc_median, 4) if enc_median else None,
                           reco_runtime=runtime, details=details)
