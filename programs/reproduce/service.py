"""One call for the whole reproduction: prepare, run, write the report (and optionally the default checkpoint)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.encoder.base import Encoder
from programs.reproduce.plan import ReproPlan
from programs.reproduce.report import write_report
from programs.reproduce.runner import RunOutput, run_plan
from programs.reproduce.workspace import Workspace, prepare

log = logging.getLogger(__name__)


@dataclass
class Reproduction:
    workspace: Workspace
    output: RunOutput
    json_path: Path
    markdown_path: Path
    meta: dict[str, Any]
    exported: Path | None = None


def run_reproduction(encoder: Encoder, data_root: Path, cache_dir: Path, out_dir: Path, plan: ReproPlan, *,
                     command: str, progress: bool = True, plots: bool = True,
                     export_default: Path | None = None) -> Reproduction:
    started = time.perf_counter()
    previous = torch.get_num_threads()
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    try:
        ws = prepare(encoder, data_root, cache_dir, plan, progress=progress)
        prepared = time.perf_counter() - started
        output = run_plan(ws, plan, encoder, progress=progress)
        meta: dict[str, Any] = {
            "default_variant": output.default_variant,
            "encoder_id": encoder.encoder_id, "dim": encoder.dim, "command": command,
            "cpu_threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - started, 1), "seconds_prepare": round(prepared, 1),
            "near_duplicates": {
                "threshold": ws.threshold,
                "evaluation_images": sum(len(z.image_emb) for z in ws.zero_shot)
                + sum(len(r.image_emb) for r in ws.retrieval),
                "memories": {name: m.counts for name, m in ws.memories.items()},
            },
            "selection": output.selection, "calibration": output.calibration,
            "training": output.training, "diagnostics": output.diagnostics,
        }
        json_path, md_path = write_report(out_dir, output.rows, plan, meta, plots=plots)
        exported = None
        if export_default is not None:
            from programs.reproduce.export import export_default_checkpoint

            exported = export_default_checkpoint(Path(export_default), ws, output, plan, json_path, command=command)
    finally:
        torch.set_num_threads(previous)
    return Reproduction(ws, output, json_path, md_path, meta, exported)
