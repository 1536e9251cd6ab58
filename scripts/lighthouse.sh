#!/usr/bin/env bash
# Lighthouse on the pages customers meet first: the status page, the subscribe form and an
# incident's own page, served by `crier serve` (the debug build the tests made, unless
# CRIER_BIN names another) on a free port on 127.0.0.1, in Debian's chromium. Prints each
# page's four scores and fails when any is under 95 or the browser logged an error.
#
#   scripts/lighthouse.sh            (after scripts/test.sh, which builds crier and installs chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

min_score=95
lighthouse_version=12.2.3
lighthouse=target/npm/node_modules/.bin/lighthouse
crier_bin="${CRIER_BIN:-target/debug/crier}"

if [ ! -x "$lighthouse" ]; then
  npm install --prefix target/npm --no-audit --no-fund --silent "lighthouse@$lighthouse_version"
fi
[ -x "$crier_bin" ] || cargo build --quiet
command -v chromium >/dev/null || { echo "lighthouse.sh: chromium is missing (apt-get install chromium)" >&2; exit 1; }

work=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
cp -r templates "$work/templates"
mkdir -p "$work/channels"
cp channels/status.toml "$work/channels/status.toml"
sed -e "s#^public_url = .*#public_url = \"$base\"#" -e "s#^listen = .*#listen = \"127.0.0.1:$port\"#" \
  config.example.toml >"$work/crier.toml"
cat >"$work/channels/email.toml" <<EOF
kind = "email"
from = "Example Mobile <updates@example.com>"
transport = "file://var/outbox"
EOF

export CRIER_LINK_SECRET=lighthouse-link-secret-0123456789
export CRIER_API_TOKEN=lighthouse-admin-token-0123456789abcdef
crier() { "$crier_bin" --config "$work/crier.toml" "$@"; }
incident=$(crier send --yes --json --headline "Activations delayed" --next-update-in 2h \
  "New lines ordered today are not working yet. We're fixing it with our network provider." |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["incident"])')
crier send --yes --json --incident "$incident" --state identified --headline "Cause found" \
  --next-update-in 3h "The activation queue was stuck. We are clearing it now." >/dev/null

"$crier_bin" --config "$work/crier.toml" serve 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$base/healthz" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done

failed=0
for page in "/" "/subscribe" "/incidents/$incident.html"; do
  report="$work/report.json"
  CHROME_PATH=/usr/bin/chromium "$lighthouse" "$base$page" --quiet --output=json --output-path="$report" \
    --only-categories=performance,accessibility,best-practices,seo \
    --chrome-flags="--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update --disable-sync --no-first-run --user-data-dir=$work/profile"
  python3 - "$report" "$page" "$min_score" <<'PY' || failed=1
import json, sys
report, page, minimum = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
scores = {c["id"]: round((c["score"] or 0) * 100) for c in report["categories"].values()}
console = report["audits"]["errors-in-console"]
line = "  ".join(f"{name} {score}" for name, score in scores.items())
print(f"lighthouse {page}: {line}")
low = [name for name, score in scores.items() if score < minimum]
for name in low:
    failing = [a["title"] for a in report["audits"].values()
               if a.get("score") is not None and a["score"] < 1 and a.get("scoreDisplayMode") == "binary"]
    print(f"  {name} is under {minimum}; audits that did not pass: {failing}")
if console["score"] != 1:
    print(f"  the browser logged errors: {console.get('details', {}).get('items')}")
sys.exit(1 if low or console["score"] != 1 else 0)
PY
done
exit "$failed"
