"""Operations: which encoder and fusion checkpoint are live (and whether the weights are random), the
collections and the alias, re-embedding progress, and — when Celery is configured — queues and workers."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app.config import Settings
from app.memory.base import MemoryStoreError
from app.services.reembed import fusion_status, versions_report
from ui import ops, state


def show_encoder(settings: Settings) -> None:
    st.subheader("Encoder and fusion")
    repo = state.repo(settings)
    try:
        with st.spinner("Loading the encoder …"):
            client = state.server_client(settings)  # a server has it loaded: no second copy of the weights here
            configured = (client.status()["serving"]["encoder_id"] if client is not None
                          else state.encoder(settings).encoder_id)
    except Exception as exc:  # noqa: BLE001 - unknown tag, missing checkpoint file: say it, keep the page
        st.error(f"The configured encoder cannot be loaded: {type(exc).__name__}: {exc}")
        configured = f"{settings.clip_model} (not loadable)"
    fusion = fusion_status(repo)
    if settings.is_random_init:
        st.error(f"The encoder `{settings.clip_model}` has **RANDOM weights** (RECO_CLIP_PRETRAINED is empty): "
                 "its embeddings, and every number computed from them, are meaningless.")
    st.dataframe([
        {"what": "configured encoder", "value": configured},
        {"what": "pretrained", "value": settings.clip_pretrained or "(none: RANDOM weights)"},
        {"what": "live encoder (alias)", "value": fusion["live_encoder_id"] or "(none yet)"},
        {"what": "live collection", "value": fusion["collection"] or "(none yet)"},
        {"what": "fusion checkpoint", "value": f"{fusion['checkpoint_id']}: {fusion['checkpoint_path']}"
         if fusion["checkpoint_id"] else "(none)"},
    ], hide_index=True, key="ops_encoder")
    if fusion["live_encoder_id"] and fusion["live_encoder_id"] != configured:
        st.warning(f"The configured encoder `{configured}` is not the live one `{fusion['live_encoder_id']}`: "
                   "re-embed (`reco reembed`) or configure the live model.")
    if fusion["retraining_required"]:
        st.warning("No fusion checkpoint for the live encoder: RECO answers are unavailable until `reco train`.")


def show_memory(settings: Settings) -> None:
    st.subheader("Collections and alias")
    try:
        with st.spinner("Reading the memory …"):
            status = state.service(settings).status()
    except MemoryStoreError as exc:
        st.error(str(exc))
        return
    alias = status["alias"]
    memory = status["memory"]
    st.markdown(f"Alias `{alias['name']}` → `{alias['collection'] or '(unset)'}` · {status['items']} items in the "
                f"metadata DB ({status['database']}) · memory: {memory['backend']} `{memory['location']}`")
    st.dataframe([{"collection": name, "points": count, "live": name == alias["collection"]}
                  for name, count in status["collections"].items()], hide_index=True, key="ops_collections")
    counts = [{"encoder": enc, **by_status} for enc, by_status in status["status"].items()]
    if counts:
        st.dataframe(counts, hide_index=True, key="ops_status_counts")


def show_reembed(settings: Settings) -> None:
    st.subheader("Re-embedding")
    report = versions_report(settings, state.repo(settings))
    if not report["versions"]:
        st.info("No embedding version yet.")
        return
    for v in report["versions"]:
        total, done = v["total"], v["done"]
        if total:
            label = f"`{v['encoder_id']}` · {v['status']} · {done}/{total} re-embedded"
        else:
            label = f"`{v['encoder_id']}` · {v['status']} · filled by ingestion (no re-embedding run)"
        st.progress(min(1.0, done / total) if total else (1.0 if v["live"] else 0.0), text=label)
    if report["missing_from_live"]:
        st.warning(f"{report['missing_from_live']} items are embedded under another version but not the live one.")


def show_workers(settings: Settings) -> None:
    st.subheader("Workers")
    if not settings.ui_use_workers:
        st.info("Celery not configured: this UI predicts, searches and ingests in its own process. Set "
                "RECO_UI_USE_WORKERS=true (with RECO_BROKER_URL) to use the workers and see their queues here.")
        return
    if not ops.broker_reachable(settings.broker_url):
        st.error(f"The broker at `{_redacted(settings.broker_url)}` is unreachable.")
        return
    app = state.celery_app(settings)
    with st.spinner("Asking the broker and the workers …"):
        queues, health = ops.queue_lengths(app), ops.worker_health(app)
        stats: dict[str, Any] | None = None
        try:
            stats = ops.refine_stats(app)
        except Exception as exc:  # noqa: BLE001 - no refine worker answered in time
            st.warning(f"No refine worker answered: {type(exc).__name__}: {exc}")
    st.dataframe([{"queue": q, "messages waiting": n} for q, n in queues.items()], hide_index=True, key="ops_queues")
    if health:
        st.dataframe([{"worker": w, "ping": a} for w, a in health.items()], hide_index=True, key="ops_workers")
    else:
        st.warning("No worker answered the ping.")
    if stats:
        st.json(stats, expanded=False)


def _redacted(url: str) -> str:
    from app.db.urls import hide_password

    try:
        return hide_password(url)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy-style URL: drop everything before the host
        return url.rsplit("@", 1)[-1]


def render() -> None:
    settings = state.load_settings()
    st.title("Operations")
    st.button("Refresh", key="ops_refresh")
    show_encoder(settings)
    show_memory(settings)
    show_reembed(settings)
    show_workers(settings)


render()
