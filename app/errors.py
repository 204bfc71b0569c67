"""Errors a user can cause, as one line that says what is wrong and what to do — never a secret.

Every front end ends with :func:`describe`: a :class:`UserError` raised anywhere (its message already says
what to do), or a known failure of the environment (a read-only or full data dir, a database or broker that
does not answer, a settings value pydantic refuses, …) becomes ``(one line, exit code)``: 2 for a usage
error (the command line or a setting is wrong), 1 for the environment. Anything else is a bug: one line
too, naming the exception type, and the traceback only with ``--debug``.

:func:`redact` removes every secret the process knows of (``RECO_QDRANT_API_KEY``, ``RECO_API_KEY``,
passwords inside ``RECO_*_URL`` values, any ``scheme://user:password@`` in the text) from a message; the
logging filter :class:`RedactingFilter` does the same for every log record.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from app.db.errors import database_line, is_database_failure

USAGE = 2
ENVIRONMENT = 1

# Settings whose whole value is secret, and settings that are URLs which may carry a password.
SECRET_SETTINGS = ("qdrant_api_key", "api_key")
URL_SETTINGS = ("database_url", "broker_url", "result_backend", "qdrant_url", "api_url")
_MASK = "***"
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)(?P<password>[^\s@/]*)@")
# "api_key=…", "password: …" — a key word standing on its own (not "/etc/passwd: …" or "secret_santa.png").
_KEY_VALUE = re.compile(r"(?i)(?<![\w/.\-])(?P<head>(?:api[_-]?key|password|secret|token)\s*[=:]\s*['\"]?)"
                        r"(?P<value>[^\s'\",}&]+)")


# The project's own exceptions whose message is already written for the user, by class name (no imports:
# app.errors sits below every module) -> exit code.
KNOWN_ERRORS = {
    "EncoderLoadError": USAGE, "UnsafeCheckpointError": USAGE, "OmittedWeightsError": USAGE,
    "CheckpointError": USAGE, "ManifestError": USAGE, "SourceError": USAGE, "ImageRejected": USAGE,
    "FileRejected": USAGE, "UploadRejected": USAGE, "MethodError": ENVIRONMENT, "ServerError": ENVIRONMENT,
    "BenchError": ENVIRONMENT, "ServerLaunchError": ENVIRONMENT,
    "CommandError": USAGE,  # alembic: an unknown revision
}


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and what to do."""

    exit_code = ENVIRONMENT


class UsageError(UserError):
    """The command line or a setting is wrong (exit 2)."""

    exit_code = USAGE


class SetupError(UserError):
    """The environment is not as the command needs it: a folder, a server, a device (exit 1)."""

    exit_code = ENVIRONMENT


# --- secrets -------------------------------------------------------------------------------------------


def _env_secrets(environ: Mapping[str, str]) -> list[str]:
    found: list[str] = []
    for name in SECRET_SETTINGS:
        value = environ.get(f"RECO_{name.upper()}", "")
        if value:
            found.append(value)
    for name in URL_SETTINGS:
        found.extend(_url_password(environ.get(f"RECO_{name.upper()}", "")))
    return found


def _url_password(url: str) -> list[str]:
    if not url or "@" not in url:
        return []
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if not password:  # an unparsable URL: take what sits between the last ':' and '@' of the userinfo
        userinfo = url.split("://", 1)[-1].rsplit("@", 1)[0]
        password = userinfo.split(":", 1)[1] if ":" in userinfo else None
    return [p for p in {password or "", unquote(password or "")} if p]


def settings_secrets(settings: Any) -> list[str]:
    """The secret values of a Settings object (SecretStr fields, URL passwords)."""
    found: list[str] = []
    for name in SECRET_SETTINGS:
        value: Any = getattr(settings, name, None)
        raw = value.get_secret_value() if value is not None and hasattr(value, "get_secret_value") else value
        if raw:
            found.append(str(raw))
    for name in URL_SETTINGS:
        found.extend(_url_password(str(getattr(settings, name, "") or "")))
    return found


_extra_secrets: set[str] = set()


def register_secrets(values: Iterable[str]) -> None:
    """Secrets this process learnt besides the environment (a settings object built with overrides)."""
    _extra_secrets.update(v for v in values if v)


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with every known secret replaced by ``***``."""
    secrets = {*_env_secrets(os.environ), *_extra_secrets, *extra}
    for secret in sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True):
        text = text.replace(secret, _MASK)
    text = _URL_PASSWORD.sub(  # a password already masked (Celery writes "**") stays as it is
        lambda m: f"{m['head']}{_MASK}@" if m["password"].strip("*") else m[0], text)
    return _KEY_VALUE.sub(lambda m: f"{m['head']}{_MASK}", text)


class RedactingFilter(logging.Filter):
    """Log records formatted, redacted, and frozen: no secret reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is the logger's problem, not ours
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Every handler of ``logger`` (default root) redacts what it writes."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


