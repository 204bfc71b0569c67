"""Predict: what is in an uploaded image — CLIP's zero-shot top-5 beside RECO's, and the memory
neighbours whose captions the fusion attended to (the explanation of the change)."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import streamlit as st

from app.config import Settings
from app.imaging import ImageLimits, ImageRejected, open_image_safely
from app.manifest import ManifestError, load_classes
from app.memory.base import MemoryStoreError
from app.schemas import RefineMode
from app.services.method_common import MethodError
from ui import components, state
from ui.backend import PredictView

CACHE_KEY = "predict_cache"
MAX_CACHED = 32
RECO_MODES = [str(RefineMode.BOTH), str(RefineMode.IMAGE), str(RefineMode.TEXT)]
PREFERRED_SET = "clothing10"  # the bundled sample's classes: what the demo memory holds


def split_labels(text: str) -> list[str]:
    labels = [s.strip() for s in re.split(r"[,\n]", text) if s.strip()]
    return list(dict.fromkeys(labels))


def choose_classes(settings: Settings) -> list[str]:
    sets = state.class_sets(state.class_set_roots(settings))
    how = st.radio("Class set", ["Dataset classes", "Labels typed in"], horizontal=True,
                   index=0 if sets else 1, key="predict_class_source")
    if how == "Dataset classes":
        if not sets:
            st.info("No dataset with a classes.txt was found: type the labels instead.")
            return []
        names = sorted(sets)
        default = names.index(PREFERRED_SET) if PREFERRED_SET in names else 0
        name = st.selectbox("Dataset", names, index=default, key="predict_dataset")
        try:
            return load_classes(Path(sets[name]))
        except ManifestError as exc:
            st.error(str(exc))
            return []
    return split_labels(st.text_area("Labels (comma or newline separated)", "dog, cat, bird, car, flower",
                                     key="predict_labels"))


@st.cache_data(max_entries=64, show_spinner=False)
def preview(digest: str, _data: bytes, max_bytes: int, max_pixels: int) -> bytes:
    image = open_image_safely(_data, ImageLimits(max_bytes=max_bytes, max_pixels=max_pixels))
    image.thumbnail((384, 384))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def predict_cached(settings: Settings, name: str, data: bytes, classes: list[str], mode: str, k: int) -> PredictView:
    """One prediction per (settings, image, classes, mode, k) per session: reruns do not recompute."""
    key = (state.fingerprint(settings), hashlib.sha256(data).hexdigest(), tuple(classes), mode, k)
    cache: dict[tuple[object, ...], PredictView] = st.session_state.setdefault(CACHE_KEY, {})
    if key not in cache:
        with st.spinner(f"Predicting {name} …"):
            cache[key] = state.backend(settings).predict(data, classes, RefineMode(mode), k)
        while len(cache) > MAX_CACHED:
            cache.pop(next(iter(cache)))
    return cache[key]


def show_prediction(index: int, name: str, data: bytes, view: PredictView, settings: Settings) -> None:
    st.divider()
    left, right = st.columns([1, 3])
    with left:
        digest = hashlib.sha256(data).hexdigest()
        st.image(preview(digest, data, settings.max_image_bytes, settings.max_image_pixels), width="stretch",
                 alt=f"uploaded image {name}")
        st.caption(f"{name} · encoder `{view.encoder_id}` · {view.via}")
        if view.checkpoint:
            st.caption(f"fusion checkpoint `{view.checkpoint}`")
    with right:
        components.compare_top_k(view.clip, view.reco, reco_label=f"mode {view.mode}, k={view.k}",
                                 why_not=view.reco_unavailable)
    if view.neighbours:
        st.markdown("##### Neighbours from the memory (why RECO answered as it did)")
        kept = f"{view.self_attention:.1%}" if view.self_attention is not None else "?"
        st.caption(f"Image→image search found these {len(view.neighbours)} items; the fusion kept {kept} of its "
                   "attention on the query itself and spread the rest over their captions (attention below).")
        components.neighbour_grid(view.neighbours, settings, key=f"predict-{index}")
    elif view.reco is not None and view.mode == RefineMode.TEXT:
        st.caption("Mode `text` refines only the class prompts: the image itself retrieved no neighbours.")


def predict_one(index: int, name: str, data: bytes, classes: list[str], mode: str, k: int,
                settings: Settings) -> None:
    problem = components.check_image_upload(name, data, settings)
    if problem:
        st.error(problem)
        return
    try:
        view = predict_cached(settings, name, data, classes, mode, k)
    except ImageRejected as exc:
        st.error(components.rejection_message(name, exc.reason, exc.detail))
        return
    except (MethodError, MemoryStoreError, LookupError, ValueError) as exc:
        st.error(f"**{name}**: no prediction — {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - a worker timeout or a broker error: say it, keep the page alive
        st.error(f"**{name}**: the prediction failed — {type(exc).__name__}: {exc}")
        return
    show_prediction(index, name, data, view, settings)


def render() -> None:
    settings = state.load_settings()
    st.title("Predict")
    st.caption("Zero-shot classification: CLIP alone, and RECO (CLIP refined with what it retrieves from the memory).")
    upload, options = st.columns([3, 2])
    with options:
        classes = choose_classes(settings)
        mode = st.selectbox("RECO mode", RECO_MODES, key="predict_mode",
                            help="both = refine image and class prompts (paper's best for classification)")
        k = int(st.number_input("Neighbours k'", 1, 100, settings.k_infer, key="predict_k"))
    with upload:
        label = (f"Images ({components.ACCEPTED_IMAGES}; up to {settings.max_image_bytes / 2**20:g} MiB and "
                 f"{settings.max_image_pixels / 1e6:g} Mpx each)")
        files = st.file_uploader(label, accept_multiple_files=True, key="predict_files") or []
    if not classes:
        st.info("Choose a class set to classify against.")
        return
    if not files:
        st.info(f"Upload an image to classify it against {len(classes)} classes.")
        return
    if len(files) > settings.upload_max_files:
        st.warning(f"Only the first {settings.upload_max_files} of {len(files)} files are classified.")
    for index, file in enumerate(files[: settings.upload_max_files]):
        predict_one(index, file.name, file.getvalue(), classes, mode, k, settings)


render()
