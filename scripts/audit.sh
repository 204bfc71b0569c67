#!/usr/bin/env bash
# Dependency audit: pip-audit over the installed environment (.venv), known vulnerabilities listed.
#
# Non-fatal by design (CI runs it after the tests): findings are printed, the exit code stays 0 unless
# AUDIT_STRICT=1. pip-audit asks PyPI's JSON API (/pypi/<name>/<version>/json) and, failing that, OSV
# (api.osv.dev). Where neither answers (a registry mirror without the per-version JSON API, no route to
# OSV), nothing can be audited: the script says so plainly instead of reporting "no known vulnerabilities".
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -m pip_audit --version >/dev/null 2>&1; then
  echo "audit: pip-audit is not installed in $PY's environment (it is in the dev extra: pip install -e '.[dev]')"
  exit 0
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run_audit() {  # service -> $out/<service>.json, pip-audit's stderr in $out/<service>.err
  timeout "${AUDIT_TIMEOUT_S:-300}" "$PY" -m pip_audit --skip-editable --progress-spinner off \
    --vulnerability-service "$1" --format json --output "$out/$1.json" 2>"$out/$1.err"
}

# What one run found: "ok <audited> <skipped> <findings>" and the findings, or "unreachable <why>".
summarise() {
  "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
path, err = sys.argv[1], sys.argv[2]
try:
    deps = json.load(open(path))["dependencies"]
except (OSError, ValueError, KeyError):
    lines = [l for l in open(err, errors="replace").read().splitlines() if l.strip()]
    print("unreachable", (lines[-1] if lines else "no output")[:300])
    sys.exit()
audited = [d for d in deps if "skip_reason" not in d]
if not audited:  # every package "not found": the service is not answering, nothing was audited
    reason = deps[0]["skip_reason"] if deps else "no dependencies listed"
    print("unreachable", f"all {len(deps)} packages skipped, e.g. {reason}"[:300])
    sys.exit()
findings = [(d["name"], d["version"], v["id"], ",".join(v.get("fix_versions") or []) or "-")
            for d in audited for v in d.get("vulns", [])]
print("ok", len(audited), len(deps) - len(audited), len(findings))
for name, version, vid, fixes in findings:
    print(f"  {name} {version}: {vid} (fixed in: {fixes})")
PYEOF
}

for service in pypi osv; do
  run_audit "$service"
  result=$(summarise "$out/$service.json" "$out/$service.err")
  read -r state rest <<<"$(head -n1 <<<"$result")"
  if [[ $state == ok ]]; then
    read -r audited skipped findings <<<"$rest"
    echo "audit ($service): $audited packages audited, $skipped skipped (not on the index: local or editable)"
    if (( findings > 0 )); then
      echo "audit: $findings known vulnerabilities:"
      tail -n +2 <<<"$result"
      [[ ${AUDIT_STRICT:-0} == 1 ]] && exit 1
    else
      echo "audit: no known vulnerabilities in the audited packages"
    fi
    exit 0
  fi
  echo "audit ($service): service unreachable from this machine: $rest"
done

echo "NOTE: pip-audit could not reach a vulnerability service (PyPI's per-version JSON API or OSV) from this"
echo "      machine, so NOTHING was audited. Run scripts/audit.sh where pypi.org / api.osv.dev are reachable."
exit 0
