"""Memory: what the memory holds, to look at. A thumbnail grid (caption, class name, dataset) with caption
search and filters, a table, and a 2-D map of the image vectors (PCA, coloured by class or dataset) with a
query and its nearest images marked. Every item has a URL of its own (``/memory?item=ID``: shareable,
the browser's Back returns to where you were) showing its image, fields, status under every embedding
version and its own neighbours."""

from __future__ import annotations

import math
from typing import Any

import streamlit as st

from app.config import Settings
from app.db.models import Item
from app.imaging import ImageRejected
from app.memory.base import MemoryStoreError
from app.services.memory_map import MapQuery, MemoryMap
from ui import components, state
from ui.backend import Neighbour

ANY = "(any)"
PAGE_SIZES = [20, 50, 100]
NEIGHBOURS = 8
VIEWS = ["Grid", "Table", "Map"]
GRID_COLUMNS = 5


def item_filters(settings: Settings) -> dict[str, Any]:
    url = settings.resolved_database_url
    left, middle, right = st.columns([1, 1, 2])
    dataset = left.selectbox("Dataset", [ANY, *state.distinct_values(url, "dataset")], key="memory_dataset")
    split = middle.selectbox("Split", [ANY, *state.distinct_values(url, "split")], key="memory_split")
    text = right.text_input("Caption contains", key="memory_q", placeholder="e.g. red dress").strip()
    filters = {k: v for k, v in (("dataset", dataset), ("split", split)) if v != ANY}
    if text:
        filters["_caption"] = text
    return filters


@st.cache_data(ttl=60, show_spinner=False)
def class_names(url: str, dataset: str) -> list[str] | None:
    """A dataset's class names (its classes.txt) as the serving service finds them."""
    from app.services.serving import class_sets

    path = class_sets(state.load_settings()).get(dataset)
    if path is None:
        return None
    from app.manifest import load_classes

    try:
        return load_classes(path)
    except Exception:  # noqa: BLE001 - an unreadable classes.txt: numbers instead of names
        return None


def label_of(item: Item, settings: Settings) -> str | None:
    if item.label is None:
        return None
    names = class_names(settings.resolved_database_url, item.dataset) if item.dataset else None
    return names[item.label] if names and 0 <= item.label < len(names) else str(item.label)


def render_browser(settings: Settings) -> None:
    st.title("Memory")
    st.caption("What the memory holds: browse it, search its captions, see it as a map. Open an item for its "
               "own page (a URL you can share).")
    repo = state.repo(settings)
    view = st.radio("View", VIEWS, horizontal=True, key="memory_view")
    filters = item_filters(settings)
    caption = filters.pop("_caption", None)
    if view == "Map":
        render_map(settings, filters)
        return
    _, total = repo.list_items(filters=filters, limit=0, caption_contains=caption)
    left, right = st.columns(2)
    size = left.selectbox("Items per page", PAGE_SIZES, key="memory_page_size")
    pages = max(1, math.ceil(total / size))
    if st.session_state.get("memory_page", 1) > pages:  # the filters shrank the list under the current page
        st.session_state["memory_page"] = 1
    page = int(right.number_input(f"Page (of {pages})", 1, pages, 1, key="memory_page"))
    items, total = repo.list_items(filters=filters, offset=(page - 1) * size, limit=size, caption_contains=caption)
    st.caption(f"{total} items · page {page} of {pages}" + (f" · captions containing “{caption}”" if caption else ""))
    if not items:
        empty = "No items: ingest something on the Ingestion page (or `reco ingest SOURCE`)."
        st.info(empty if not (filters or caption) else "No item matches these filters.")
        return
    if view == "Grid":
        show_grid(items, settings)
    else:
        rows = [{"id": i.id, "caption": i.caption, "dataset": i.dataset, "split": i.split, "label": i.label,
                 "class": label_of(i, settings), "source": i.source_uri, "added": i.created_at} for i in items]
        event = st.dataframe(rows, hide_index=True, on_select="rerun", selection_mode="single-row",
                             key="memory_table")
        selected = getattr(getattr(event, "selection", None), "rows", None)
        if selected:
            _open(items[selected[0]].id)
    captions = {i.id: f"{i.caption[:80]} · {i.id[:8]}" for i in items}
    choice = st.selectbox("Open an item", list(captions), format_func=captions.__getitem__, key="memory_choice")
    if st.button("Open item", key="memory_open"):
        _open(choice)


def link(href: str, text: str, title: str) -> None:
    """A plain link in this tab: a page load the browser keeps in its history (Back and Forward work, the
    address can be shared). Streamlit's page links do not carry query parameters to the page they are on."""
    from html import escape

    st.markdown(f'<a href="{escape(href)}" target="_self" title="{escape(title)}">{escape(text)}</a>',
                unsafe_allow_html=True)


def show_grid(items: list[Item], settings: Settings) -> None:
    with st.spinner("Loading thumbnails …"):
        for start in range(0, len(items), GRID_COLUMNS):
            for cell, item in zip(st.columns(GRID_COLUMNS), items[start: start + GRID_COLUMNS], strict=False):
                with cell:
                    image = components.thumbnail(item.source_uri, settings)
                    text = item.caption if len(item.caption) <= 90 else item.caption[:87] + "…"
                    st.image(image or components.placeholder(), width="stretch",
                             alt=f"memory item: {text}" if image else "memory item: image missing")
                    st.caption(text or "_no caption_")
                    name = label_of(item, settings)
                    st.caption(" · ".join(x for x in (f"class **{name}**" if name else None, item.dataset,
                                                       item.split) if x))
                    link(f"memory?item={item.id}", "Open", f"item {item.id}")


