"""``reco serve``: the HTTP API (FastAPI) over the one serving service of ``app`` — thin, like ``ui/``."""
