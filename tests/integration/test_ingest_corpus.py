"""Issue 3's promise: a folder (and a manifest) mixing the bad-input corpus with good images — every bad one
recorded with its reason, no good one lost, and a second run adds nothing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.services.ingest import IngestService, prepare_storage
from ingestion.pipeline import ingest_source
from tests.fixtures.bad_inputs import folder_cases, make_corpus, manifest_cases, write_manifest


def _expected(cases) -> tuple[int, int, Counter[str]]:  # type: ignore[no-untyped-def]
    accepted = sum(c.expected == "accepted" for c in cases)
    duplicates = sum(c.expected == "duplicate" for c in cases)
    reasons = Counter(str(c.expected) for c in cases if c.expected not in {"accepted", "duplicate"})
    return accepted, duplicates, reasons


@pytest.fixture
def service(settings: Settings, tiny_encoder) -> IngestService:  # type: ignore[no-untyped-def]
    prepare_storage(settings)
    return IngestService(settings, encoder=tiny_encoder)


def test_folder_with_corpus_records_every_bad_input(service: IngestService, settings: Settings,
                                                     tmp_path: Path) -> None:
    cases = make_corpus(tmp_path / "corpus")
    expected_ok, expected_dup, expected_reasons = _expected(folder_cases(cases))
    summary = ingest_source(tmp_path / "corpus", settings, service=service, progress=False)
    assert summary["seen"] == len(folder_cases(cases))
    assert summary["ingested"] == expected_ok and summary["duplicates"] == expected_dup
    assert Counter(f["reason"] for f in summary["failures"]) == expected_reasons
    assert all(f["detail"] for f in summary["failures"]), "every failure says why"
    captions = {p.caption for p in service.memory.export_matrices().payloads}
    good = [c for c in folder_cases(cases) if c.expected == "accepted"]
    assert {" ".join(c.caption.split()) for c in good} <= captions, "no good item lost"
    again = ingest_source(tmp_path / "corpus", settings, service=service, progress=False)
    assert again["ingested"] == 0 and again["duplicates"] == expected_ok + expected_dup


def test_manifest_with_corpus_records_every_bad_row(service: IngestService, settings: Settings,
                                                    tmp_path: Path) -> None:
    cases = make_corpus(tmp_path / "corpus")
    manifest = write_manifest(tmp_path / "corpus", cases)
    expected_ok, expected_dup, expected_reasons = _expected(manifest_cases(cases))
    summary = ingest_source(manifest, settings, service=service, progress=False)
    assert summary["seen"] == len(manifest_cases(cases))
    assert (summary["ingested"], summary["duplicates"]) == (expected_ok, expected_dup)
    assert Counter(f["reason"] for f in summary["failures"]) == expected_reasons
    assert service.memory.count() == expected_ok


def test_cli_ingest_json_and_report(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECO_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("RECO_CLIP_MODEL", "reco-tiny")
    monkeypatch.setenv("RECO_CLIP_PRETRAINED", "")
    cases = make_corpus(tmp_path / "corpus")
    runner = CliRunner()
    result = runner.invoke(cli, ["ingest", str(tmp_path / "corpus"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"job_id", "seen", "ingested", "duplicates", "failed", "failures"}
    assert out["failed"] == len(out["failures"]) == sum(_expected(folder_cases(cases))[2].values())
    assert all(set(f) == {"source", "reason"} for f in out["failures"])
    report = runner.invoke(cli, ["ingest", "--report", "--json"])
    assert json.loads(report.stdout.strip().splitlines()[-1])["job_id"] == out["job_id"]
    search = runner.invoke(cli, ["search", "--text", "a photo", "--json", "--k", "3"])
    assert search.exit_code == 0, search.output
    assert len(json.loads(search.stdout.strip().splitlines()[-1])["results"]) == 3
    missing = runner.invoke(cli, ["ingest", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "error" in missing.output
