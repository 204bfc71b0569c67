"""Evaluation page: runs from the DB as a table; CLIP vs RECO, k-sweep and ablation charts (Altair)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamlit.testing.v1 import AppTest

from app.config import get_settings
from app.db.runs import eval_runs, store_eval_run
from app.services.method_common import session_factory_for
from tests.ui.conftest import UI_APP
from ui import evaluation_data as data

MODES = ("clip", "image", "text", "both")


def report(dataset: str, k: int, base: float) -> dict[str, Any]:
    rows = [{"dataset": dataset, "task": "zeroshot", "metric": metric, "mode": mode,
             "value": min(1.0, base + 0.05 * i + (0.1 if metric == "top5" else 0.0))}
            for metric in ("top1", "top5") for i, mode in enumerate(MODES)]
    return {"results": rows, "memory_size": 40, "k": k, "encoder_id": "reco-tiny/random/s0",
            "checkpoint": "1:fusion.safetensors", "near_duplicates_removed": 2}


def store_runs() -> list[dict[str, Any]]:
    factory = session_factory_for(get_settings())
    for k, base in ((4, 0.30), (8, 0.35), (16, 0.33)):
        store_eval_run(factory, report("clothing10", k, base), checkpoint_id=None, options={"fusion": "trained"})
    store_eval_run(factory, report("clothing10", 8, 0.2), checkpoint_id=None, options={"fusion": "mean"})
    store_eval_run(factory, report("synthetic/shuffled-memory", 10, 0.1), checkpoint_id=None, options={})
    return eval_runs(factory)


def evaluation_page() -> AppTest:
    at = AppTest.from_file(str(UI_APP), default_timeout=60).run()
    return at.switch_page("views/evaluation.py").run()


def test_empty(empty_ui_data: Path) -> None:
    at = evaluation_page()
    assert not at.exception, at.exception
    assert at.title[0].value == "Evaluation" and any("No evaluation runs yet" in i.value for i in at.info)


def test_runs_table_and_charts(empty_ui_data: Path) -> None:
    store_runs()
    at = evaluation_page()
    assert not at.exception and not at.error, at.exception
    table = at.dataframe[0].value
    assert len(table) == 5 and set(table["variant"]) == {"RECO (default)", "mean fusion", "shuffled-memory"}
    assert at.selectbox(key="eval_metric").value == "top1"
    charts = at.get("vega_lite_chart")
    assert len(charts) == 3, "CLIP vs RECO, k-sweep, ablation"
    assert not at.info


def test_data_views(empty_ui_data: Path) -> None:
    rows = data.result_rows(store_runs())
    compared = data.clip_vs_reco(rows, "top1")
    assert set(compared["dataset"]) == {"clothing10"} and set(compared["mode"]) == set(MODES)
    assert set(compared["k"]) == {16}  # the newest default run
    swept = data.k_sweep(rows, "top1")
    assert sorted(swept["k"].unique()) == [4, 8, 16] and len(swept) == 12
    ablated = data.ablation(rows, "top1").set_index("variant")["value"]
    assert set(ablated.index) == {"CLIP", "RECO (default)", "mean fusion"}  # synthetic has one variant only
    assert abs(ablated["RECO (default)"] - 0.48) < 1e-9 and abs(ablated["mean fusion"] - 0.35) < 1e-9
    assert data.variant_of({"search_modality": "cross", "dedupe": False}, "x") == "cross-modal search + no dedupe"
