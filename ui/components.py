"""Widgets the pages share: the random-weights banner, CLIP vs RECO top-k, the neighbour thumbnail grid."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import streamlit as st
from PIL import Image, ImageDraw, ImageOps

from app.config import Settings
from app.imaging import ImageLimits, ImageRejected, open_image_safely
from app.schemas import RejectReason
from app.services.predict import ClassScore
from ingestion.sources import IMAGE_SUFFIXES
from ui.backend import Neighbour

THUMB_SIDE = 256
MEMORY_PAGE = "views/memory.py"
ACCEPTED_IMAGES = ", ".join(sorted({s.lstrip(".").upper() for s in IMAGE_SUFFIXES}))

# What a person reads first when a file is refused; the wire reason and the detail follow.
REJECTION_HEADLINES: dict[str, str] = {
    RejectReason.EMPTY_FILE: "the file is empty",
    RejectReason.TOO_LARGE: "the file is too large",
    RejectReason.NOT_AN_IMAGE: "not an image",
    RejectReason.UNSUPPORTED: "unsupported image format",
    RejectReason.CORRUPT: "the image is corrupt",
    RejectReason.TRUNCATED: "the image is cut short",
    RejectReason.DECOMPRESSION_BOMB: "too many pixels (decompression-bomb cap)",
    RejectReason.TOO_SMALL: "the image is too small",
    RejectReason.BAD_ASPECT: "the aspect ratio is too extreme",
    RejectReason.PATH_OUTSIDE_ROOT: "a path points outside the allowed folders",
}


def rejection_message(name: str, reason: str, detail: str) -> str:
    headline = REJECTION_HEADLINES.get(reason, "refused")
    return f"**{name}** was rejected: {headline} (`{reason}`) — {detail}"


def check_image_upload(name: str, data: bytes, settings: Settings) -> str | None:
    """A message when an uploaded image is refused before decoding (type by extension, size)."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return (f"**{name}** was rejected: unsupported file type `{suffix or '(none)'}` "
                f"(`{RejectReason.UNSUPPORTED}`) — upload one of {ACCEPTED_IMAGES}")
    if len(data) > settings.max_image_bytes:
        return rejection_message(name, RejectReason.TOO_LARGE, f"{len(data)} bytes > cap {settings.max_image_bytes}")
    return None


def random_weights_banner(settings: Settings) -> None:
    if settings.is_random_init:
        st.warning(
            f"**RANDOM WEIGHTS** — the encoder `{settings.clip_model}` has no pretrained weights "
            "(`RECO_CLIP_PRETRAINED` is empty). Every similarity, probability and accuracy shown here is "
            "meaningless: the pages demonstrate the mechanics only.", icon="⚠️")


# --- thumbnails ---------------------------------------------------------------------------------------
@st.cache_data(max_entries=2000, show_spinner=False)
def _thumbnail(path: str, mtime_ns: int, size: int, side: int, max_bytes: int, max_pixels: int) -> bytes:
    image = open_image_safely(Path(path).read_bytes(), ImageLimits(max_bytes=max_bytes, max_pixels=max_pixels))
    image = ImageOps.pad(image, (side, side), color=(246, 246, 248))  # square: the grid's rows line up
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def thumbnail(source: str | None, settings: Settings, side: int = THUMB_SIDE) -> bytes | None:
    """The item's image from its source path, small; None when the file is gone, too big or unreadable."""
    if not source:
        return None
    local = source.removeprefix("file://")
    if "://" in local:  # URL sources are never fetched by the UI
        return None
    try:
        info = Path(local).stat()
        if not Path(local).is_file() or info.st_size > settings.max_image_bytes:
            return None
        return _thumbnail(local, info.st_mtime_ns, info.st_size, side, settings.max_image_bytes,
                          settings.max_image_pixels)
    except (OSError, ImageRejected):
        return None


@st.cache_data(max_entries=64, show_spinner=False)
def _small(digest: str, _data: bytes, side: int, max_bytes: int, max_pixels: int) -> bytes:
    image = open_image_safely(_data, ImageLimits(max_bytes=max_bytes, max_pixels=max_pixels))
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def small_image(data: bytes, settings: Settings, side: int = 384) -> bytes:
    """An uploaded image, decoded under the limits and made small (ImageRejected when it is refused)."""
    import hashlib

    return _small(hashlib.sha256(data).hexdigest(), data, side, settings.max_image_bytes, settings.max_image_pixels)


