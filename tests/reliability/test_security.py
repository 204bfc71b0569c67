"""Security: nothing loaded runs pickled code, paths stay confined, URL sources are off, SQL and filters are
never built from strings, secrets never reach output or logs, uploads are capped, dependencies audited.

(docker-compose binds every port to 127.0.0.1 and takes passwords from the environment: that is checked in
``tests/unit/test_compose.py``, not repeated here.)
"""

from __future__ import annotations

import ast
import http.server
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.encoder.weights import UnsafeCheckpointError
from app.imaging import ImageRejected
from app.manifest import read_manifest
from app.memory.qdrant import build_filter
from app.schemas import RejectReason
from app.services.ingest import IngestService, prepare_storage
from ingestion.decode import FileRejected, fetch_url
from ingestion.pipeline import ingest_source
from ingestion.uploads import UploadRejected, store_upload, upload_root
from tests.conftest import SHARED_DATA
from tests.fixtures.bad_inputs import bilevel_png, noise_image
from tests.integration.workers_support import RECO, ROOT, flickr_manifest, wait_until
from tests.reliability.conftest import ReliabilitySummary
from tests.reliability.reliability_support import PasswordRedis
from tests.reliability.source_scan import scan, secrets_output, sql_from_strings, unsafe_loads


class _Exploit:
    """Unpickling this creates ``marker``: a file that must never appear."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _evil_npy(path: Path, marker: Path) -> None:
    np.save(path, np.array([_Exploit(marker)], dtype=object), allow_pickle=True)


def test_nothing_loaded_from_disk_runs_pickled_code(
    settings: Settings, tiny_encoder, tmp_path: Path, reliability: ReliabilitySummary  # type: ignore[no-untyped-def]
) -> None:
    """Every file the service loads that a user or an attacker could swap: encoder weights and fusion
    checkpoints named in the settings, the memory cache, the class-embedding cache, a published snapshot."""
    from app.encoder import create_encoder
    from app.memory.exact import ExactIndex
    from app.services.method_common import _cache_path, load_matrices
    from app.services.predict import PredictRequest, predict_image
    from app.zeroshot import ClassEmbeddingCache

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": {}, "meta": {}, "x": _Exploit(marker)}, fh, protocol=2)
    with pytest.raises(UnsafeCheckpointError):  # RECO_CLIP_PRETRAINED=evil.pt
        create_encoder(settings.model_copy(update={"clip_pretrained": str(evil)})).encode_texts(["x"])

    prepare_storage(settings)
    service = IngestService(settings, encoder=tiny_encoder)
    ingest_source(flickr_manifest(SHARED_DATA, tmp_path / "f", 10), settings, service=service, progress=False)
    image = next((tmp_path / "f" / "images").iterdir()).read_bytes()
    with pytest.raises(UnsafeCheckpointError):  # RECO_FUSION_CHECKPOINT=evil.pt, on the predict path
        predict_image(settings.model_copy(update={"fusion_checkpoint": str(evil)}),
                      PredictRequest(image_bytes=image, classes=["a", "b"], mode="both"), encoder=tiny_encoder,
                      memory=service.memory)

    cache = _cache_path(settings, service.memory, None)  # the .npz memory cache of train/eval
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, ids=np.array(["x"]), image=np.zeros((1, 4)), text=np.zeros((1, 4)),
             image_hashes=np.array(["h"]), payloads=np.array([_Exploit(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_matrices(settings, service.memory)

    _evil_npy(tmp_path / "classes.npy", marker)  # the zero-shot class-embedding cache: a miss, never a load
    assert ClassEmbeddingCache(tmp_path).get("classes") is None

    snapshot = ExactIndex.from_matrices(service.memory.export_matrices()).save(tmp_path / "snapshot")
    _evil_npy(snapshot / "ids.npy", marker)  # a snapshot the refine worker would memory-map
    with pytest.raises(ValueError, match="allow_pickle"):
        ExactIndex.load(snapshot)
    assert not marker.exists(), "pickled code ran"
    reliability.check("pickle payloads refused (weights, checkpoint, 3 caches)")


def test_no_unsafe_loads_no_sql_from_strings_no_secret_printed(reliability: ReliabilitySummary) -> None:
    # the scanners flag what they must (a scanner that finds nothing anywhere proves nothing)
    bad = ast.parse('torch.load(p)\npickle.loads(b)\nnp.load(p, allow_pickle=True)\nyaml.load(s)\n'
                    's.execute(f"SELECT * FROM t WHERE a = {x}")\ns.execute("DELETE FROM t WHERE a = %s" % x)\n'
                    'text("SELECT " + col)\nconn.exec_driver_sql("DROP {}".format(t))\n')
    assert len(unsafe_loads(bad)) == 4 and len(sql_from_strings(bad)) == 4
    leaky = ast.parse('log.info("db %s", settings.database_url)\nst.error(f"broker {settings.broker_url}")\n'
                      'print(settings)\nlog.info("db %s", redact(settings.database_url))\n')
    assert len(secrets_output(leaky)) == 3
    fine = ast.parse('torch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\n'
                     'yaml.load(s, Loader=SafeLoader)\ns.execute(select(T).where(T.a == x))\ntext("SELECT 1")\n'
                     'cur.execute("PRAGMA foreign_keys=ON")\n')
    assert unsafe_loads(fine) == [] and sql_from_strings(fine) == []
    assert scan(unsafe_loads) == []
    assert scan(sql_from_strings) == []
    assert scan(secrets_output) == []
    reliability.check("AST scan: no unsafe loads, no SQL from strings, no secret printed")


def test_filter_values_travel_as_bound_parameters_and_filter_models(
    settings: Settings, tiny_encoder, tmp_path: Path, reliability: ReliabilitySummary  # type: ignore[no-untyped-def]
) -> None:
    from app.services.search import SearchRequest, SearchService

    prepare_storage(settings)
    service = IngestService(settings, encoder=tiny_encoder)
    ingest_source(flickr_manifest(SHARED_DATA, tmp_path / "f", 10), settings, service=service, progress=False)
    hostile = "f' OR '1'='1' --"
    flt = build_filter({"dataset": hostile})
    assert flt is not None and flt.must[0].match.value == hostile  # type: ignore[index,union-attr]
    for key in ("dataset' OR 1=1 --", "a b", "x;drop"):
        with pytest.raises(ValueError):
            build_filter({key: "f"})
    assert service.memory.count({"dataset": hostile}) == 0 and service.memory.count({"dataset": "f"}) == 10
    search = SearchService(settings, encoder=tiny_encoder, memory=service.memory)
    assert search.search(SearchRequest(text="a dog", k=5, filters={"dataset": hostile})).results == []

    statements: list[tuple[str, object]] = []
    engine = service.repo.session_factory.kw["bind"]
    listener = lambda conn, cursor, statement, params, context, many: statements.append((statement, params))  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        rows, total = service.repo.list_items(filters={"dataset": hostile, "split": "train"})
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert (rows, total) == ([], 0)
    assert statements and not any(hostile in statement for statement, _ in statements)
    assert any(hostile in str(params) for _, params in statements), "the value went in as a parameter"
    reliability.check("filters: bound parameters and Qdrant filter models")


def test_paths_stay_confined_and_url_sources_are_off(
    settings: Settings, tmp_path: Path, reliability: ReliabilitySummary
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (folder / "link.png").symlink_to(outside / "secret.png")
    refs = ["/etc/passwd", "../outside/secret.png", "link.png", "file:///etc/passwd", "sub/../../outside/secret.png",
            "http://127.0.0.1/x.png"]
    (folder / "m.csv").write_text("image,caption\n" + "".join(f"{r},c\n" for r in refs))
    problems = [row.problem[0] if row.problem else None for row in read_manifest(folder / "m.csv")]
    assert problems == [RejectReason.PATH_OUTSIDE_ROOT] * 5 + [RejectReason.URL_NOT_ALLOWED]
    opened = [row.problem for row in read_manifest(folder / "m.csv", allowed_roots=[outside])]
    assert opened[1:3] == [None, None] and opened[0] is not None  # RECO_ALLOWED_ROOTS opens that root only
    assert Settings().allow_url_sources is False and Settings().allowed_roots == []

    stored = store_upload("../../../evil.csv", b"image,caption\n/etc/passwd,x\n", settings)
    assert stored.source.parent.parent == upload_root(settings)  # a name's folders are dropped
    with pytest.raises(UploadRejected) as caught:
        store_upload("z.zip", _zip({"../../evil.png": b"x"}), settings)
    assert caught.value.reason == RejectReason.PATH_OUTSIDE_ROOT
    assert not (tmp_path / "evil.png").exists() and not (settings.data_dir / "evil.png").exists()

    redirect = _redirecting_server("file:///etc/passwd")  # URL sources on: a redirect must not leave http(s)
    try:
        with pytest.raises(FileRejected, match="file:///etc/passwd"):
            fetch_url(f"http://127.0.0.1:{redirect.server_address[1]}/x.png", max_bytes=1 << 20)
    finally:
        redirect.shutdown()
        redirect.server_close()
    reliability.check("paths confined, URL sources off, no redirect out of http(s)")


def _zip(members: dict[str, bytes]) -> bytes:
    import io

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def _redirecting_server(location: str) -> http.server.ThreadingHTTPServer:
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(302)
            self.send_header("Location", location)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_upload_caps_on_bytes_pixels_and_file_count(
    settings: Settings, tiny_encoder, tmp_path: Path, reliability: ReliabilitySummary  # type: ignore[no-untyped-def]
) -> None:
    from app.services.predict import PredictRequest, predict_image
    from ui.cli import streamlit_command

    capped = settings.model_copy(update={"upload_max_total_bytes": 1 << 20, "upload_max_files": 3})
    big = _zip({"noise.bmp": noise_image(1, (700, 700)).tobytes()})  # ~1.4 MB of noise: does not compress
    with pytest.raises(UploadRejected) as caught:
        store_upload("big.zip", big, capped)
    assert caught.value.reason == RejectReason.TOO_LARGE and "upload cap" in caught.value.detail
    with pytest.raises(UploadRejected) as caught:
        store_upload("many.zip", _zip({f"{n}.png": bilevel_png(4, 4) for n in range(4)}), capped)
    assert caught.value.reason == RejectReason.TOO_LARGE and "4 images" in caught.value.detail
    command = streamlit_command(capped, 8501, headless=True)  # the HTTP layer caps bytes too, and binds locally
    assert command[command.index("--server.maxUploadSize") + 1] == "1"
    assert command[command.index("--server.address") + 1] == "127.0.0.1"

    prepare_storage(settings)
    bomb = bilevel_png(8_000, 8_000)  # 64 Mpx in ~10 kB: under every byte cap, over the pixel cap
    stored = store_upload("px.zip", _zip({"bomb.png": bomb, "bomb.txt": b"a caption"}), settings)
    summary = ingest_source(stored.source, settings, service=IngestService(settings, encoder=tiny_encoder),
                            progress=False)
    assert [f["reason"] for f in summary["failures"]] == [RejectReason.DECOMPRESSION_BOMB]
    with pytest.raises(ImageRejected) as refused:
        predict_image(settings, PredictRequest(image_bytes=bomb, classes=["a", "b"], mode="clip"), encoder=tiny_encoder)
    assert refused.value.reason == RejectReason.DECOMPRESSION_BOMB
    reliability.check("upload caps: bytes, files, pixels")


# --- secrets ---------------------------------------------------------------------------------------------
DB_PASSWORD, API_KEY, REDIS_PASSWORD = "Pw-db-7f3a9c", "Key-qdrant-51e0b2", "Pw-redis-c4d8e1"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _leaks(text: str) -> list[str]:
    return [secret for secret in (DB_PASSWORD, API_KEY, REDIS_PASSWORD) if secret in text]


@pytest.fixture
def secret_env(tmp_path: Path, postgres_url: str) -> Iterator[dict[str, str]]:
    from sqlalchemy.engine import make_url

    redis_server = PasswordRedis(tmp_path, REDIS_PASSWORD)
    redis_server.start()
    db_url = make_url(postgres_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    try:
        yield {"RECO_DATA_DIR": str(tmp_path / "data"), "RECO_DATABASE_URL": db_url, "RECO_QDRANT_API_KEY": API_KEY,
               "RECO_BROKER_URL": redis_server.url, "RECO_CLIP_MODEL": "reco-tiny",
               "RECO_CLIP_PRETRAINED": "", "HF_HUB_OFFLINE": "1"}
    finally:
        redis_server.stop()


@pytest.mark.slow
@pytest.mark.postgres
def test_secrets_come_from_the_environment_and_never_reach_output_or_logs(
    secret_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    reliability: ReliabilitySummary,
) -> None:
    """A password in RECO_DATABASE_URL and in RECO_BROKER_URL (a Redis with requirepass), and
    RECO_QDRANT_API_KEY: ``reco status --json`` (working, and failing against an unreachable Qdrant server,
    with every log record at DEBUG), and the start-up logs of a worker and of beat at DEBUG, show none of them."""
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []  # worker and beat start in the background while status runs here
    for name, args in (("worker", ["worker", "--queues", "refine", "--hostname", "secret@test", "--loglevel", "debug"]),
                       ("beat", ["beat", "--loglevel", "debug"])):
        with open(logs / f"{name}.log", "wb") as fh:
            procs.append(subprocess.Popen([*RECO, *args], cwd=ROOT, env=os.environ | secret_env, stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for key, value in secret_env.items():
            monkeypatch.setenv(key, value)
        caplog.set_level("DEBUG")
        runner = CliRunner()
        status = runner.invoke(cli, ["status", "--json"])
        assert status.exit_code == 0, status.output[-2000:]
        assert '"database": "postgresql+psycopg://postgres:***@' in status.stdout
        monkeypatch.setenv("RECO_QDRANT_URL", f"http://127.0.0.1:{_closed_port()}")
        failing = runner.invoke(cli, ["status", "--json"])
        assert failing.exit_code != 0 and failing.exception is not None
        error = "".join(traceback.format_exception(failing.exception))
        wait_until(lambda: "secret@test ready." in (logs / "worker.log").read_text(errors="replace"), 90,
                   "worker ready")
        time.sleep(2)  # beat sends its first schedule; the worker logs what it received
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    outputs = {"status output": status.output, "failing status": failing.output + error, "log records": caplog.text,
               **{p.name: p.read_text(errors="replace") for p in logs.iterdir()}}
    assert "Connected to redis://:**@" in outputs["worker.log"]  # Celery masks it; our own lines must too
    leaked = {where: _leaks(text) for where, text in outputs.items() if _leaks(text)}
    assert leaked == {}, leaked
    assert Settings.model_config.get("env_file") is None  # the environment only: no .env file read behind one's back
    defaults = {name: field.default for name, field in Settings.model_fields.items() if isinstance(field.default, str)}
    assert not [name for name, value in defaults.items() if "@" in value], "a default carries credentials"
    reliability.check("secrets absent from status output, errors, log records and worker/beat logs")


def test_pip_audit_is_wired_into_ci(reliability: ReliabilitySummary) -> None:
    script = ROOT / "scripts" / "audit.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    assert "scripts/audit.sh" in (ROOT / ".ci" / "run").read_text()
    assert "pip-audit" in (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    reliability.check("pip-audit in CI")
