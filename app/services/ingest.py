"""Writing decoded image-text pairs into the memory: admission here (row and caption checks, dedupe, takedowns,
job counts); the write itself — metadata first, then vectors, then status — is
:class:`~app.services.ingest_write.ItemWriter`, the one path re-embedding uses too.

Order matters for crash safety: an item is committed as *pending* before its vectors are written
and marked *embedded* only after Qdrant acknowledged them. A crash in between leaves "pending in DB"
(and maybe "present in Qdrant"), which :meth:`IngestService.reconcile` repairs. Nothing is ever
"embedded in DB but missing in Qdrant" unless Qdrant lost data; reconcile checks that too.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from app.db.repo import FailureRecord, MetadataRepo, NewItem
from app.db.session import upgrade_database
from app.encoder import Encoder, create_encoder
from app.manifest import printable
from app.memory.base import MemoryRecord, VectorMemory, content_hash, item_id_for
from app.memory.store import encoder_memory, open_store
from app.schemas import EmbedStatus, JobStatus, RejectReason
from app.services.ingest_write import TEXT_CACHE_SIZE, FailedInput, ItemWriter, Pending, PreparedItem

if TYPE_CHECKING:
    from app.config import Settings
    from app.manifest import InputRow

__all__ = ["TEXT_CACHE_SIZE", "BatchOutcome", "EncodedBatch", "FailedInput", "Failure", "IngestService",
           "ItemResult", "PreparedItem", "ReconcileReport", "clean_caption", "is_invisible", "job_summary",
           "prepare_storage", "row_problem"]

log = logging.getLogger(__name__)


class Failure(BaseModel):
    source: str
    reason: str
    detail: str | None = None


class BatchOutcome(BaseModel):
    seen: int = 0
    ingested: int = 0
    duplicates: int = 0
    failed: int = 0
    failures: list[Failure] = []

    def add(self, other: BatchOutcome) -> None:
        self.seen += other.seen
        self.ingested += other.ingested
        self.duplicates += other.duplicates
        self.failed += other.failed
        self.failures.extend(other.failures)


class ReconcileReport(BaseModel):
    checked: int = 0
    marked_embedded: int = 0
    re_embedded: int = 0
    reset_to_pending: int = 0


# Characters that render as nothing although Unicode calls them letters or symbols (fillers, blank pattern).
_INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e\u034f\u17b4\u17b5")
# Format (zero-width, bidirectional controls), separators, and marks that combine with nothing visible.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zs", "Zl", "Zp", "Mn", "Me"})


def is_invisible(text: str) -> bool:
    """True when nothing in ``text`` would show: whitespace, zero-width and bidi controls, fillers only."""
    return all(ch.isspace() or ch in _INVISIBLE_LETTERS or unicodedata.category(ch) in _INVISIBLE_CATEGORIES
               for ch in text)


def clean_caption(raw: str, *, max_chars: int, required: bool) -> tuple[str, FailedInput | None]:
    """Whitespace collapsed; NUL/control characters, empty and over-long captions refused.

    A caption made only of invisible characters (zero-width spaces, bidi controls, fillers) is empty."""
    if any(unicodedata.category(ch) in {"Cc", "Cs"} and ch not in "\t\n\r" for ch in raw):
        return "", FailedInput("", RejectReason.BAD_CAPTION, "caption contains NUL or control characters")
    caption = " ".join(raw.split())
    if is_invisible(caption):
        caption = ""
    if required and not caption:
        return "", FailedInput("", RejectReason.EMPTY_CAPTION, "caption is empty")
    if len(caption) > max_chars:
        return "", FailedInput("", RejectReason.CAPTION_TOO_LONG, f"{len(caption)} chars > cap {max_chars}")
    return caption, None


def row_problem(row: InputRow) -> FailedInput | None:
    """A row's metadata the database could not hold (app.manifest.field_problem), whatever its source."""
    from app.manifest import MAX_SOURCE_CHARS, field_problem

    problem = field_problem(dataset=row.dataset, split=row.split, extra=row.extra)
    if problem is None and len(row.source) > MAX_SOURCE_CHARS:
        problem = (RejectReason.BAD_ROW, f"source is {len(row.source)} characters > cap {MAX_SOURCE_CHARS}")
    if problem is None and "\x00" in row.source:
        problem = (RejectReason.BAD_ROW, "source contains NUL")
    if problem is None and row.path is not None:
        try:
            str(row.path).encode("utf-8")
        except UnicodeEncodeError:
            problem = (RejectReason.BAD_ENCODING, "the file name is not valid UTF-8, which the metadata database "
                       "cannot store as it is: rename the file")
    if problem is None:
        return None
    return FailedInput(printable(row.source)[:MAX_SOURCE_CHARS], *problem)


