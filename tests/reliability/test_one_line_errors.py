"""Every error a user can cause ends a ``reco`` command with ONE line that says what is wrong and what to do:
exit 2 for usage, 1 for the environment, a traceback only with ``--debug`` — and never a secret.

The command runs in-process through ``app.cli.main`` (the console script's entry), with ``sys.argv`` set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from app.memory.store import close_stores
from tests.reliability.conftest import ReliabilitySummary

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "clothing10"
SECRETS = {"RECO_QDRANT_API_KEY": "qdrant-key-s3cr3t", "RECO_API_KEY": "api-key-s3cr3t",
           "RECO_BROKER_URL": "redis://:broker-pw-s3cr3t@127.0.0.1:1/0",
           "RECO_RESULT_BACKEND": "redis://:backend-pw-s3cr3t@127.0.0.1:1/1"}
SECRET_VALUES = ("qdrant-key-s3cr3t", "api-key-s3cr3t", "broker-pw-s3cr3t", "backend-pw-s3cr3t", "db-pw-s3cr3t")


def reco(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
         env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``reco ARGS`` as the console script does: (exit code, stdout, stderr)."""
    with monkeypatch.context() as m:
        for key, value in (env or {}).items():
            m.setenv(key, value)
        m.setattr(sys, "argv", ["reco", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            close_stores()
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, expected_code: int, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    for secret in SECRET_VALUES:
        assert secret not in err, (secret, lines[0])
    return lines[0]


@pytest.fixture
def tiny_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RECO_CLIP_MODEL", "reco-tiny")
    monkeypatch.setenv("RECO_CLIP_PRETRAINED", "")
    monkeypatch.setenv("RECO_DECODE_WORKERS", "0")
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    data = tmp_path / "reco-data"
    monkeypatch.setenv("RECO_DATA_DIR", str(data))
    return data


def small_manifest(folder: Path, n: int = 4) -> Path:
    """``n`` sample images with distinct captions, copied next to their manifest."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for i, image in enumerate(sorted(SAMPLE.glob("images/*.jpg"))[:n]):
        shutil.copy(image, folder / image.name)
        rows.append(f"{image.name},sample picture number {i}")
    manifest = folder / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_usage_errors_are_one_line_exit_2(tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch, reliability: ReliabilitySummary) -> None:
    manifest = small_manifest(tmp_path / "m")
    cases = {
        "--limit -1": (["ingest", str(manifest), "--limit", "-1"], ("--limit",)),
        "unknown option": (["ingest", str(manifest), "--nope"], ("--nope",)),
        "unknown command": (["searchh"], ("searchh",)),
        "--k 0": (["search", "--text", "x", "--k", "0"], ("--k",)),
        "empty SOURCE": (["ingest", ""], ("empty",)),
        "unknown job id": (["ingest", "--report", "--job", "99"], ("no ingest job 99",)),
        "search --image a folder": (["search", "--image", str(tmp_path)], ("folder",)),
        "unknown --mode": (["search", "--text", "x", "--mode", "weird"], ("--mode",)),
        "unknown revision": (["db", "downgrade", "zzz"], ("zzz",)),
        "not a source": (["ingest", "/etc/passwd"], ("/etc/passwd: unknown type",)),
    }
    for name, (args, needles) in cases.items():
        code, _, err = reco(args, capsys, monkeypatch)
        assert_one_line(code, err, 2, *needles)
        reliability.outcome("cli error", name, "reco", "one line, exit 2", "one line, exit 2")
    # the empty SOURCE never ingested the current folder
    assert not any(tiny_env.glob("memory/collections/*/segments"))


def test_settings_errors_show_no_input_and_no_secret(tiny_env: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     reliability: ReliabilitySummary) -> None:
    cases = {
        "qdrant url + memory path": {"RECO_QDRANT_URL": "http://127.0.0.1:1", "RECO_MEMORY_PATH": "/tmp/x"},
        "not a number": {"RECO_ENCODE_BATCH_SIZE": "many"},
        "below minimum": {"RECO_ENCODE_BATCH_SIZE": "-3"},
        "bad literal": {"RECO_DEVICE": "tpu"},
        "retired qdrant path": {"RECO_QDRANT_PATH": "/tmp/old"},
    }
    for name, env in cases.items():
        for command in (["status"], ["search", "--text", "x"], ["ingest", "--report"]):
            code, out, err = reco(command, capsys, monkeypatch, env)
            line = assert_one_line(code, err, 2)
            assert "input_value" not in line and "pydantic" not in line, line
            assert not any(s in out for s in SECRET_VALUES)
        reliability.outcome("secret in error", name, "settings", "no secret, one line", "no secret, one line")


def test_environment_errors_are_one_line_exit_1(tiny_env: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                reliability: ReliabilitySummary) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases: dict[str, tuple[list[str], dict[str, str], tuple[str, ...]]] = {
        "data dir is a file": (["status"], {"RECO_DATA_DIR": str(a_file)}, ("RECO_DATA_DIR",)),
        "PostgreSQL down": (["status"], {
            "RECO_DATABASE_URL": "postgresql+psycopg://postgres:db-pw-s3cr3t@127.0.0.1:1/test"},
            ("database", "RECO_DATABASE_URL")),
        "Qdrant server down": (["status"], {"RECO_QDRANT_URL": "http://u:db-pw-s3cr3t@127.0.0.1:1"},
                               ("RECO_QDRANT_URL",)),
        "broker down": (["ingest", str(small_manifest(tmp_path / "b")), "--async"], {}, ("broker",)),
    }
    for name, (args, env, needles) in cases.items():
        code, _, err = reco(args, capsys, monkeypatch, env)
        if name == "broker down":  # the dispatcher logs where it stopped; the command still ends in one line
            err = "\n".join(line for line in err.splitlines() if not line.startswith("ERROR "))
            err = "\n".join(line for line in err.splitlines() if "enqueue" not in line)
        assert_one_line(code, err, 1, *needles)
        reliability.outcome("cli error", name, "reco", "one line, exit 1", "one line, exit 1")


def test_encoder_errors_are_one_line(tiny_env: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = reco(["search", "--text", "x"], capsys, monkeypatch, {"RECO_CLIP_MODEL": "no-such-model"})
    assert_one_line(code, err, 2, "unknown model", "RECO_CLIP_MODEL")
    code, _, err = reco(["search", "--text", "x"], capsys, monkeypatch,
                        {"RECO_CLIP_PRETRAINED": "/no/such/weights.safetensors"})
    assert_one_line(code, err, 2, "not found", "RECO_CLIP_PRETRAINED")
    code, _, err = reco(["eval", "--checkpoint", "/no/such/fusion.safetensors"], capsys, monkeypatch)
    assert code in (1, 2) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-1500:]
    import torch

    if not torch.cuda.is_available():
        code, _, err = reco(["search", "--text", "x"], capsys, monkeypatch, {"RECO_DEVICE": "cuda"})
        assert_one_line(code, err, 1, "RECO_DEVICE")


def test_damaged_vector_store_is_one_line(tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch, reliability: ReliabilitySummary) -> None:
    code, out, err = reco(["ingest", str(small_manifest(tmp_path / "m")), "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["ingested"] == 4, err[-2000:]
    collection = next(p for p in (tiny_env / "memory" / "collections").iterdir() if p.is_dir())
    (collection / "edge_config.json").write_text("not json")
    code, _, err = reco(["search", "--text", "a dress"], capsys, monkeypatch)
    assert_one_line(code, err, 2, "damaged", "reco memory reconcile")
    (tiny_env / "memory" / "aliases.json").write_text("{broken")
    code, _, err = reco(["status"], capsys, monkeypatch)
    assert_one_line(code, err, 2, "damaged")
    reliability.outcome("cli error", "damaged vector store", "reco", "one line", "one line")


def test_read_only_and_full_data_dir_are_one_line(tiny_env: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  reliability: ReliabilitySummary) -> None:
    from tests.reliability.reliability_support import fill, read_only_folder, small_disk

    with read_only_folder(tmp_path / "ro") as mounted:
        if not mounted and os.access(tmp_path, os.W_OK) and os.geteuid() == 0:
            pytest.skip("cannot mount a read-only file system here (needs CAP_SYS_ADMIN)")
        if not mounted:
            (tmp_path / "ro").chmod(0o555)
        code, _, err = reco(["status"], capsys, monkeypatch, {"RECO_DATA_DIR": str(tmp_path / "ro" / "data")})
        assert_one_line(code, err, 1, "read-only", "RECO_DATA_DIR")
    reliability.outcome("cli error", "read-only data dir", "reco", "one line, exit 1", "one line, exit 1")
    with small_disk(tmp_path / "full", "2m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a small file system here (needs CAP_SYS_ADMIN)")
        fill(tmp_path / "full")
        code, _, err = reco(["status"], capsys, monkeypatch, {"RECO_DATA_DIR": str(tmp_path / "full" / "d")})
        assert_one_line(code, err, 1, "RECO_DATA_DIR")
    reliability.outcome("cli error", "full data dir", "reco", "one line, exit 1", "one line, exit 1")


def test_debug_shows_the_traceback_and_an_unexpected_error_is_one_line(
    tiny_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import app.services.status as status_module

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("boom with redis://:broker-pw-s3cr3t@h/0 inside")

    monkeypatch.setattr(status_module, "memory_status", broken)
    code, _, err = reco(["status"], capsys, monkeypatch)
    assert_one_line(code, err, 1, "ZeroDivisionError", "--debug")
    code, _, err = reco(["status", "--debug"], capsys, monkeypatch)
    assert code == 1 and "Traceback" in err and "broker-pw-s3cr3t" not in err, err[-2000:]


def test_log_lines_never_carry_a_secret(tiny_env: Path) -> None:
    import logging

    from app.errors import RedactingFilter, redact

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "connecting to %s with key %s", (
        "postgresql://u:db-pw-s3cr3t@h/db", "qdrant-key-s3cr3t"), None)
    assert RedactingFilter().filter(record)
    assert "s3cr3t" not in record.getMessage(), record.getMessage()
    assert "s3cr3t" not in redact("api_key=api-key-s3cr3t and amqp://guest:other-pass@h//")
    assert "other-pass" not in redact("amqp://guest:other-pass@h//")
    assert redact("/etc/passwd: unknown type, secret_santa.png") == "/etc/passwd: unknown type, secret_santa.png"


@pytest.mark.parametrize("caption", ["\u200b\u200b", "\u202e", "\u200e\u200f \u2066\u2069", "\ufeff", "\u3164",
                                     "\u2800\u2800", " \u00a0\u2003 ", "\u0301\u0301"])
def test_invisible_captions_are_empty_captions(caption: str) -> None:
    from app.schemas import RejectReason
    from app.services.ingest import clean_caption

    cleaned, problem = clean_caption(caption, max_chars=100, required=True)
    assert problem is not None and problem.reason == RejectReason.EMPTY_CAPTION, (caption, cleaned)
    assert clean_caption(caption, max_chars=100, required=False) == ("", None)
    assert clean_caption("a \u200bdog\u202e", max_chars=100, required=True)[1] is None  # visible text stays


def test_a_job_whose_process_was_killed_is_not_running_forever(tiny_env: Path, tmp_path: Path) -> None:
    from app.config import get_settings
    from app.db.repo import MetadataRepo, process_identity
    from app.db.session import upgrade_database
    from app.schemas import JobStatus

    settings = get_settings()
    settings.ensure_dirs()
    upgrade_database(settings.resolved_database_url)
    repo = MetadataRepo.from_url(settings.resolved_database_url)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = repo.create_job("alive", "manifest", "enc")
        theirs = repo.create_job("killed", "manifest", "enc")
        from sqlalchemy import update

        from app.db.models import IngestJob

        with repo.session() as s:  # the second job is the child's, as if it had started it
            s.execute(update(IngestJob).where(IngestJob.id == theirs).values(owner=process_identity(child.pid)))
        assert repo.get_job(theirs).status == JobStatus.RUNNING
    finally:
        child.kill()
        child.wait()
    assert repo.get_job(theirs).status == JobStatus.FAILED
    assert "ended before the job finished" in (repo.get_job(theirs).error or "")
    assert repo.get_job(mine).status == JobStatus.RUNNING  # this process is alive: its job still runs
    assert [j.status for j in repo.recent_jobs(5)] == [JobStatus.FAILED, JobStatus.RUNNING]


def test_first_commands_racing_on_an_empty_postgres_all_succeed(postgres_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    env |= {"RECO_DATABASE_URL": postgres_url, "RECO_DATA_DIR": str(tmp_path / "d")}
    script = "from app.db.session import upgrade_database; import sys; upgrade_database(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", script, postgres_url], env=env, cwd=Path(__file__).parents[2],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in results), [err[-800:] for code, err in results if code]


def test_query_images_are_read_capped_from_regular_files_only(
    tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    reliability: ReliabilitySummary,
) -> None:
    """Defect 6: /dev/zero, a FIFO, a folder, a file over the cap — refused at once with one line."""
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:
        fh.truncate(2 * 1024 * 1024)
    env = {"RECO_MAX_IMAGE_BYTES": str(1024 * 1024)}
    cases = {"/dev/zero": "/dev/zero", "FIFO": str(fifo), "folder": str(tmp_path), "over the cap": str(big)}
    for name, path in cases.items():
        for command in (["search", "--image", path], ["predict", "--image", path, "--labels", "a,b",
                                                      "--mode", "clip"]):
            result: list[tuple[int, str, str]] = []
            worker = threading.Thread(target=lambda c=command, out=result: out.append(
                reco(c, capsys, monkeypatch, env)), daemon=True)
            worker.start()
            worker.join(60)
            assert result, f"{command[0]} --image {name} did not return within 60 s"
            code, _, err = result[0]
            assert_one_line(code, err, 2)
            reliability.outcome("query image", name, f"reco {command[0]} --image", "refused at once",
                                "refused at once")


def test_read_image_file_reads_at_most_the_cap(tmp_path: Path) -> None:
    from app.imaging import ImageRejected, read_image_file

    good = tmp_path / "a.bin"
    good.write_bytes(b"x" * 100)
    assert read_image_file(good, 100) == b"x" * 100
    with pytest.raises(ImageRejected, match="cap"):
        read_image_file(good, 99)
    with pytest.raises(ImageRejected, match="not a regular file"):
        read_image_file("/dev/zero", 10)


def test_filter_on_an_extra_column_no_item_has_is_an_error(
    tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "m"
    manifest = small_manifest(folder)
    manifest.write_text(manifest.read_text().replace("image,caption", "image,caption,colour", 1)
                        .replace("\n", ",red\n").replace("image,caption,colour,red", "image,caption,colour"))
    code, out, err = reco(["ingest", str(manifest), "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["ingested"] == 4, err[-1500:]
    for key in ("nope", "extra.nope"):
        code, _, err = reco(["search", "--text", "a", "--filter", f"{key}=x"], capsys, monkeypatch)
        assert_one_line(code, err, 2, "unknown filter field")
    code, out, err = reco(["search", "--text", "a", "--filter", "extra.colour=blue", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["results"] == [], err  # a known column: no match is 0 results
    code, out, err = reco(["search", "--text", "a", "--filter", "extra.colour=red", "--json"], capsys, monkeypatch)
    assert code == 0 and len(json.loads(out)["results"]) == 4, err


def test_repr_of_the_settings_shows_no_secret() -> None:
    from app.config import Settings

    settings = Settings(broker_url="redis://:broker-pw-s3cr3t@h:6379/0", qdrant_api_key="qdrant-key-s3cr3t",
                        database_url="postgresql+psycopg://u:db-pw-s3cr3t@h/db", api_key="api-key-s3cr3t",
                        result_backend="redis://:backend-pw-s3cr3t@h/1")
    for text in (repr(settings), str(settings)):
        assert not any(secret in text for secret in SECRET_VALUES), text
    assert settings.broker_url.endswith("broker-pw-s3cr3t@h:6379/0")  # the value itself is intact


def test_classes_file_that_is_a_device_or_fifo_is_refused_at_once(tmp_path: Path) -> None:
    from app.manifest import ManifestError, load_classes

    fifo = tmp_path / "classes.txt"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo, tmp_path):
        with pytest.raises(ManifestError, match="not a regular file"):
            load_classes(path)
