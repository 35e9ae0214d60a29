#!/usr/bin/env bash
# Render a report.html in real headless Chromium and save a screenshot, to check that the
# self-contained page (embedded images, tables) displays. Needs Debian's chromium
# (apt-get install chromium). Usage: scripts/render_report.sh DIR/report.html OUT.png
set -euo pipefail
html="$(realpath "$1")"
out="$(realpath -m "$2")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1200,1800 --hide-scrollbars \
  --screenshot="$out" "file://$html" 2>/dev/null
test -s "$out"
# the page must also parse and contain its sections (dump the DOM after load)
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --user-data-dir="$profile" --dump-dom "file://$html" 2>/dev/null \
  | grep -q "Selection map" && echo "rendered: $out"
