"""Memory: the items, paged and filtered; an item's page with its image, caption, source, hashes,
status under every embedding version, and its own neighbours in the live memory."""

from __future__ import annotations

import math
from typing import Any

import streamlit as st

from app.config import Settings
from app.db.models import Item
from app.memory.base import MemoryStoreError
from ui import components, state
from ui.backend import Neighbour

ANY = "(any)"
PAGE_SIZES = [20, 50, 100]
NEIGHBOURS = 8


def item_filters(settings: Settings) -> dict[str, Any]:
    url = settings.resolved_database_url
    left, right = st.columns(2)
    dataset = left.selectbox("Dataset", [ANY, *state.distinct_values(url, "dataset")], key="memory_dataset")
    split = right.selectbox("Split", [ANY, *state.distinct_values(url, "split")], key="memory_split")
    return {k: v for k, v in (("dataset", dataset), ("split", split)) if v != ANY}


def render_browser(settings: Settings) -> None:
    st.title("Memory")
    repo = state.repo(settings)
    filters = item_filters(settings)
    _, total = repo.list_items(filters=filters, limit=0)
    left, right = st.columns(2)
    size = left.selectbox("Items per page", PAGE_SIZES, key="memory_page_size")
    pages = max(1, math.ceil(total / size))
    if st.session_state.get("memory_page", 1) > pages:  # the filters shrank the list under the current page
        st.session_state["memory_page"] = 1
    page = int(right.number_input(f"Page (of {pages})", 1, pages, 1, key="memory_page"))
    items, total = repo.list_items(filters=filters, offset=(page - 1) * size, limit=size)
    st.caption(f"{total} items · page {page} of {pages}")
    if not items:
        st.info("No items: ingest something on the Ingestion page (or `reco ingest SOURCE`).")
        return
    rows = [{"id": i.id, "caption": i.caption, "dataset": i.dataset, "split": i.split, "label": i.label,
             "source": i.source_uri, "added": i.created_at} for i in items]
    event = st.dataframe(rows, hide_index=True, on_select="rerun", selection_mode="single-row", key="memory_table")
    selected = getattr(getattr(event, "selection", None), "rows", None)
    if selected:
        _open(items[selected[0]].id)
    captions = {i.id: f"{i.caption[:80]} · {i.id[:8]}" for i in items}
    choice = st.selectbox("Open an item", list(captions), format_func=captions.__getitem__, key="memory_choice")
    if st.button("Open item", key="memory_open"):
        _open(choice)


def _open(item_id: str) -> None:
    st.session_state[state.ITEM_KEY] = item_id
    st.rerun()


def _close() -> None:
    st.session_state.pop(state.ITEM_KEY, None)
    st.session_state.pop("memory_table", None)  # else the table's row selection would reopen the item
    st.query_params.pop("item", None)


def show_details(item: Item, settings: Settings) -> None:
    left, right = st.columns([1, 2])
    with left:
        image = components.thumbnail(item.source_uri, settings, side=512)
        st.image(image or components.placeholder(), width="stretch", alt=f"item image: {item.caption[:80]}")
        if image is None:
            st.warning("The source file is gone or unreadable: showing a placeholder.")
    with right:
        st.markdown(f"**Caption** — {item.caption}")
        st.dataframe([
            {"field": "item id", "value": item.id}, {"field": "source", "value": item.source_uri},
            {"field": "content hash", "value": item.content_hash}, {"field": "image hash", "value": item.image_hash},
            {"field": "dataset / split / label", "value": f"{item.dataset} / {item.split} / {item.label}"},
            {"field": "size", "value": f"{item.size_bytes} bytes, {item.width}×{item.height} px"},
            {"field": "added", "value": str(item.created_at)},
        ], hide_index=True, key="memory_item_fields")


def show_versions(item: Item, settings: Settings) -> None:
    repo = state.repo(settings)
    versions = {v.encoder_id: v for v in repo.versions()}
    rows = []
    for e in repo.item_embeddings(item.id):
        version = versions.get(e.encoder_id)
        rows.append({"encoder": e.encoder_id, "collection": version.collection if version else None,
                     "live": bool(version and version.is_live), "status": e.status, "reason": e.reason,
                     "detail": e.detail, "attempts": e.attempts, "updated": e.updated_at})
    st.subheader("Embedding versions")
    if rows:
        st.dataframe(rows, hide_index=True, key="memory_item_versions")
    else:
        st.info("No embedding status recorded for this item.")


def item_neighbours(item: Item, settings: Settings) -> list[Neighbour]:
    """Its neighbours in the live memory (image->image, other images), from the serving service."""
    return list(state.service(settings).neighbours_of_item(item.id))


def show_neighbours(item: Item, settings: Settings) -> None:
    st.subheader("Its neighbours in the memory")
    try:
        with st.spinner("Searching the memory …"):
            found = item_neighbours(item, settings)
    except MemoryStoreError as exc:
        st.error(str(exc))
        return
    if not found:
        st.info("This item is not in the live collection (not embedded under the live version).")
        return
    fused = any(n.attention is not None for n in found)
    st.caption("Image→image search; attention = the fusion's weight on each neighbour when refining this item's "
               "image." if fused else "Image→image search (no fusion checkpoint for the live encoder: no attention).")
    components.neighbour_grid(found, settings, key="memory-nb")


def render_item(settings: Settings, item_id: str) -> None:
    if st.button("← Back to the list", key="memory_back"):
        _close()
        st.rerun()
    items = state.repo(settings).get_items([item_id])
    if not items:
        st.error(f"No item with id {item_id}.")
        return
    st.title("Memory item")
    show_details(items[0], settings)
    show_versions(items[0], settings)
    show_neighbours(items[0], settings)


def render() -> None:
    settings = state.load_settings()
    item_id = st.session_state.get(state.ITEM_KEY) or st.query_params.get("item")
    if item_id:
        render_item(settings, str(item_id))
    else:
        render_browser(settings)


render()
