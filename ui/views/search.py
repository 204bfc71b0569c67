"""Search: a text or image query over the memory — plain CLIP or RECO-refined — filtered on dataset,
split and source (payload-indexed fields); every result opens its item page."""

from __future__ import annotations

from typing import Any

import streamlit as st
from pydantic import ValidationError

from app.config import Settings
from app.imaging import ImageRejected
from app.memory.base import MemoryStoreError
from app.services.method_common import MethodError
from ui import components, state
from ui.backend import SearchQuery, SearchView

RESULTS_KEY = "search_results"
ANY = "(any)"


def choose_filters(settings: Settings) -> dict[str, Any]:
    url = settings.resolved_database_url
    left, middle, right = st.columns(3)
    dataset = left.selectbox("Dataset", [ANY, *state.distinct_values(url, "dataset")], key="search_dataset")
    split = middle.selectbox("Split", [ANY, *state.distinct_values(url, "split")], key="search_split")
    source = right.text_input("Source (exact path)", key="search_source").strip()
    filters: dict[str, Any] = {}
    if dataset != ANY:
        filters["dataset"] = dataset
    if split != ANY:
        filters["split"] = split
    if source:
        filters["source"] = source
    return filters


TARGETS = {"Images": "image", "Captions": "text"}  # what a query ranks: images first (similar images)


def build_query(kind: str, text: str, upload: Any, filters: dict[str, Any], settings: Settings,
                target: str | None = None) -> SearchQuery | None:
    if kind == "Text":
        if not text.strip():
            st.error("Type a text query.")
            return None
        return SearchQuery(text=text.strip(), filters=filters, target=target)
    if upload is None:
        st.error("Upload an image to search with.")
        return None
    data = upload.getvalue()
    problem = components.check_image_upload(upload.name, data, settings)
    if problem:
        st.error(problem)
        return None
    return SearchQuery(image_bytes=data, filters=filters, target=target)


def run_search(settings: Settings, query: SearchQuery, reco: bool, k: int, label: str) -> None:
    try:
        with st.spinner("Searching …"):
            view = state.backend(settings).search(query, reco=reco, k=k)
    except ImageRejected as exc:
        st.error(components.rejection_message(label, exc.reason, exc.detail))
        return
    except LookupError as exc:
        st.info(str(exc))
        return
    except (MethodError, MemoryStoreError, ValidationError, ValueError) as exc:
        st.error(f"The search failed — {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - a worker timeout or a broker error: say it, keep the page alive
        st.error(f"The search failed — {type(exc).__name__}: {exc}")
        return
    st.session_state[RESULTS_KEY] = (label, view, query.image_bytes)


def show_results(settings: Settings) -> None:
    stored: tuple[str, SearchView, bytes | None] | None = st.session_state.get(RESULTS_KEY)
    if stored is None:
        return
    label, view, image = stored
    if image is not None:  # the query itself, above what it found
        left, right = st.columns([1, 6])
        try:
            shown = components.small_image(image, settings)
        except ImageRejected:
            shown = None
        left.image(shown or components.placeholder(), width="stretch", alt=f"query image {label}")
        right.markdown(f"**Query:** {label}")
        right.caption("Images: the memory's most similar images (image→image); Captions: the captions closest "
                      "to the image (image→text). One result per image, with all its captions.")
    if view.reco_unavailable:
        st.warning(f"RECO is unavailable, these are CLIP's results: {view.reco_unavailable}")
    how = "RECO (query refined)" if view.reco else "CLIP"
    st.markdown(f"##### {len(view.results)} results for {label} · {view.query_modality}→{view.target} · {how}")
    components.neighbour_grid(view.results, settings, key="search-result")
    if view.reco and view.neighbours:
        kept = f"{view.self_attention:.1%}" if view.self_attention is not None else "?"
        with st.expander(f"What refined the query: {len(view.neighbours)} neighbours (query kept {kept} attention)"):
            components.neighbour_grid(view.neighbours, settings, key="search-explain")


def render() -> None:
    settings = state.load_settings()
    st.title("Search")
    kind = st.radio("Query by", ["Text", "Image"], horizontal=True, key="search_kind")
    with st.form("search_form"):
        text, upload = "", None
        if kind == "Text":
            text = st.text_input("Text query", placeholder="a photo of a red dress", key="search_text")
        else:
            upload = st.file_uploader(f"Image query ({components.ACCEPTED_IMAGES})", key="search_image")
        left, middle, right = st.columns(3)
        mode = left.radio("Mode", ["clip", "RECO"], horizontal=True, key="search_mode")
        ranked = middle.radio("Rank", list(TARGETS), horizontal=True, key="search_target",
                              help="Images: the memory's image vectors; Captions: its caption vectors")
        k = right.slider("Results k", 1, 50, 10, key="search_k")
        filters = choose_filters(settings)
        submitted = st.form_submit_button("Search", type="primary")
    if submitted:
        query = build_query(kind, text, upload, filters, settings, TARGETS[ranked])
        if query is not None:
            label = f"“{query.text}”" if query.text else f"image {upload.name if upload else ''}"
            run_search(settings, query, mode == "RECO", k, label)
    show_results(settings)


render()