# Per input: the item id it maps to (None when refused before it had one), and its failure when refused early.
Entry = tuple[str | None, FailedInput | None]


@dataclass(frozen=True)
class ItemResult:
    """One input's end: embedded (``failure`` None: new, or a duplicate of an embedded item) or failed."""

    item_id: str | None
    failure: FailedInput | None = None


@dataclass
class EncodedBatch:
    """A batch encoded and marked pending, waiting for :meth:`IngestService.store_batch`."""

    job_id: int | None
    outcome: BatchOutcome
    failures: list[FailedInput]
    records: list[MemoryRecord]
    entries: list[Entry] = field(default_factory=list)  # one per input, in input order
    item_failures: dict[str, FailedInput] = field(default_factory=dict)  # refused by the database, not encoded

    @property
    def item_ids(self) -> list[str]:
        return [r.item_id for r in self.records]

    def results(self) -> list[ItemResult]:
        """One result per input (a duplicate within the batch shares its twin's)."""
        return [ItemResult(item_id, failure or (self.item_failures.get(item_id) if item_id else None))
                for item_id, failure in self.entries]


@dataclass
class _Batch:
    items: list[NewItem] = field(default_factory=list)
    prepared: list[PreparedItem] = field(default_factory=list)


class IngestService:
    """Constructor arguments: explicit, or built from the settings."""

    def __init__(
        self,
        settings: Settings,
        *,
        encoder: Encoder | None = None,
        memory: VectorMemory | None = None,
        repo: MetadataRepo | None = None,
    ) -> None:
        self.settings = settings
        self.encoder = encoder or create_encoder(settings)
        self.repo = repo or MetadataRepo.from_url(settings.resolved_database_url)
        self.store = open_store(settings)
        self.memory = memory or encoder_memory(settings, self.encoder.encoder_id, self.encoder.dim, store=self.store)
        self.writer = ItemWriter(self.encoder, self.memory, self.repo)
        self._ensure_version_registered()

    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    def _ensure_version_registered(self) -> None:
        """The first version becomes live; later ones go live only through re-embedding."""
        model = getattr(self.encoder, "model_name", "?")
        pretrained = getattr(self.encoder, "pretrained", "")
        self.repo.ensure_version(self.encoder_id, self.memory.collection, model, pretrained, self.encoder.dim)
        if self.store.live_collection(self.settings.memory_alias) is None:
            self.store.swap_alias(self.settings.memory_alias, self.memory.collection)
            self.repo.set_live_version(self.encoder_id)

    # --- jobs -------------------------------------------------------------------------------------
    def start_job(self, source: str, kind: str) -> int:
        return self.repo.create_job(source, kind, self.encoder_id)

    def finish_job(self, job_id: int, status: JobStatus = JobStatus.COMPLETED, error: str | None = None) -> None:
        self.repo.finish_job(job_id, status, error)

    # --- the batch --------------------------------------------------------------------------------
    def write_batch(self, job_id: int | None, inputs: Sequence[PreparedItem | FailedInput]) -> BatchOutcome:
        return self.store_batch(self.encode_batch(job_id, inputs))

    def write_items(self, inputs: Sequence[PreparedItem | FailedInput]) -> list[ItemResult]:
        """A batch outside any job (the embed workers' ledger rows): one result per input, in order."""
        encoded = self.encode_batch(None, inputs)
        self.store_batch(encoded)
        return encoded.results()

    def encode_batch(
        self, job_id: int | None, inputs: Sequence[PreparedItem | FailedInput], *, in_flight: Collection[str] = ()
    ) -> EncodedBatch:
        """Admit, mark pending, encode: everything before the vector write (:meth:`store_batch`).

        ``in_flight``: ids of an encoded batch whose store has not finished (a pipeline stores batch N
        while it encodes N+1); they count as duplicates here, as they would once stored.
        """
        outcome = BatchOutcome(seen=len(inputs))
        failures: list[FailedInput] = [i for i in inputs if isinstance(i, FailedInput)]
        batch, admitted = self._admit(
            [i for i in inputs if isinstance(i, PreparedItem)], failures, outcome, in_flight)
        entries = iter(admitted)
        encoded = EncodedBatch(job_id, outcome, failures, [], entries=[
            (None, i) if isinstance(i, FailedInput) else next(entries) for i in inputs])
        encoded.item_failures.update({i: f for i, f in admitted if i is not None and f is not None})  # taken down
        pending = Pending(batch.items, batch.prepared, {}, [])
        if pending.items:
            pending = self.writer.mark_pending(batch.items, batch.prepared)
            encoded.item_failures.update(pending.refused)
            failures += pending.refused.values()
        if pending.items:
            try:
                encoded.records = self.writer.encode(pending)
            except Exception as exc:  # noqa: BLE001 - a broken batch is recorded, never crashes the job
                broken = self.writer.fail(pending, exc)
                encoded.item_failures.update(broken)
                failures += broken.values()
        return encoded

    def store_batch(self, encoded: EncodedBatch) -> BatchOutcome:
        """Vectors to the memory, then *embedded* in the DB, then the job's counts (safe in a writer thread)."""
        outcome, failures = encoded.outcome, encoded.failures
        if encoded.records:
            self.writer.store(encoded.records)  # transient store errors propagate: the caller retries
            outcome.ingested += len(encoded.records)
        outcome.failed = len(failures)
        outcome.failures = [Failure(source=f.source, reason=f.reason, detail=f.detail) for f in failures]
        if encoded.job_id is not None:
            self.repo.record_failures(encoded.job_id, [FailureRecord(f.source, f.reason, f.detail) for f in failures])
            self.repo.add_job_counts(encoded.job_id, seen=outcome.seen, ingested=outcome.ingested,
                                     duplicates=outcome.duplicates, failed=outcome.failed)
        return outcome

    def _admit(
        self, prepared: list[PreparedItem], failures: list[FailedInput], outcome: BatchOutcome,
        in_flight: Collection[str] = (),
    ) -> tuple[_Batch, list[Entry]]:
        """Caption checks and dedupe (within the batch and against what is already embedded); one entry per input."""
        batch = _Batch()
        entries: list[Entry] = [(None, None)] * len(prepared)
        seen_ids: set[str] = set()
        candidates: list[tuple[int, NewItem, PreparedItem]] = []
        for n, p in enumerate(prepared):
            bad_row = row_problem(p.row)
            if bad_row is not None:
                failures.append(bad_row)
                entries[n] = (None, bad_row)
                continue
            caption, problem = clean_caption(
                p.row.caption, max_chars=self.settings.max_caption_chars, required=self.settings.require_caption)
            if problem is not None:
                failures.append(FailedInput(p.row.source, problem.reason, problem.detail))
                entries[n] = (None, failures[-1])
                continue
            item = _new_item(p, caption)
            entries[n] = (item.id, None)
            if item.id in seen_ids:
                outcome.duplicates += 1
                continue
            seen_ids.add(item.id)
            candidates.append((n, item, p))
        status = self.repo.embedding_status([c[1].id for c in candidates], self.encoder_id)
        taken_down = self.repo.deleted_among([c[1].id for c in candidates])
        # An item the metadata calls embedded is a duplicate only while its vectors are in the memory: vectors
        # lost (a store removed or replaced) are embedded again, never counted as duplicates.
        said_embedded = [c[1].id for c in candidates if status.get(c[1].id) == EmbedStatus.EMBEDDED]
        if said_embedded:
            present = self.memory.existing_ids(said_embedded)
            for item_id in said_embedded:
                if item_id not in present:
                    status.pop(item_id, None)
        for n, item, p in candidates:
            if item.id in taken_down:
                why = taken_down[item.id].deleted_reason or "no reason given"
                failures.append(FailedInput(p.row.source, RejectReason.TAKEN_DOWN,
                                            f"item {item.id} was taken down ({why})"))
                entries[n] = (item.id, failures[-1])
            elif status.get(item.id) == EmbedStatus.EMBEDDED or item.id in in_flight:
                outcome.duplicates += 1
            else:
                batch.items.append(item)
                batch.prepared.append(p)
        return batch, entries

    def index_pending(self, announce: Callable[[str], None] | None = None) -> int:
        """Build the HNSW index over the points waiting for one, when there are enough of them (embedded
        engine; a server indexes by itself). At the end of a job, so searches afterwards are fast."""
        return self.store.index_pending(on_start=None if announce is None else lambda name, n: announce(
            f"indexing {n} new points of {name} (HNSW) …"))

    # --- repair ----------------------------------------------------------------------------------
    def reconcile(self, limit: int = 10_000) -> ReconcileReport:
        """Pending rows whose vectors are in Qdrant become embedded; the rest stay pending for re-ingest.

        Embedded rows whose vectors are missing (Qdrant lost them) go back to pending.
        """
        report = ReconcileReport()
        pending = self.repo.item_ids_with_status(self.encoder_id, EmbedStatus.PENDING, limit)
        present = self.memory.existing_ids(pending)
        report.checked = len(pending)
        self.repo.set_status(sorted(present), self.encoder_id, EmbedStatus.EMBEDDED)
        report.marked_embedded = len(present)
        from app.services.restore import missing_vector_ids

        lost = missing_vector_ids(self.repo, self.memory, self.encoder_id)  # every embedded item, page by page
        self.repo.set_status(lost, self.encoder_id, EmbedStatus.PENDING, detail="vectors missing in Qdrant")
        report.reset_to_pending = len(lost)
        report.checked += self.repo.status_counts().get(self.encoder_id, {}).get(EmbedStatus.EMBEDDED, 0) + len(lost)
        return report


