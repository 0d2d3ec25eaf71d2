#!/usr/bin/env bash
# Render a run's HTML report in headless Chromium and save a screenshot.
#
#   benchmarks/report_screenshot.sh [RUN_DIR] [OUT_PNG]
#
# Without RUN_DIR, runs a small zoo search first (`evomerge demo --budget 24`, the toy zoo is
# built on first use) in a temporary folder. Needs Debian's `chromium` (/usr/bin/chromium).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
RUN="${1:-}"
PNG="${2:-$PWD/report.png}"
if [[ -z "$RUN" ]]; then
  TMP="$(mktemp -d)"
  (cd "$ROOT" && "$PY" -m evomerge.cli demo --runs-dir "$TMP/runs" --name shot --budget 24 --no-progress)
  RUN="$TMP/runs/shot"
fi
HTML="$(cd "$ROOT" && "$PY" -m evomerge.cli report "$RUN")"
echo "report: $HTML ($(stat -c %s "$HTML") bytes)"
start=$(date +%s.%N)
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --screenshot="$PNG" \
  --window-size=1400,3000 "file://$HTML" 2>/dev/null
echo "screenshot: $PNG (chromium $(echo "$(date +%s.%N) - $start" | bc) s)"
