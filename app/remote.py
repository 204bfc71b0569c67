"""Finding the one process that serves the memory (``reco serve``) and talking to it over HTTP.

A running server announces itself in the data dir: ``serve.json`` (its URL and pid, replaced atomically)
and ``keys/<client>.key`` (keys it made for local clients, mode 0600: only this user can read them).
Every other process — the CLI, the UI, the workers — finds it there (or in ``RECO_API_URL`` with
``RECO_API_KEY``) and goes through it; without one, a command opens the store itself.

Clients retry a server that does not answer for ``RECO_API_RETRY_S`` (it may be restarting: its engine's
write-ahead log replays on open), so a ``reco ingest`` survives a server restart. Every memory write is
idempotent (content-derived ids), so a retried request changes nothing the first one did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from app.config import Settings

log = logging.getLogger(__name__)

ANNOUNCEMENT = "serve.json"
KEY_DIR = "keys"
LOCAL_CLIENTS = {"cli": "read,write,admin", "ui": "read,write"}  # name -> scopes of the key the server makes

_serving_here = False  # set in the reco serve process: it owns the store and never discovers itself


class ServerError(RuntimeError):
    """The server answered with an error (``code``: the reason code of its JSON error body)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message


class ServerUnreachable(ConnectionError):
    """The server did not answer within the retry window."""


@dataclass(frozen=True)
class ServerInfo:
    url: str
    key: str | None
    pid: int | None = None
    announced: bool = False  # found in the data dir (vs configured by RECO_API_URL)


def mark_serving_process() -> None:
    global _serving_here
    _serving_here = True


def is_serving_process() -> bool:
    return _serving_here


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_key(settings: Settings, client: str) -> str | None:
    path = Path(settings.data_dir) / KEY_DIR / f"{client}.key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def find_server(settings: Settings, client: str = "cli") -> ServerInfo | None:
    """The server this process should go through, or None (then it opens the store itself)."""
    if _serving_here:
        return None
    if settings.api_url:
        key = settings.api_key.get_secret_value() if settings.api_key else read_key(settings, client)
        return ServerInfo(settings.api_url.rstrip("/"), key)
    path = Path(settings.data_dir) / ANNOUNCEMENT
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = int(data.get("pid") or 0)
    if not pid or not _pid_alive(pid):
        return None  # left by a server that died: not an owner any more
    return ServerInfo(str(data["url"]).rstrip("/"), read_key(settings, client), pid, announced=True)


def announce(settings: Settings, url: str, keys: dict[str, str]) -> None:
    """Write the keys for local clients, then ``serve.json`` (atomically): clients find a server only once
    its keys are in place."""
    folder = Path(settings.data_dir) / KEY_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for client, key in keys.items():
        target = folder / f"{client}.key"
        tmp = folder / f".{client}.key.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        os.replace(tmp, target)
    info = {"url": url, "pid": os.getpid(), "started_at": time.time(),
            "memory": settings.qdrant_url or settings.resolved_memory_path}
    tmp = Path(settings.data_dir) / f".{ANNOUNCEMENT}.{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, Path(settings.data_dir) / ANNOUNCEMENT)


def withdraw(settings: Settings) -> None:
    """Remove the announcement if it is ours (a newer server may have replaced it)."""
    path = Path(settings.data_dir) / ANNOUNCEMENT
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


class HttpClient:
    """JSON over HTTP to reco serve: the key in a header, errors as :class:`ServerError`, retries while the
    server is unreachable or restarting (503)."""

    RETRY_STATUS = {502, 503, 504}

    def __init__(self, server: ServerInfo, *, timeout_s: float = 120.0, retry_s: float = 90.0,
                 rediscover: Callable[[], ServerInfo | None] | None = None) -> None:
        self.server = server
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.rediscover = rediscover  # a restarted server may listen elsewhere: ask the data dir again
        self.last_server_ms: float | None = None
        self._http = self._client(server)

    def _client(self, server: ServerInfo) -> httpx.Client:
        import httpx

        headers = {"Authorization": f"Bearer {server.key}"} if server.key else {}
        return httpx.Client(base_url=server.url, headers=headers, timeout=self.timeout_s)

    @classmethod
    def for_settings(cls, settings: Settings, server: ServerInfo, client: str = "cli") -> HttpClient:
        rediscover = (lambda: find_server(settings, client)) if server.announced else None
        return cls(server, timeout_s=settings.api_timeout_s, retry_s=settings.api_retry_s, rediscover=rediscover)

    def _follow_restart(self) -> None:
        found = self.rediscover() if self.rediscover is not None else None
        if found is not None and (found.url, found.key) != (self.server.url, self.server.key):
            log.warning("reco serve moved to %s: following it", found.url)
            self._http.close()
            self.server, self._http = found, self._client(found)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        deadline = time.monotonic() + self.retry_s
        delay = 0.25
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
                if response.status_code not in self.RETRY_STATUS:
                    break
                problem: Exception = ServerError(response.status_code, "unavailable", response.text[:200])
            except httpx.TransportError as exc:  # refused, reset, timed out: the server may be restarting
                problem = exc
            if time.monotonic() + delay > deadline:
                raise ServerUnreachable(
                    f"reco serve at {self.server.url} did not answer for {self.retry_s:g} s ({problem}); is it "
                    "running? (`reco serve`)") from problem
            log.warning("reco serve at %s unavailable (%s); retrying in %.1f s", self.server.url, problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            self._follow_restart()
        self.last_server_ms = _server_ms(response)
        if response.status_code >= 400:
            raise _error_of(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def close(self) -> None:
        self._http.close()


def _server_ms(response: httpx.Response) -> float | None:
    """The server's own time for the request (its ``Server-Timing: app;dur=`` header), if it said."""
    timing = response.headers.get("server-timing", "")
    for part in timing.split(";"):
        if part.strip().startswith("dur="):
            try:
                return float(part.strip()[4:])
            except ValueError:
                return None
    return None


def _error_of(response: httpx.Response) -> ServerError:
    try:
        body = response.json().get("error", {})
        return ServerError(response.status_code, str(body.get("code", "error")), str(body.get("message", "")))
    except ValueError:
        return ServerError(response.status_code, "error", response.text[:300])
