"""The metadata database's failures, as :func:`app.errors.describe` tells them to the user.

By class name and module, without importing a driver: :mod:`app.errors` sits below every module and stays light.
"""

from __future__ import annotations

import re


def is_database_failure(exc: BaseException) -> bool:
    """Does the database (SQLAlchemy or the psycopg driver) not answer or refuse the operation?"""
    mod, name = type(exc).__module__, type(exc).__name__
    if mod.startswith("sqlalchemy") and name in ("OperationalError", "InterfaceError"):
        return True
    return mod.startswith("psycopg") and name == "OperationalError"


def database_line(exc: BaseException) -> str:
    """What failed and what to do, without the SQL statement or the link to SQLAlchemy's background page."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    text = re.sub(r"\(Background on this error at: [^)]*\)", "", text).strip()
    text = text.split("[SQL:")[0].strip()
    hint = "start the database or fix RECO_DATABASE_URL"
    lowered = text.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return ("the metadata database has no schema yet: ingest something first (`reco ingest SOURCE`) or run "
                "`reco db upgrade`")
    if "readonly" in lowered or "read-only" in lowered:
        hint = "the database file is read-only: make the data dir writable or set RECO_DATA_DIR elsewhere"
    elif "unable to open database file" in lowered:
        hint = "the database file cannot be created: check RECO_DATA_DIR (a writable folder)"
    elif "disk" in lowered and "full" in lowered:
        hint = "the disk is full: free space or set RECO_DATA_DIR elsewhere"
    return f"the metadata database failed: {text[:300]}: {hint}"