@st.cache_data(show_spinner=False)
def placeholder(side: int = THUMB_SIDE, text: str = "image missing") -> bytes:
    image = Image.new("RGB", (side, side), (226, 228, 233))
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 4, side - 5, side - 5), outline=(160, 164, 172), width=2)
    draw.text((side // 2, side // 2), text, fill=(90, 94, 102), anchor="mm")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --- CLIP vs RECO ---------------------------------------------------------------------------------------
def _change_badge(rank: int, name: str, clip_rank: dict[str, int]) -> str:
    before = clip_rank.get(name)
    if before is None:
        return ":green-badge[new in top-5]"
    if before > rank:
        return f":green-badge[▲{before - rank}]"
    if before < rank:
        return f":red-badge[▼{rank - before}]"
    return ":gray-badge[=]"


def ranked_list(scores: Sequence[ClassScore], baseline: Sequence[ClassScore] | None = None) -> None:
    clip_rank = {s.name: i for i, s in enumerate(baseline or [])}
    lines = []
    for i, s in enumerate(scores):
        badge = f" {_change_badge(i, s.name, clip_rank)}" if baseline is not None else ""
        lines.append(f"{i + 1}. **{s.name}** — {s.score:.1%}{badge}")
    st.markdown("\n".join(lines) if lines else "_no classes_")


def compare_top_k(clip: Sequence[ClassScore], reco: Sequence[ClassScore] | None, *, reco_label: str,
                  why_not: str | None = None) -> None:
    """CLIP top-5 and RECO top-5 side by side; RECO's rows marked with how they moved against CLIP."""
    left, right = st.columns(2)
    with left:
        st.markdown("#### CLIP top-5")
        ranked_list(clip)
    with right:
        st.markdown(f"#### RECO top-5 · {reco_label}")
        if reco is None:
            st.warning(f"No RECO answer: {why_not or 'unavailable'}")
        else:
            ranked_list(reco, clip)
    if reco and clip:
        if reco[0].name != clip[0].name:  # neutral: a change is not by itself an improvement
            st.info(f"RECO's top-1 differs from CLIP's: **{clip[0].name}** ({clip[0].score:.1%}) → "
                    f"**{reco[0].name}** ({reco[0].score:.1%}). Which is right depends on whether the memory "
                    "holds this kind of image — see how related it was below.", icon=":material/compare_arrows:")
        else:
            st.caption(f"Same top-1 as CLIP: **{clip[0].name}** ({clip[0].score:.1%} → {reco[0].score:.1%}).")


# --- neighbours -----------------------------------------------------------------------------------------
def open_item(item_id: str) -> None:
    """The item's own page, its id in the address (``/memory?item=ID``)."""
    st.switch_page(MEMORY_PAGE, query_params={"item": item_id})


def neighbour_grid(neighbours: Sequence[Neighbour], settings: Settings, *, key: str, columns: int = 5,
                   open_buttons: bool = True) -> None:
    """Thumbnails with caption, similarity and (when the fusion ran) its attention weight on each."""
    if not neighbours:
        st.caption("No neighbours.")
        return
    with st.spinner("Loading thumbnails …"):  # first views decode each source image once (then cached)
        for start in range(0, len(neighbours), columns):
            cells = st.columns(columns)
            for offset, (cell, nb) in enumerate(zip(cells, neighbours[start: start + columns], strict=False)):
                with cell:
                    _neighbour_card(nb, settings, f"{key}-{start + offset}", open_buttons)


def _neighbour_card(nb: Neighbour, settings: Settings, key: str, open_button: bool) -> None:
    image = thumbnail(nb.source, settings)
    caption = nb.caption if len(nb.caption) <= 90 else nb.caption[:87] + "…"
    st.image(image or placeholder(), width="stretch",
             alt=f"neighbour: {caption}" if image else "neighbour: image missing")
    st.caption(caption or "_no caption_")
    others = [c for c in nb.captions if c != nb.caption]
    if others:
        st.caption(f"+{len(others)} more caption{'s' if len(others) > 1 else ''}: " + " · ".join(
            c if len(c) <= 60 else c[:57] + "…" for c in others[:4]))
    if nb.label_name or nb.label is not None:
        st.caption(f"class **{nb.label_name or nb.label}**" + (f" · {nb.dataset}" if nb.dataset else ""))
    line = f"similarity **{nb.score:.3f}**"
    if nb.attention is not None:
        line += f" · attention **{nb.attention:.1%}**"
    st.markdown(line)
    if open_button and st.button("Open", key=f"open-{key}", help=f"item {nb.item_id}"):
        open_item(nb.item_id)
