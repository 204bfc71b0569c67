"""The README's first command, minus the UI: `reco demo --no-ui --json` on embedded defaults, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_offline_and_reports_clip_vs_reco(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    env |= {"RECO_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "app.cli", "demo", "--no-ui", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ingest"]["ingested"] == result["ingest"]["seen"] == 800
    modes = {r["mode"] for r in result["evaluation"]["results"] if r["metric"] == "top1"}
    assert modes == {"clip", "image", "text", "both"}
    assert all(0.0 <= r["value"] <= 1.0 for r in result["evaluation"]["results"])
    # the committed base encoder, not random weights; and the demo's point: the sample's memory helps
    assert result["encoder"]["random_weights"] is False and result["encoder"]["model"] == "reco-base"
    top1 = {r["mode"]: r["value"] for r in result["evaluation"]["results"] if r["metric"] == "top1"}
    assert max(top1["text"], top1["both"]) > top1["clip"] + 0.05, top1
    assert Path(result["checkpoint"]["path"]).is_file()
    # idempotent second run: nothing re-ingested, the checkpoint is reused, not retrained
    again = subprocess.run([sys.executable, "-m", "app.cli", "demo", "--no-ui", "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["ingest"]["ingested"] == 0 and second["ingest"]["duplicates"] == 800
    assert second["checkpoint"]["origin"] in {"registered", "committed", "configured"}
