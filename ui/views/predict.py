"""Predict: what is in an uploaded image — CLIP's zero-shot top-5 beside RECO's, and the memory
neighbours whose captions the fusion attended to (the explanation of the change)."""

from __future__ import annotations

import hashlib
import io
import re
import time
from pathlib import Path

import streamlit as st

from app.config import Settings
from app.imaging import ImageLimits, ImageRejected, open_image_safely
from app.manifest import ManifestError, load_classes
from app.memory.base import MemoryStoreError
from app.schemas import RefineMode
from app.services.method_common import MethodError
from app.services.serving import ClassCoverage
from ui import components, state
from ui.backend import PredictView

CACHE_KEY = "predict_cache"
MAX_CACHED = 32
CHECKPOINT_MODE = "checkpoint's choice"  # no mode sent: the checkpoint's validated one (both when it has none)
RECO_MODES = [CHECKPOINT_MODE, str(RefineMode.BOTH), str(RefineMode.IMAGE), str(RefineMode.TEXT)]
PREFERRED_SET = "clothing10"  # the bundled sample's classes: what the demo memory holds


def mode_of(choice: str) -> RefineMode | None:
    """The selectbox's choice as the service's mode: none for the checkpoint's choice."""
    return None if choice == CHECKPOINT_MODE else RefineMode(choice)


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
            cache[key] = state.backend(settings).predict(data, classes, mode_of(mode), k)
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
    show_relatedness(view)
    if view.reco is None:
        return
    sides = []
    if view.class_explanations:
        sides.append("Text side: the top classes' prompts")
    if view.neighbours:
        sides.append("Image side: the image's neighbours")
    if not sides:
        return
    st.markdown("##### Why RECO answered as it did")
    st.caption({RefineMode.TEXT: "Mode `text` decides through the class prompts, each refined with the captions "
                                 "it retrieves from the memory: the text side is the explanation.",
                RefineMode.BOTH: "Mode `both` refines the class prompts (text side) and the image (image side); "
                                 "the answer compares the two.",
                RefineMode.IMAGE: "Mode `image` refines the image with its neighbours' captions: the image side "
                                  "is the explanation."}.get(view.mode, ""))
    for tab, side in zip(st.tabs(sides), sides, strict=True):
        with tab:
            if side.startswith("Text"):
                show_text_side(index, view, settings)
            else:
                kept = f"{view.self_attention:.1%}" if view.self_attention is not None else "?"
                st.caption(f"Image→image search found these {len(view.neighbours)} items; the fusion kept {kept} "
                           "of its attention on the image itself and spread the rest over their captions.")
                components.neighbour_grid(view.neighbours, settings, key=f"predict-{index}")


def show_text_side(index: int, view: PredictView, settings: Settings) -> None:
    for n, explained in enumerate(view.class_explanations):
        kept = f"{explained.self_attention:.1%}" if explained.self_attention is not None else "?"
        st.markdown(f"**{explained.name}** — prompt “{explained.prompt}” retrieved these captions (text→text); "
                    f"the fusion kept {kept} of its attention on the prompt itself")
        components.neighbour_grid(explained.neighbours, settings, key=f"predict-{index}-class-{n}")


def show_relatedness(view: PredictView) -> None:
    """How related the memory was: the query's nearest memory image against the memory's own images."""
    r = view.relatedness
    if r is None:
        return
    line = f"Nearest memory image: similarity **{r.top_similarity:.3f}**"
    if r.typical is not None and r.low is not None:
        line += (f" (this memory's own images: typically {r.typical:.3f} to their nearest, 5 % below "
                 f"{r.low:.3f}, over {r.sample})")
    if r.outside:
        st.warning(line + ". The image is **outside the memory's domain**: RECO's refinement draws on unrelated "
                   "items here, and CLIP's answer is the safer one.", icon=":material/travel_explore:")
    else:
        st.caption(line + ".")
    if view.fell_back:
        st.info(f"RECO **fell back to CLIP** on the image side: the nearest neighbour's similarity is below the "
                f"checkpoint's threshold {view.fallback_threshold:.3f} (chosen on validation), so the image "
                "kept its CLIP embedding.", icon=":material/undo:")