# --- the map ------------------------------------------------------------------------------------------------
def render_map(settings: Settings, filters: dict[str, Any]) -> None:
    st.caption("Each point is an image of the memory, placed by the two main directions of its image vectors "
               "(PCA); nearby points look alike to the encoder. Mark a query — an item or an image — to see "
               "where it falls and which images are its nearest.")
    left, middle, right = st.columns([2, 2, 1])
    near = middle.text_input("Query: an item id", key="memory_map_item",
                             value=str(st.query_params.get("near", "")))
    upload = left.file_uploader(f"Query: an image ({components.ACCEPTED_IMAGES})", key="memory_map_image")
    colour = right.radio("Colour by", ["class", "dataset"], key="memory_map_colour")
    data = None
    if upload is not None:
        data = upload.getvalue()
        problem = components.check_image_upload(upload.name, data, settings)
        if problem:
            st.error(problem)
            data = None
    query = MapQuery(filters={k: v for k, v in filters.items() if k != "_caption"},
                     item_id=near.strip() or None if data is None else None, k=NEIGHBOURS)
    try:
        with st.spinner("Projecting the memory …"):
            found: MemoryMap = state.service(settings).memory_map(query, data)
    except ImageRejected as exc:
        st.error(components.rejection_message(upload.name if upload else "the image", exc.reason, exc.detail))
        return
    except LookupError as exc:
        st.info(str(exc))
        return
    except MemoryStoreError as exc:
        st.error(str(exc))
        return
    if not found.points:
        st.info("No image under these filters.")
        return
    st.altair_chart(map_chart(found, colour), use_container_width=True)
    shown = len(found.points)
    st.caption(f"{found.total} images" + (f" (a sample of {shown} shown)" if found.total > shown else "") +
               f" · axes explain {found.explained[0]:.0%} and {found.explained[1]:.0%} of the variance")
    if found.query is not None:
        neighbours = sorted((p for p in found.points if p.role == "neighbour"), key=lambda p: -(p.score or 0))
        st.markdown(f"##### The query's {len(neighbours)} nearest images (ringed on the map)")
        components.neighbour_grid([Neighbour(item_id=p.item_id, caption=p.caption, score=p.score or 0.0,
                                             source=p.source, dataset=p.dataset, label=p.label,
                                             label_name=p.label_name) for p in neighbours],
                                  settings, key="memory-map-nb")


def map_chart(found: MemoryMap, colour: str) -> Any:
    import altair as alt

    field = "label_name" if colour == "class" else "dataset"
    rows = [{"x": p.x, "y": p.y, "caption": p.caption, "dataset": p.dataset or "?",
             "label_name": p.label_name or (str(p.label) if p.label is not None else "?"),
             "role": p.role, "similarity": p.score, "item": p.item_id} for p in found.points]
    base = alt.Chart(alt.Data(values=rows)).encode(
        x=alt.X("x:Q", title="PC 1"), y=alt.Y("y:Q", title="PC 2"),
        tooltip=["caption:N", "label_name:N", "dataset:N", "item:N", "similarity:Q"])
    layers = [base.mark_circle(size=45, opacity=0.75).encode(color=alt.Color(f"{field}:N", title=colour))]
    neighbours = [r for r in rows if r["role"] == "neighbour"]
    if neighbours:
        layers.append(alt.Chart(alt.Data(values=neighbours)).mark_point(
            size=260, shape="circle", filled=False, strokeWidth=2.5, color="black").encode(
            x="x:Q", y="y:Q", tooltip=["caption:N", "label_name:N", "similarity:Q"]))
    if found.query is not None:
        q = found.query
        layers.append(alt.Chart(alt.Data(values=[{"x": q.x, "y": q.y, "caption": q.caption or "query"}])).mark_point(
            size=600, shape="diamond", filled=True, color="red", stroke="black", strokeWidth=1.5).encode(
            x="x:Q", y="y:Q", tooltip=["caption:N"]))
    return alt.layer(*layers).properties(height=560).interactive()


# --- one item -------------------------------------------------------------------------------------------------
def _open(item_id: str) -> None:
    st.query_params["item"] = item_id
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
        name = label_of(item, settings)
        if name is not None:
            st.markdown(f"**Class** — {name}")
        st.dataframe([
            {"field": "item id", "value": item.id}, {"field": "source", "value": item.source_uri},
            {"field": "content hash", "value": item.content_hash}, {"field": "image hash", "value": item.image_hash},
            {"field": "dataset / split / label", "value": f"{item.dataset} / {item.split} / {item.label}"},
            {"field": "size", "value": f"{item.size_bytes} bytes, {item.width}×{item.height} px"},
            {"field": "added", "value": str(item.created_at)},
        ], hide_index=True, key="memory_item_fields")
        st.caption(f"This item's address: `?item={item.id}` on the Memory page.")
        link(f"memory?near={item.id}&view=map", "Show it on the memory map", "the map, this item as the query")


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
    if st.query_params.get("view") == "map":  # a link to the map (from an item's page)
        st.session_state["memory_view"] = "Map"
        st.query_params.pop("view", None)
    item_id = st.query_params.get("item")
    if not item_id and st.session_state.get(state.ITEM_KEY):  # opened from another page's state
        item_id = st.session_state.pop(state.ITEM_KEY)
        st.query_params["item"] = str(item_id)  # the address bar names the item: shareable
    if item_id:
        render_item(settings, str(item_id))
    else:
        render_browser(settings)


render()
