"""One settings object for every knob (env prefix ``RECO_``).

Build it with :func:`get_settings` and pass it down; nothing in ``app`` reads a global.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from platformdirs import user_data_dir
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.fusion.recipe import PAPER_RECIPE

Device = Literal["auto", "cpu", "cuda"]


def _default_data_dir() -> Path:
    return Path(user_data_dir("reco-memory-service", appauthor=False))


# The committed base encoder (registered in app/encoder/weights.py REGISTERED_TAGS).
BASE_MODEL = "reco-base"
BASE_PRETRAINED = "flickr8k_s229k_b128_r128"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECO_", env_file=None, extra="ignore")

    # --- storage -----------------------------------------------------------------------------
    data_dir: Path = Field(default_factory=_default_data_dir, description="Embedded stores live here.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default SQLite in data_dir. Postgres: postgresql+psycopg://"
    )
    qdrant_url: str | None = Field(
        default=None, description="Qdrant server or cluster URL; unset = the embedded engine (Qdrant Edge).")
    qdrant_api_key: SecretStr | None = None
    memory_path: Path | None = Field(
        default=None, description="Folder of the embedded memory (Qdrant Edge); default <data_dir>/memory. "
        "':memory:' = a throwaway store in a temp folder.")
    qdrant_path: Path | None = Field(
        default=None, description="Retired: a qdrant-client local-mode folder. Only `reco memory migrate` reads "
        "it; any other command refuses to start while it is set.")
    memory_alias: str = Field(default="memory", description="Alias that points at the live collection.")
    # How collections are built and searched, on Edge and on a server alike (docs/performance.md has the curve).
    memory_hnsw_m: int = Field(default=16, ge=4, le=128, description="HNSW edges per node.")
    memory_hnsw_ef_construct: int = Field(default=100, ge=4, description="HNSW candidates while building.")
    memory_hnsw_ef: int = Field(default=128, ge=1, description="HNSW candidates while searching (recall vs latency).")
    memory_quantization: Literal["none", "int8"] = Field(
        default="none", description="int8: scalar-quantized vectors in RAM, originals rescored.")
    memory_oversampling: float = Field(
        default=2.0, ge=1.0, description="int8: candidates per result before rescoring with the originals.")
    memory_on_disk: bool = Field(default=False, description="Original vectors memory-mapped from disk.")
    memory_indexing_threshold: int = Field(
        default=20_000, ge=100, description="New points are searched exactly until this many are waiting; then "
        "the owner builds their HNSW index.")
    memory_exact_search: bool = Field(default=False, description="Every search exact (no HNSW): for checks.")
    memory_min_free_mb: int = Field(
        default=256, ge=0, description="The embedded engine writes only while its disk has this much free: it maps "
        "its files (32 MB write-ahead-log segments) into memory, and a full disk under a mapping kills the process.")
    memory_index_idle_s: float = Field(
        default=2.0, ge=0, description="A long-lived owner (reco serve, a worker) indexes after this long without "
        "requests (indexing holds the process while it runs).")
    # Cluster layout of new collections on a Qdrant server (docs/scaling.md); Edge ignores them.
    qdrant_shard_number: int | None = Field(
        default=None, ge=1, description="Shards per new collection; None = Qdrant's default (one per node).")
    qdrant_replication_factor: int | None = Field(default=None, ge=1, description="Copies of every shard.")

    shared_data: Path = Field(
        default_factory=lambda: Path(__file__).resolve().parents[2] / "shared" / "data",
        description="Datasets for training and evaluation (flickr8k/, imagenette/, …; see its README).",
    )

    # --- jobs --------------------------------------------------------------------------------
    broker_url: str = "redis://127.0.0.1:6379/0"
    broker_key_prefix: str = Field(
        default="", max_length=64, description="Redis broker: a prefix for every key (queues included), so "
        "several deployments can share one Redis database without taking each other's messages.")
    result_backend: str | None = None

    # --- encoder -----------------------------------------------------------------------------
    # Default: the project's self-trained base (app/encoder/checkpoints/, see its model card), so everything
    # works offline. A real CLIP wherever weights can be downloaded: RECO_CLIP_MODEL=ViT-B-32
    # RECO_CLIP_PRETRAINED=laion2b_s34b_b79k.
    clip_model: str = Field(default=BASE_MODEL, description="open_clip model name (built-in or reco-*).")
    clip_pretrained: str = Field(
        default=BASE_PRETRAINED,
        description="open_clip pretrained tag, a registered reco tag, a local checkpoint file, or empty for "
        "RANDOM weights.",
    )
    random_init_seed: int = 0
    device: Device = "auto"
    encode_batch_size: int = Field(default=64, ge=1)
    # How the image tower runs (app/encoder/runtime.py; measured by `reco bench precision`, docs/performance.md).
    # "auto" = per device and image-tower family: CUDA fp16; CPU ViT int8 (dynamic, Linear layers of the image
    # tower); CPU ResNet (reco-base) fp32 + channels-last. bf16 on CPU is emulated without AVX-512 BF16 / AMX.
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        default="auto", description="auto, fp32, fp16 (CUDA), bf16 (autocast) or int8 (CPU, image tower).")
    channels_last: Literal["auto", "on", "off"] = Field(
        default="auto", description="Image tower in channels-last memory format; auto = on for conv towers.")
    compile: bool = Field(default=False, description="torch.compile the image tower (compiles on first batch).")
    torch_threads: int = Field(default=0, ge=0, description="torch intra-op threads; 0 = torch's default.")

    # --- ingestion limits ----------------------------------------------------------------------
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="Refused before decoding.")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Decompression-bomb cap.")
    min_image_side: int = Field(default=1, ge=1)
    max_aspect_ratio: float = Field(default=200.0, gt=1)
    max_caption_chars: int = Field(default=4_000, ge=1)
    require_caption: bool = Field(default=True, description="Refuse items with an empty caption.")
    allowed_roots: list[Path] = Field(
        default_factory=list, description="Extra folders manifests may point into (besides their own)."
    )
    allow_url_sources: bool = Field(default=False, description="Manifest rows with http(s) URIs.")
    ingest_batch_size: int = Field(default=64, ge=1)
    ingest_max_rss_mb: int = Field(
        default=2048, ge=256, description="Peak memory an ingestion aims to stay under: images are downscaled "
        "right after decoding, a quarter of this bounds the decoded pixels in flight across decode threads, "
        "another quarter the pixels a batch holds (batches are cut by bytes as well as by rows).")

    # --- RECO method (paper defaults) -----------------------------------------------------------
    fusion_config: str = Field(default="reco-fusion-b", description="Name of a JSON in app/fusion/configs.")
    fusion_checkpoint: str = Field(
        default="", description="Fusion checkpoint file; empty = newest registered for the live encoder."
    )
    k_train: int = Field(default=PAPER_RECIPE.k, ge=1, description="Neighbours per query during training (k).")
    k_infer: int = Field(default=10, ge=1, description="Neighbours per query at inference (k').")
    search_modality: Literal["uni", "cross"] = "uni"
    fusion_modality: Literal["cross", "uni"] = "cross"
    dedupe_neighbours_by_image: bool = True
    exact_index_dtype: Literal["float32", "float16", "int8"] = "float32"
    exact_index_chunk: int = Field(default=262_144, ge=1024, description="Memory rows per matmul chunk.")
    near_duplicate_threshold: float | None = Field(
        default=None, description="Image cosine above which a memory item is a near-duplicate of an "
        "evaluation image; None = calibrated from the encoder's own similarity distribution.",
    )

    # --- fusion training: defaults from the paper recipe (app/fusion/recipe.py) ---
    train_lr: float = PAPER_RECIPE.lr
    train_weight_decay: float = PAPER_RECIPE.weight_decay
    train_batch_size: int = PAPER_RECIPE.batch_size
    train_epochs: int = PAPER_RECIPE.epochs
    train_warmup_steps: int = PAPER_RECIPE.warmup_steps
    train_seed: int = PAPER_RECIPE.seed

    # --- workers ---------------------------------------------------------------------------------
    embed_max_batch: int = Field(default=64, ge=1, description="Micro-batch: flush at N items ...")
    embed_max_wait_ms: int = Field(default=200, ge=0, description="... or after T ms, whichever first.")
    decode_workers: int = Field(default=2, ge=0)
    embed_queue_high_water: int = Field(default=2_000, ge=1, description="Backpressure above this.")
    watch_interval_s: float = 5.0
    reembed_batch_size: int = 256
    watch_dirs: list[Path] = Field(default_factory=list, description="Folders the beat-scheduled scan watches.")
    broker_visibility_timeout_s: int = Field(
        default=3600, ge=1, description="Redis: an unacked message is redelivered after this (worker died).")
    ingest_stale_after_s: float = Field(
        default=300.0, gt=0, description="A submitted row still queued this long, with the embed queue "
        "drained, is re-enqueued (its message was lost, e.g. a broker restart without persistence).")
    maintenance_interval_s: float = Field(
        default=60.0, gt=0, description="Beat: resume lost rows and reconcile DB and memory.")
    reembed_check_interval_s: float = Field(
        default=3600.0, gt=0, description="Beat: re-embed when the configured encoder is not the live one.")
    refine_timeout_s: float = Field(default=30.0, gt=0, description="Clients wait this long for a refine answer.")

    # --- reco serve: the one process that owns an embedded memory, and its HTTP API ----------------------
    api_host: str = Field(default="127.0.0.1", description="reco serve binds here (localhost unless configured).")
    api_port: int = Field(default=8765, ge=1, le=65535, description="reco serve's port.")
    api_url: str | None = Field(
        default=None, description="Reach a reco serve elsewhere; unset = the one announced in the data dir, if any.")
    api_key: SecretStr | None = Field(
        default=None, description="Key for RECO_API_URL (a server on this machine hands its local clients one).")
    api_timeout_s: float = Field(default=120.0, gt=0, description="Clients wait this long for one answer.")
    api_retry_s: float = Field(
        default=90.0, ge=0, description="Clients retry an unreachable server this long (it may be restarting).")
    api_max_body_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, description="Largest request body.")

    # --- UI ----------------------------------------------------------------------------------------
    ui_port: int = 8501
    upload_max_files: int = 200
    upload_max_total_bytes: int = 200 * 1024 * 1024
    ui_use_workers: bool = Field(
        default=False, description="The UI sends predictions and searches to the refine worker and ingestion to "
        "the embed workers (Celery, RECO_BROKER_URL) instead of running them in its own process.")

    def __repr_args__(self):  # type: ignore[no-untyped-def]
        """repr(settings) never shows a password inside a URL setting (SecretStr fields mask themselves)."""
        from app.errors import URL_SETTINGS, redact

        for name, value in super().__repr_args__():
            yield name, redact(value) if name in URL_SETTINGS and isinstance(value, str) else value

    @field_validator("database_url", "qdrant_url", "api_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _exclusive_memory_location(self) -> Settings:
        if self.qdrant_url and self.memory_path:
            raise ValueError("set RECO_QDRANT_URL (a server) or RECO_MEMORY_PATH (embedded), not both")
        return self

    # --- derived (explicit value or computed default) ------------------------------------------
    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'reco.db'}"

    @cached_property
    def resolved_memory_path(self) -> str | None:
        """Folder of the embedded memory, ':memory:' for a throwaway one, None when a server is used."""
        if self.qdrant_url:
            return None
        if self.memory_path is not None:
            return str(self.memory_path)
        return str(self.data_dir / "memory")

    @property
    def legacy_local_store(self) -> Path:
        """Where the retired qdrant-client local mode kept the memory (detected, converted by migrate)."""
        return Path(self.qdrant_path) if self.qdrant_path is not None else self.data_dir / "qdrant"

    @property
    def is_random_init(self) -> bool:
        return not self.clip_pretrained.strip()

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        local = self.resolved_memory_path
        if local and local != ":memory:":
            Path(local).mkdir(parents=True, exist_ok=True)


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (used by the CLI and tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]
