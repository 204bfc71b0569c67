#!/usr/bin/env bash
# Peak RSS of `reco ingest` over a manifest listing ONE 6000x6500 PNG N times (issue 17, defect 1).
#
#   scripts/ingest_peak_rss.sh [CODE_DIR] [N ...]      (default: this checkout, N = 1 16 64)
#
# CODE_DIR: the checkout whose code runs (e.g. an older commit unpacked with `git archive REV | tar -x -C DIR`),
# with this checkout's .venv. The PNG and the manifests are made in a temp folder, never committed.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
code="${1:-$here}"; shift || true
sizes=("${@:-1 16 64}"); [ $# -eq 0 ] && sizes=(1 16 64)
work="$(mktemp -d "${TMPDIR:-/tmp}/ingest-rss.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$here/.venv/bin/python" - "$work" <<'PY'
import sys
import numpy as np
from PIL import Image
w, h = 6000, 6500
x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
rgb = np.dstack([((x + y) / 2).astype(np.uint8), np.broadcast_to(x.astype(np.uint8), (h, w)),
                 np.broadcast_to(y.astype(np.uint8), (h, w))])
Image.fromarray(rgb).save(f"{sys.argv[1]}/big.png", optimize=True)
PY
for n in "${sizes[@]}"; do
  { echo "image,caption"; for _ in $(seq "$n"); do echo "big.png,a big gradient picture"; done; } > "$work/m$n.csv"
  out=$(cd "$code" && RECO_DATA_DIR="$work/data-$n" /usr/bin/time -v "$here/.venv/bin/python" -m app.cli ingest \
        "$work/m$n.csv" --json 2>&1)
  rss=$(echo "$out" | awk '/Maximum resident/ {print $NF}')
  echo "N=$n peak_rss_mb=$((rss / 1024)) $(echo "$out" | grep '^{')"
done
