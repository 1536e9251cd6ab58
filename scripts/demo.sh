#!/usr/bin/env bash
# crier's main job on the embedded default: a sled store under var/, email written as .eml
# files into var/outbox, the status page into var/status, and a local webhook receiver on
# 127.0.0.1:9000 standing in for the partner. No outside service is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

export CRIER_LINK_SECRET="${CRIER_LINK_SECRET:-demo-link-secret-change-me}"
export CRIER_API_TOKEN="${CRIER_API_TOKEN:-demo-admin-token-change-me-please}"
export CRIER_WEBHOOK_SECRET="${CRIER_WEBHOOK_SECRET:-whsec_$(printf 'demo-partner-secret-change-me' | base64)}"

# The partner's endpoint in channels/partners.toml. Something else listening there would get
# the demo's signed webhook, so the demo stops instead.
partner_port=9000
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if port_taken "$partner_port"; then
  echo "demo: 127.0.0.1:$partner_port is taken; the demo's partner receiver needs it (channels/partners.toml). Stop what listens there and run the demo again." >&2
  exit 1
fi
if port_taken 8080; then
  echo "demo: note: 127.0.0.1:8080 is taken, so 'crier serve' (server.listen) will not start there until it is free." >&2
fi

# CRIER_DEMO_BIN runs a crier already built (the test suite runs the demo with its own).
crier_bin="${CRIER_DEMO_BIN:-./target/release/crier}"
[ -n "${CRIER_DEMO_BIN:-}" ] || cargo build --release --quiet
crier() { "$crier_bin" --config config.example.toml "$@"; }

# Each run starts from nothing, so its counts are its own.
if [ -e var/store ] || [ -e var/outbox ] || [ -e var/status ]; then
  echo "demo: starting clean: removing the last demo's var/store, var/outbox and var/status"
  rm -rf var/store var/outbox var/status
fi

python3 scripts/webhook_receiver.py "$partner_port" &
receiver=$!
trap 'kill $receiver 2>/dev/null' EXIT
for _ in $(seq 50); do
  port_taken "$partner_port" && break
  kill -0 "$receiver" 2>/dev/null || { echo "demo: the partner receiver did not start" >&2; exit 1; }
  sleep 0.1
done

set -x
crier check-config
crier subscribe --order AB-1001 --email ann@example.com --confirmed
crier subscribe --order AB-1002 --email ann@example.com --confirmed
crier subscribe --order AB-1003 --phone +447700900123 --confirmed
crier preview --headline "Activations delayed" --next-update-in 2h "New lines ordered today are not working yet. We're fixing it with our network provider. Sorry for the wait."
crier send    --headline "Activations delayed" --next-update-in 2h --yes "New lines ordered today are not working yet. We're fixing it with our network provider. Sorry for the wait."
crier deliveries
set +x
echo
echo "Emails:      $(ls var/outbox/*.eml | wc -l) file(s) in var/outbox/"
echo "Status page: var/status/status.html, var/status/feed.atom, var/status/status.json"
echo
echo "To see the same thing served, with the subscribe form and the console, run:"
echo "  CRIER_LINK_SECRET=$CRIER_LINK_SECRET CRIER_API_TOKEN=$CRIER_API_TOKEN $crier_bin --config config.example.toml serve"
echo "then open http://127.0.0.1:8080/ (the status page) and http://127.0.0.1:8080/admin (sign in with the CRIER_API_TOKEN above)."
