"""Evaluation: the runs stored by ``reco eval`` as a table; CLIP vs RECO per dataset; the k-sweep and
the ablations (Altair)."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from app.db.runs import eval_runs
from ui import evaluation_data as data
from ui import state

PREFERRED_METRICS = ("top1", "t2i_r@1", "i2t_r@1", "top5")


@st.cache_data(ttl=15, show_spinner="Reading evaluation runs …")
def load_runs(url: str, limit: int) -> list[dict[str, Any]]:
    return eval_runs(state.session_factory(url), limit=limit)


def bar_chart(df: pd.DataFrame, x: str, color: str, title: str) -> alt.FacetChart:
    bars = alt.Chart(df).mark_bar().encode(
        x=alt.X(f"{x}:N", title=None, sort=None), y=alt.Y("value:Q", title=title, scale=alt.Scale(domain=[0, 1])),
        color=alt.Color(f"{color}:N"), tooltip=list(df.columns))
    return bars.properties(width=alt.Step(28), height=240).facet(column=alt.Column("dataset:N", title=None))


def sweep_chart(df: pd.DataFrame, title: str) -> alt.FacetChart:
    lines = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("k:Q", title="k' (neighbours at inference)"), y=alt.Y("value:Q", title=title),
        color=alt.Color("mode:N"), tooltip=list(df.columns))
    return lines.properties(width=260, height=220).facet(column=alt.Column("dataset:N", title=None))


def render() -> None:
    settings = state.load_settings()
    st.title("Evaluation")
    limit = st.select_slider("Runs to read", [50, 200, 1000], value=200, key="eval_limit")
    runs = load_runs(settings.resolved_database_url, limit)
    if not runs:
        st.info("No evaluation runs yet: `reco eval --dataset NAME` stores one per (dataset, task).")
        return
    st.subheader("Runs")
    st.dataframe(data.runs_table(runs), hide_index=True, key="eval_runs")
    rows = data.result_rows(runs)
    metrics = sorted(rows["metric"].unique())
    default = next((metrics.index(m) for m in PREFERRED_METRICS if m in metrics), 0)
    metric = st.selectbox("Metric", metrics, index=default, key="eval_metric")

    st.subheader("CLIP vs RECO per dataset")
    st.caption("The newest default run of each dataset; every inference mode.")
    compared = data.clip_vs_reco(rows, metric)
    if compared.empty:
        st.info(f"No default-variant run reports {metric}.")
    else:
        st.altair_chart(bar_chart(compared, "mode", "mode", metric), key="eval_compare")

    st.subheader("k-sweep")
    swept = data.k_sweep(rows, metric)
    if swept.empty:
        st.info("Evaluate one dataset at several k' (`reco eval --k 1`, `--k 5`, `--k 10` …) to see the sweep.")
    else:
        st.altair_chart(sweep_chart(swept, metric), key="eval_sweep")

    st.subheader("Ablations")
    ablated = data.ablation(rows, metric)
    if ablated.empty:
        st.info("No ablation runs yet (`reco eval --mean-fusion`, `--search cross`, `--fusion uni`, `--no-dedupe`; "
                "the synthetic evaluation adds mean-fusion and shuffled-memory controls).")
    else:
        st.altair_chart(bar_chart(ablated, "variant", "variant", metric), key="eval_ablation")


render()
