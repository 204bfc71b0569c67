"""``reco bench ingest --peer``: ``reco ingest`` against the peer ``clip-retrieval inference``, whole commands.

Both commands embed the same folder (the first ``n`` JPEGs, images only) with the same model and the
same weights file (the peer's random-init ViT-B-32 safetensors, written by
``../shared/tools/peer/setup_peer.sh``), batch 64, 2 decode workers, each timed from process start to
exit: imports, model load, warm-up, decoding, encoding, writing vectors (and for ``reco``: SQLite
metadata and a Qdrant local-mode store on disk). Rounds alternate which command goes first.

This takes ~5 minutes a round on 2 cores (the peer alone ~2 min), so it is its own mode, outside
``reco bench all``'s 20-minute budget; the report includes its last result when there is one.
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
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from app.bench.common import load_average, machine_info
from app.bench.ingest import BenchError, first_images, stage_images

PEER_MODEL, PEER_TAG = "ViT-B-32", "laion2b_s34b_b79k"
PEER_REPO_DIR = "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"


class PeerBenchResult(BaseModel):
    n: int
    reco_img_s: float
    peer_img_s: float
    ratio: float
    model: str
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


def run_peer_bench(
    images: Path, n: int = 1000, *, rounds: int = 2, batch: int = 64, workers: int = 2,
    peer_dir: Path | None = None, workdir: Path | None = None,
) -> PeerBenchResult:
    """``peer_dir``: where setup_peer.sh put the peer (default ``$PEER_DIR`` or /tmp/peer)."""
    peer_dir = peer_dir or Path(os.environ.get("PEER_DIR", "/tmp/peer"))
    weights = peer_weights(peer_dir)
    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="reco-bench-peer-", dir=workdir))
    folder = stage_images(first_images(images, n), root / "images", 1)[0]
    peer_env = os.environ | {"HF_HUB_CACHE": str(peer_dir / "hf_cache"), "HF_HUB_OFFLINE": "1",
                             "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    runs: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            row: dict[str, Any] = {"round": r, "load_avg_1m": load_average()[:1]}
            for leg in (("peer", "reco") if r % 2 == 0 else ("reco", "peer")):
                if leg == "peer":
                    out = root / f"peer-out-{r}"
                    row["peer_s"] = _timed(_peer_command(peer_dir, folder, out, batch, workers), peer_env,
                                           root.parent / f"{root.name}-peer{r}.log")
                    stats = json.loads((out / "stats" / "0.json").read_text())
                    row["peer_images"], row["peer_loop_s"] = int(stats["sample_count"]), stats["total_duration"]
                else:
                    env = _reco_env(root / f"reco-data-{r}", weights, batch, workers)
                    log = root.parent / f"{root.name}-reco{r}.log"
                    row["reco_s"] = _timed(_reco_command(folder), env, log)
                    row["reco_images"] = int(json.loads(log.read_text().strip().splitlines()[-1])["ingested"])
            runs.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return _peer_result(runs, info, weights)


def _reco_env(data_dir: Path, weights: Path, batch: int, workers: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    return env | {"RECO_DATA_DIR": str(data_dir), "RECO_CLIP_MODEL": PEER_MODEL,
                  "RECO_CLIP_PRETRAINED": str(weights), "RECO_REQUIRE_CAPTION": "false",
                  "RECO_INGEST_BATCH_SIZE": str(batch), "RECO_ENCODE_BATCH_SIZE": str(batch),
                  "RECO_DECODE_WORKERS": str(workers), "RECO_DEVICE": "cpu"}


def _peer_result(runs: list[dict[str, Any]], info: dict[str, Any], weights: Path) -> PeerBenchResult:
    if any(r["reco_images"] != r["peer_images"] for r in runs):
        raise BenchError(f"the commands embedded different numbers of images: {runs}")
    n = runs[0]["reco_images"]
    reco_s = statistics.median(r["reco_s"] for r in runs)
    peer_s = statistics.median(r["peer_s"] for r in runs)
    details = {"machine": info, "rounds": runs, "weights": str(weights), "load_avg_end": load_average(),
               "peer_loop_img_s": round(n / statistics.median(r["peer_loop_s"] for r in runs), 3),
               "timing": "whole command wall clock, median over rounds"}
    return PeerBenchResult(n=n, reco_img_s=round(n / reco_s, 3), peer_img_s=round(n / peer_s, 3),
                           ratio=round(peer_s / reco_s, 4), model=f"{PEER_MODEL} (peer's random-init weights file)",
                           details=details)
