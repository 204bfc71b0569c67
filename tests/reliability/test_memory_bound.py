"""Defect 1: the peak memory of an ingestion does not grow with the batch.

A manifest lists one large PNG N times. Before the fix every decoded image was kept at full size for the
whole batch (peak RSS grew ~170 MB per copy of a 6000x6500 PNG); now each is downscaled right after
decoding and the decoded bytes in flight share one budget (RECO_INGEST_MAX_RSS_MB).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reliability.conftest import ReliabilitySummary

ROOT = Path(__file__).resolve().parents[2]


def _big_png(path: Path, width: int, height: int) -> None:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.dstack([((x + y) / 2).astype(np.uint8), np.broadcast_to(x.astype(np.uint8), (height, width)),
                     np.broadcast_to(y.astype(np.uint8), (height, width))])
    Image.fromarray(rgb).save(path)


def _peak_rss_mb(manifest: Path, data_dir: Path, extra_env: dict[str, str] | None = None) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    env |= {"RECO_DATA_DIR": str(data_dir), "RECO_CLIP_MODEL": "reco-tiny", "RECO_CLIP_PRETRAINED": "",
            "RECO_DECODE_WORKERS": "2"} | (extra_env or {})
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "ingest", str(manifest), "--json"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else b""))
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    return usage.ru_maxrss / 1024, json.loads(out[0].decode().strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_the_batch(tmp_path: Path, reliability: ReliabilitySummary) -> None:
    image = tmp_path / "big.png"
    _big_png(image, 3000, 3200)  # 9.6 Mpx, 29 MB decoded; compresses to well under 1 MB
    peaks = {}
    for n in (2, 32):
        manifest = tmp_path / f"m{n}.csv"
        manifest.write_text("image,caption\n" + "".join(f"big.png,a big gradient {i % 2}\n" for i in range(n)))
        peaks[n], summary = _peak_rss_mb(manifest, tmp_path / f"data{n}")
        assert summary["seen"] == n and summary["failed"] == 0 and summary["ingested"] == 2, summary
    growth = peaks[32] - peaks[2]
    # before the fix: ~30 copies x 29 MB (+ conversions) = 900+ MB more; now one budget-bound set of decodes
    assert growth < 150, peaks
    reliability.scenario("memory bound (1 PNG of 9.6 Mpx listed 32 times)", submitted=32, embedded=32, failed=0,
                         lost=0, duplicated=0, note=f"peak RSS {peaks[2]:.0f} MB at N=2, {peaks[32]:.0f} MB at N=32")


def test_large_images_are_downscaled_right_after_decoding() -> None:
    from app.imaging import PixelBudget, open_image_safely

    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (4000, 3000), "green").save(buf, fmt)
        budget = PixelBudget(1 << 30)
        small = open_image_safely(buf.getvalue(), fit=224, budget=budget)
        assert min(small.size) >= 448 and min(small.size) < 2 * 448, (fmt, small.size)
        assert small.info["original_size"] == (4000, 3000)
        assert budget.used == 0 and budget.peak > 0
        full = open_image_safely(buf.getvalue())
        assert full.size == (4000, 3000)


def test_the_pixel_budget_serialises_decodes_that_do_not_fit() -> None:
    import time

    from app.imaging import PixelBudget

    budget = PixelBudget(100)
    order: list[str] = []

    def hold(name: str, n: int, wait: float) -> None:
        with budget.hold(n):
            order.append(f"+{name}")
            time.sleep(wait)
            order.append(f"-{name}")

    first = threading.Thread(target=hold, args=("a", 80, 0.3))
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=hold, args=("b", 80, 0.0))
    second.start()
    first.join()
    second.join()
    assert order == ["+a", "-a", "+b", "-b"] and budget.peak == 80
    with budget.hold(500):  # larger than the budget: still decodes, alone
        assert budget.used == 500


def test_batches_are_cut_by_bytes() -> None:
    from app.manifest import InputRow
    from app.services.ingest import PreparedItem
    from ingestion.pipeline import split_by_bytes

    row = InputRow(source="s", path=None, url=None, caption="c")
    items = [PreparedItem(row=row, image_hash="h", size_bytes=1, pixels_uint8=np.zeros((100, 100, 3), np.uint8))
             for _ in range(10)]
    runs = list(split_by_bytes(items, 3 * 30_000 + 1))
    assert [len(r) for r in runs] == [3, 3, 3, 1]
    assert [len(r) for r in split_by_bytes(items, 1)] == [1] * 10


@pytest.mark.parametrize("mode", ["P", "I;16", "RGBA", "L"])
def test_downscale_handles_every_mode(mode: str) -> None:
    from app.imaging import open_image_safely

    buf = io.BytesIO()
    Image.new(mode, (2000, 1800)).save(buf, "PNG")
    small = open_image_safely(buf.getvalue(), fit=100)
    assert small.mode == "RGB" and 200 <= min(small.size) < 400, small.size