def flag_uncovered(settings: Settings, classes: list[str]) -> None:
    """Before predicting: the classes no caption of the memory mentions (RECO has nothing of theirs to draw on)."""
    key = ("coverage", state.fingerprint(settings), tuple(classes))
    cache: dict[tuple[object, ...], ClassCoverage] = st.session_state.setdefault(CACHE_KEY + "_coverage", {})
    if key not in cache:
        try:
            cache[key] = state.service(settings).class_coverage(list(classes))
        except Exception as exc:  # noqa: BLE001 - the check is advice: never block a prediction on it
            st.caption(f"(could not check the class set against the memory: {exc})")
            return
    c = cache[key]
    if c.missing_count == 0:
        st.caption(f"The memory's captions mention all {c.classes} classes.")
        return
    shown = ", ".join(c.missing[:8]) + (" …" if c.missing_count > 8 else "")
    st.warning(f"**The memory holds {c.held} of these {c.classes} classes** — no caption mentions "
               f"{c.missing_count}: {shown}. RECO refines with what it retrieves; for classes the memory does not "
               "hold it can turn CLIP's right answer into a confident wrong one. Ingest pairs of these classes, "
               "or compare with CLIP.", icon=":material/warning:")


PREPARE_CHUNK = 50  # labels per step of a class set's preparation (the progress bar's granularity)


def prepare_classes(settings: Settings, classes: list[str], mode: str, k: int) -> None:
    """The class set's embeddings computed before the first prediction, in chunks under a progress bar (the
    service batches each chunk and caches it; later predictions, and restarts, find them ready)."""
    if settings.ui_use_workers:
        return  # the refine worker prepares them itself
    key = ("prepared", state.fingerprint(settings), tuple(classes), mode, k)
    done: set[tuple[object, ...]] = st.session_state.setdefault(CACHE_KEY + "_prepared", set())
    if key in done:
        return
    from app.services.serving import PredictQuery

    service = state.service(settings)
    started = time.perf_counter()
    bar = st.progress(0.0, text=f"Preparing the {len(classes)} classes (prompt embeddings, refined by the memory) …")
    try:
        for start in range(0, len(classes), PREPARE_CHUNK):
            chunk = classes[start: start + PREPARE_CHUNK]
            service.prepare_classes(PredictQuery(labels=chunk, mode=mode_of(mode), k=k))
            ready = min(len(classes), start + len(chunk))
            bar.progress(ready / len(classes), text=f"Preparing the classes: {ready} of {len(classes)} …")
        prepared = service.prepare_classes(PredictQuery(labels=classes, mode=mode_of(mode), k=k))
    except (MethodError, MemoryStoreError, LookupError, ValueError) as exc:
        bar.empty()
        st.caption(f"(the class set was not prepared ahead: {exc})")
        return
    bar.empty()
    done.add(key)
    st.caption(f"{prepared.classes} classes ready in {time.perf_counter() - started:.1f} s"
               + (" (CLIP and refined prompts)" if prepared.refined else "") + "; cached for later predictions.")


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
                            help="checkpoint's choice = the mode the fusion checkpoint was validated with "
                                 "(both when it records none); both = refine image and class prompts (paper's "
                                 "best for classification)")
        k = int(st.number_input("Neighbours k'", 1, 100, settings.k_infer, key="predict_k"))
    with upload:
        label = (f"Images ({components.ACCEPTED_IMAGES}; up to {settings.max_image_bytes / 2**20:g} MiB and "
                 f"{settings.max_image_pixels / 1e6:g} Mpx each)")
        files = st.file_uploader(label, accept_multiple_files=True, key="predict_files") or []
    if not classes:
        st.info("Choose a class set to classify against.")
        return
    flag_uncovered(settings, classes)
    if not files:
        st.info(f"Upload an image to classify it against {len(classes)} classes.")
        return
    if len(files) > settings.upload_max_files:
        st.warning(f"Only the first {settings.upload_max_files} of {len(files)} files are classified.")
    prepare_classes(settings, classes, mode, k)
    for index, file in enumerate(files[: settings.upload_max_files]):
        predict_one(index, file.name, file.getvalue(), classes, mode, k, settings)


render()
