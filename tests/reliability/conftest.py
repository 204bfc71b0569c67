"""Reliability and security tests: the session's figures, printed as one table at the end of the run.

Every test reports what it tried to the session-scoped :class:`ReliabilitySummary` (fixture
``reliability``): the kinds of bad input and the outcome each got, the faults it injected, and the item
counts of each scenario (submitted = embedded + failed; lost and duplicated must be 0). The table is
printed by ``pytest_terminal_summary`` and written to ``test-artifacts/reliability_summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.workers_support import stack_fixture  # noqa: F401 - a fixture
from tests.reliability.reliability_support import ensure_postgres_running

ARTIFACT = Path(__file__).resolve().parents[2] / "test-artifacts" / "reliability_summary.json"


@dataclass
class KindOutcome:
    category: str  # image, caption/manifest, upload, ...
    kind: str
    path: str  # which way in: folder, csv, jsonl, zip upload, predict upload, async worker, ...
    expected: str
    observed: str


@dataclass
class Scenario:
    name: str
    submitted: int
    embedded: int
    failed: int
    lost: int
    duplicated: int
    faults: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class ReliabilitySummary:
    kinds: list[KindOutcome] = field(default_factory=list)
    scenarios: list[Scenario] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # security checks that passed
    other_faults: list[dict[str, str]] = field(default_factory=list)  # faults with no items to count

    def fault(self, name: str, detail: str) -> None:
        self.other_faults.append({"fault": name, "detail": detail})

    def outcome(self, category: str, kind: str, path: str, expected: object, observed: object) -> None:
        self.kinds.append(KindOutcome(category, kind, path, str(expected), str(observed)))

    def scenario(self, name: str, *, submitted: int, embedded: int, failed: int, lost: int, duplicated: int,
                 faults: list[str] | tuple[str, ...] = (), note: str = "") -> None:
        self.scenarios.append(Scenario(name, submitted, embedded, failed, lost, duplicated, list(faults), note))

    def check(self, name: str) -> None:
        self.checks.append(name)

    # --- the report -------------------------------------------------------------------------------
    def totals(self) -> dict[str, Any]:
        kinds = sorted({(k.category, k.kind) for k in self.kinds})
        faults = [f for s in self.scenarios for f in s.faults] + [f["fault"] for f in self.other_faults]
        per_category: dict[str, int] = {}
        for category, _ in kinds:
            per_category[category] = per_category.get(category, 0) + 1
        sums = {key: sum(getattr(s, key) for s in self.scenarios)
                for key in ("submitted", "embedded", "failed", "lost", "duplicated")}
        mismatched = [asdict(k) for k in self.kinds if k.expected != k.observed]
        return {"kinds_of_bad_input": len(kinds), "kinds_per_category": per_category,
                "outcomes_checked": len(self.kinds), "outcomes_not_as_expected": mismatched,
                "faults_injected": len(faults), "faults": faults, **sums}

    def lines(self) -> list[str]:
        totals = self.totals()
        categories = ", ".join(f"{c} {n}" for c, n in sorted(totals["kinds_per_category"].items()))
        out = [f"kinds of bad input tried: {totals['kinds_of_bad_input']} ({categories}); "
               f"{totals['outcomes_checked']} outcomes checked, {len(totals['outcomes_not_as_expected'])} unexpected",
               f"faults injected: {totals['faults_injected']} ({', '.join(totals['faults']) or 'none'})"]
        out += [f"  {f['fault']}: {f['detail']}" for f in self.other_faults]
        if self.checks:
            out.append(f"security checks passed: {len(self.checks)} ({', '.join(self.checks)})")
        if not self.scenarios:
            return out
        width = max([len(s.name) for s in self.scenarios] + [8])
        header = f"{'scenario':<{width}}  submitted  embedded  failed  lost  duplicated"
        out += [header, "-" * len(header)]
        for s in self.scenarios:
            out.append(f"{s.name:<{width}}  {s.submitted:>9}  {s.embedded:>8}  {s.failed:>6}  {s.lost:>4}  "
                       f"{s.duplicated:>10}")
        out.append("-" * len(header))
        out.append(f"{'total':<{width}}  {totals['submitted']:>9}  {totals['embedded']:>8}  {totals['failed']:>6}  "
                   f"{totals['lost']:>4}  {totals['duplicated']:>10}")
        return out

    def as_json(self) -> dict[str, Any]:
        return {"totals": self.totals(), "scenarios": [asdict(s) for s in self.scenarios],
                "other_faults": self.other_faults, "kinds": [asdict(k) for k in self.kinds],
                "security_checks": self.checks}


_SUMMARY = pytest.StashKey[ReliabilitySummary]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SUMMARY] = ReliabilitySummary()


@pytest.fixture(scope="session")
def reliability(pytestconfig: pytest.Config) -> ReliabilitySummary:
    return pytestconfig.stash[_SUMMARY]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    summary = config.stash.get(_SUMMARY, None)
    if summary is None or not (summary.kinds or summary.scenarios or summary.checks or summary.other_faults):
        return
    terminalreporter.section("reliability summary")
    for line in summary.lines():
        terminalreporter.write_line(line)
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(summary.as_json(), indent=2) + "\n")
    terminalreporter.write_line(f"(written to {ARTIFACT.relative_to(ARTIFACT.parents[1])})")


@pytest.fixture
def restartable_postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh database like ``postgres_url``'s, dropped only once PostgreSQL is back up (the fault tests
    restart it)."""
    from tests.fixtures.postgres import fresh_database

    with fresh_database(postgres_server_url, before_drop=ensure_postgres_running) as url:
        yield url
