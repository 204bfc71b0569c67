"""Wire names shared by the database, Qdrant payloads, CLI ``--json`` and the UI."""

from __future__ import annotations

from enum import StrEnum


class Modality(StrEnum):
    IMAGE = "image"
    TEXT = "text"


class EmbedStatus(StrEnum):
    PENDING = "pending"
    EMBEDDED = "embedded"
    FAILED = "failed"


class JobStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # stopped on request: what was stored before stays


class RefineMode(StrEnum):
    """Which side is refined at inference (paper Tab. 4)."""

    CLIP = "clip"  # no refinement
    IMAGE = "image"  # v-bar with t
    TEXT = "text"  # v with t-bar
    BOTH = "both"  # v-bar with t-bar


class RejectReason(StrEnum):
    """Why an item was not ingested; every failure carries exactly one."""

    MISSING = "missing"
    EMPTY_FILE = "empty_file"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED = "unsupported"
    CORRUPT = "corrupt"
    TRUNCATED = "truncated"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_SMALL = "too_small"
    BAD_ASPECT = "bad_aspect"
    EMPTY_CAPTION = "empty_caption"
    CAPTION_TOO_LONG = "caption_too_long"
    BAD_CAPTION = "bad_caption"
    PATH_OUTSIDE_ROOT = "path_outside_root"
    URL_NOT_ALLOWED = "url_not_allowed"
    BAD_ROW = "bad_row"
    BAD_ENCODING = "bad_encoding"
    TAKEN_DOWN = "taken_down"  # the item was deleted (takedown): it is never ingested again
    ENCODE_ERROR = "encode_error"
    STORE_ERROR = "store_error"
