"""API keys on every ``/v1`` endpoint: 401 without a valid key, 403 for a key without the scope.

The key comes in ``Authorization: Bearer <key>`` or ``X-API-Key``; it is checked against its stored SHA-256
in constant time (:class:`app.db.apikeys.ApiKeyRepo`). A valid key is remembered for a few seconds, so a
revoked key stops working within ``CACHE_S``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fastapi import Request

from api.errors import ApiError
from app.db.apikeys import ApiKeyRepo, KeyInfo

CACHE_S = 10.0


class KeyChecker:
    def __init__(self, keys: ApiKeyRepo) -> None:
        self.keys = keys
        self._cache: dict[str, tuple[float, KeyInfo]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> KeyInfo | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CACHE_S:
            return cached[1]
        info = self.keys.verify(key)
        with self._lock:
            if info is None:
                self._cache.pop(key, None)
            else:
                self._cache[key] = (now, info)
                if len(self._cache) > 1024:
                    self._cache.clear()
        return info


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def require(scope: str) -> Callable[[Request], KeyInfo]:
    def dependency(request: Request) -> KeyInfo:
        checker: KeyChecker = request.app.state.keys
        key = presented_key(request)
        if key is None:
            raise ApiError(401, "missing_api_key", "an API key is required (Authorization: Bearer <key>); "
                                                   "create one with `reco apikey create`")
        info = checker.check(key)
        if info is None:
            raise ApiError(401, "invalid_api_key", "the API key is unknown or revoked")
        if scope not in info.scopes:
            raise ApiError(403, "insufficient_scope", f"this key (scopes {','.join(sorted(info.scopes))}) lacks "
                                                      f"the {scope!r} scope")
        request.state.key_name = info.name
        return info

    dependency.__name__ = f"require_{scope}"
    return dependency
