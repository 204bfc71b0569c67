"""Quiet model creation: open_clip's and transformers' load-time chatter kept out of the logs (the encoder
checks and reports its weights itself)."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType


class DropFactoryNotices(logging.Filter):
    """open_clip's "initialized partially / randomly" notices: the encoder checks and reports weights itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("initialized partially" in message or "No pretrained weights loaded" in message)


@contextlib.contextmanager
def quiet_model_creation() -> Iterator[None]:
    """Model creation without transformers' per-tensor progress bar and load report (a packaged HF text
    tower prints both on every load) and without open_clip's notices that
    :meth:`app.encoder.openclip.OpenClipEncoder._load` replaces with its own checks; warnings from anything
    else still show."""
    notices = DropFactoryNotices()
    root = logging.getLogger()
    root.addFilter(notices)
    hf_logging: ModuleType | None
    try:
        hf_logging = importlib.import_module("transformers.utils.logging")
    except ImportError:  # no transformers: no HF text tower to quieten
        hf_logging = None
    if hf_logging is not None:
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        root.removeFilter(notices)
        if hf_logging is not None:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