# --- one line per error --------------------------------------------------------------------------------


def settings_error_line(exc: BaseException, *, options: bool = False) -> str:
    """A pydantic ValidationError as ``RECO_X: what is wrong; …`` (``options``: ``--x: …``, for a command's
    own input) — never the input values (a secret may be among them)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return redact(str(exc))
    parts = []
    for err in errors(include_input=False, include_url=False, include_context=False):
        loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int)]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:
            parts.append(msg)
            continue
        name = f"--{loc[0].replace('_', '-')}" if options else f"RECO_{loc[0].upper()}"
        parts.append(f"{name}: {msg}")
    return redact("; ".join(parts) or "invalid value")


def one_line(text: str, limit: int = 600) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe(exc: BaseException, data_dir: Any = None) -> tuple[str, int]:
    """``(message, exit code)`` for an exception that ends a command: one line, redacted."""
    message, code = _classify(exc, data_dir)
    return one_line(redact(message)), code


def _classify(exc: BaseException, data_dir: Any) -> tuple[str, int]:  # noqa: C901 - a table of cases
    if isinstance(exc, UserError):
        return str(exc), exc.exit_code
    name = type(exc).__name__
    module = type(exc).__module__
    chain = _chain(exc)
    if name == "ValidationError" and module.startswith("pydantic"):
        title = getattr(exc, "title", "")
        if title in ("Settings", "SettingsConfigDict") or "Settings" in str(title):
            return f"invalid settings: {settings_error_line(exc)} (fix the RECO_* environment variable)", USAGE
        return f"invalid input: {settings_error_line(exc, options=True)}", USAGE
    memory_error = _first(chain, "MemoryStoreError")
    if memory_error is not None:
        return str(memory_error), USAGE
    known = next((link for link in chain if type(link).__name__ in KNOWN_ERRORS), None)
    if known is not None:
        text = str(known)
        code = ENVIRONMENT if "RECO_DEVICE" in text else KNOWN_ERRORS[type(known).__name__]
        return text, code
    for link in chain:
        mod = type(link).__module__
        if is_database_failure(link):
            return database_line(link), ENVIRONMENT
        if mod.startswith(("kombu", "redis", "amqp")) or type(link).__name__ == "OperationalError" and \
                mod.startswith("celery"):
            return (f"the message broker does not answer ({type(link).__name__}: {_first_line(link)}): start "
                    "Redis/RabbitMQ or fix RECO_BROKER_URL"), ENVIRONMENT
    os_error = next((link for link in chain if isinstance(link, OSError)), None)
    if os_error is not None and os_error.errno is not None:
        return _os_line(os_error, data_dir), ENVIRONMENT
    if isinstance(exc, MemoryError):
        return ("out of memory: lower RECO_INGEST_BATCH_SIZE / RECO_ENCODE_BATCH_SIZE or "
                "RECO_INGEST_MAX_RSS_MB"), ENVIRONMENT
    text = _first_line(exc)
    if "CUDA" in text or "cuda" in text and "available" in text:
        return (f"no usable GPU ({text}): set RECO_DEVICE=cpu or auto"), ENVIRONMENT
    return (f"unexpected {name}: {text or 'no message'} (a bug? rerun with --debug for the traceback)"
            ), ENVIRONMENT


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in out and len(out) < 16:
        out.append(link)
        link = link.__cause__ or link.__context__
    return out


def _first(chain: list[BaseException], name: str) -> BaseException | None:
    return next((link for link in chain if any(c.__name__ == name for c in type(link).__mro__)), None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


_NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.ECONNRESET,
                             errno.ENETUNREACH, errno.ECONNABORTED})


def _os_line(exc: OSError, data_dir: Any) -> str:
    import socket

    if isinstance(exc, socket.gaierror | ConnectionError | TimeoutError) or exc.errno in _NETWORK_ERRNOS:
        return (f"a server does not answer ({exc.strerror or exc}): start it, or fix its URL setting "
                "(RECO_DATABASE_URL, RECO_QDRANT_URL, RECO_BROKER_URL, RECO_API_URL)")
    where = exc.filename if exc.filename is not None else (data_dir or "")
    what = f"{where}: " if where else ""
    reason = exc.strerror or str(exc)
    code = exc.errno
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "make it writable, or set RECO_DATA_DIR to a writable folder"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        hint = "free disk space, or set RECO_DATA_DIR on another disk"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        hint = "a file stands where a folder is needed: set RECO_DATA_DIR to a folder (or move the file)"
    elif code == errno.ENOENT:
        hint = "check the path"
    elif code in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.ECONNRESET):
        hint = "the server does not answer: start it or fix its URL setting"
    else:
        hint = "check the path and the disk"
    return f"{what}{reason}: {hint}"