def _new_item(p: PreparedItem, caption: str) -> NewItem:
    row = p.row
    return NewItem(
        id=item_id_for(p.image_hash, caption), content_hash=content_hash(p.image_hash, caption),
        image_hash=p.image_hash, caption=caption,
        # the real path (a newline or U+202E in a name included), so re-embedding and retries can read it again;
        # names the database cannot hold (not UTF-8) were refused by row_problem
        source_uri=row.source if row.path is None else str(row.path),
        dataset=row.dataset, split=row.split, label=row.label, size_bytes=p.size_bytes,
        width=p.width if p.width is not None else (p.image.width if p.image is not None else None),
        height=p.height if p.height is not None else (p.image.height if p.image is not None else None),
        extra=dict(row.extra),
    )


def prepare_storage(settings: Settings) -> None:
    """Create the data dir and bring the metadata schema to head (embedded defaults need no setup)."""
    settings.ensure_dirs()
    upgrade_database(settings.resolved_database_url)
    open_store(settings)


def job_summary(repo: MetadataRepo, job_id: int) -> dict[str, Any]:
    job = repo.get_job(job_id)
    if job is None:
        raise KeyError(f"no ingest job {job_id}")
    failures = repo.job_failures(job_id)
    return {
        "job_id": job.id, "seen": job.seen, "ingested": job.ingested, "duplicates": job.duplicates,
        "failed": job.failed, "status": job.status,
        "failures": [{"source": f.source, "reason": f.reason, "detail": f.detail} for f in failures],
    }
