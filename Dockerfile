# The RECO memory service: one image for the CLI, reco serve, the workers, beat and the UI (docker-compose.yml).
# torch comes from PyPI (its Linux wheels carry the CUDA runtime): the same image runs on CPU and on a GPU
# host; RECO_DEVICE=auto picks CUDA when the container sees a device.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RECO_DATA_DIR=/data

RUN useradd --create-home --uid 1000 reco \
    && mkdir -p /data /inbox && chown reco:reco /data

WORKDIR /app
# dependencies first (a layer that survives source edits), then the code
COPY pyproject.toml README.md ./
RUN mkdir -p app ingestion workers ui api programs && touch app/__init__.py ingestion/__init__.py workers/__init__.py \
       ui/__init__.py api/__init__.py programs/__init__.py \
    && pip install . && pip uninstall -y reco-memory-service
COPY app ./app
COPY ingestion ./ingestion
COPY workers ./workers
COPY ui ./ui
COPY api ./api
COPY programs ./programs
# the demo's bundled sample (Clothing-10, CC0; sample/clothing10/SOURCE.md): `reco demo` works in the container
COPY sample ./sample
COPY migrations ./migrations
COPY alembic.ini ./
# editable: the code stays in /app, where app/db/session.py finds /app/migrations
RUN pip install --no-deps -e .

USER reco
VOLUME ["/data"]
EXPOSE 8501 8765
ENTRYPOINT ["reco"]
CMD ["--help"]
