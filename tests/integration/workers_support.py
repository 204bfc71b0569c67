"""Real worker processes for the worker tests: started as ``reco worker`` / ``reco beat`` subprocesses.

Each process gets its own session (process group), so a test can SIGKILL a worker with its pool
children at once, as an OOM killer or a power cut would. Nothing here runs tasks in eager mode.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECO = [sys.executable, "-c", "from app.cli import main; main()"]  # the `reco` entry point, this interpreter


def flickr_manifest(shared_data: Path, out: Path, n_rows: int) -> Path:
    """The first ``n_rows`` caption rows of Flickr8k (five per image), images copied under ``out``."""
    src = shared_data / "flickr8k"
    with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n_rows]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        if not (out / r["image"]).exists():
            shutil.copy(src / r["image"], out / r["image"])
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children), no warning."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=30)
        _wait_group_gone(self.popen.pid)

    def kill_pool_child(self) -> int:
        """SIGKILL the pool process only (an OOM kill): the worker's main process survives it."""
        import psutil

        children = psutil.Process(self.popen.pid).children(recursive=True)
        pool = [c for c in children if "python" in c.name().lower()]
        if not pool:
            raise RuntimeError(f"{self.name} has no pool process")
        pool[0].kill()
        return int(pool[0].pid)

    def stop(self, timeout_s: float = 30) -> None:
        """Warm shutdown (SIGTERM), SIGKILL if it does not finish in time."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        _wait_group_gone(self.popen.pid)


def _wait_group_gone(pgid: int, timeout_s: float = 15) -> None:
    """Pool children may outlive the main process by a moment; the Qdrant lock goes with the last."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Stack:
    """Environment shared by the test process and its worker processes."""

    env: dict[str, str]
    logs: Path
    procs: list[Proc] = field(default_factory=list)

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log = self.logs / f"{name}-{uuid.uuid4().hex[:6]}.log"
        env = os.environ.copy() | self.env
        with open(log, "wb") as fh:
            popen = subprocess.Popen([*RECO, *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def worker(self, queues: str, name: str, *, ready_timeout_s: float = 90, warm: bool = True) -> Proc:
        """``reco worker`` on ``queues``; returns once it consumes (and, for embed, its encoder is loaded)."""
        node = f"{name}-{uuid.uuid4().hex[:6]}@test"
        proc = self._spawn(name, ["worker", "--queues", queues, "--concurrency", "1", "--hostname", node,
                                  "--loglevel", "info"])
        wait_until(lambda: f"{node} ready." in proc.text() or not proc.alive(), ready_timeout_s, f"{name} ready")
        if not proc.alive():
            raise RuntimeError(f"worker {name} exited:\n{proc.text()[-4000:]}")
        if warm and "embed" in queues:
            wait_until(lambda: "embed worker warm" in proc.text() or "embed warm-up failed" in proc.text(),
                       ready_timeout_s, f"{name} encoder loaded")
        return proc

    def beat(self) -> Proc:
        return self._spawn("beat", ["beat", "--loglevel", "info"])

    def serve(self, *, ready_timeout_s: float = 120) -> Proc:
        """``reco serve`` on a free port; returns once it announced itself in the data dir (processes
        started after it, and this one after ``close_stores()``, then reach the memory through it)."""
        import json

        announcement = Path(self.env["RECO_DATA_DIR"]) / "serve.json"
        proc = self._spawn("serve", ["serve", "--port", "0"])

        def announced() -> bool:
            try:
                return json.loads(announcement.read_text()).get("pid") == proc.popen.pid or not proc.alive()
            except (OSError, ValueError):
                return not proc.alive()

        wait_until(announced, ready_timeout_s, "reco serve announced")
        if not proc.alive():
            raise RuntimeError(f"reco serve exited:\n{proc.text()[-4000:]}")
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


class PrivateRedis:
    """A redis-server of our own on a free port (no persistence, like the CI service): restartable
    without disturbing anyone else's tests on the shared 6379."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), 10, "private redis up")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(timeout=10)
        self.popen = None

    def restart(self, down_s: float = 1.0) -> None:
        """Stop (every queued message is lost: no persistence), stay down a moment, start again."""
        self.stop()
        time.sleep(down_s)
        self.start()


def _pings(client: object) -> bool:
    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- fixtures (imported by the test modules under the names they declare) -------------------------
N_ITEMS = 500  # 100 Flickr8k images x 5 captions
TEST_REDIS_DB = 12  # a db of its own on the shared Redis: flushed by these tests only
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module", name="manifest_500")
def manifest_500_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "flickr8k").is_dir():
        pytest.fail(f"Flickr8k not found under {SHARED_DATA}; set RECO_SHARED_DATA")
    return flickr_manifest(SHARED_DATA, tmp_path_factory.mktemp("flickr500"), N_ITEMS)


def worker_env(data_dir: Path, database_url: str, broker_url: str) -> dict[str, str]:
    """Small batches, short timeouts: the fault tests must finish in seconds on two shared cores."""
    return {
        "RECO_DATA_DIR": str(data_dir), "RECO_DATABASE_URL": database_url, "RECO_BROKER_URL": broker_url,
        "RECO_CLIP_MODEL": "reco-tiny", "RECO_CLIP_PRETRAINED": "", "RECO_DEVICE": "cpu",
        "RECO_DECODE_WORKERS": "1", "RECO_EMBED_MAX_BATCH": "32", "RECO_EMBED_MAX_WAIT_MS": "200",
        "RECO_INGEST_BATCH_SIZE": "50", "RECO_BROKER_VISIBILITY_TIMEOUT_S": "6",
        "RECO_INGEST_STALE_AFTER_S": "4", "RECO_MAINTENANCE_INTERVAL_S": "2", "RECO_WATCH_INTERVAL_S": "3600",
        "RECO_REEMBED_CHECK_INTERVAL_S": "3600", "RECO_REEMBED_BATCH_SIZE": "50", "HF_HUB_OFFLINE": "1",
        # queues of this test's own: another test run on the same Redis (another checkout) never takes its messages
        "RECO_BROKER_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}:",
    }


def make_stack(
    tmp_path: Path, postgres_url: str, broker_url: str, monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, str] | None = None,
) -> Stack:
    """The same RECO_* settings for this process (monkeypatched env) and the worker processes;
    ``overrides`` replace or add some of them for one test."""
    from app.db.session import upgrade_database

    env = worker_env(tmp_path / "reco-data", postgres_url, broker_url) | (overrides or {})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    upgrade_database(postgres_url)
    (tmp_path / "logs").mkdir(exist_ok=True)
    return Stack(env=env, logs=tmp_path / "logs")


def shared_redis_broker(redis_url: str) -> str:
    """A database of the shared Redis for these tests; each stack's keys carry a prefix of their own
    (RECO_BROKER_KEY_PREFIX), so runs on the same Redis never see each other's queues (nothing is flushed)."""
    return redis_url.rsplit("/", 1)[0] + f"/{TEST_REDIS_DB}"


@pytest.fixture(name="stack")
def stack_fixture(
    tmp_path: Path, postgres_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    from app.memory.store import close_stores

    stack = make_stack(tmp_path, postgres_url, shared_redis_broker(redis_url), monkeypatch)
    try:
        yield stack
    finally:
        stack.stop_all()
        close_stores()
