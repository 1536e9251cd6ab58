#!/usr/bin/env bash
# crier's main job on the embedded default: a sled store under var/, email written as .eml
# files into var/outbox, the status page into var/status, and a local webhook receiver on
# 127.0.0.1:9000 standing in for the partner. No outside service is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

export CRIER_LINK_SECRET="${CRIER_LINK_SECRET:-demo-link-secret-change-me}"
export CRIER_API_TOKEN="${CRIER_API_TOKEN:-demo-admin-token-change-me-please}"
export CRIER_WEBHOOK_SECRET="${CRIER_WEBHOOK_SECRET:-whsec_$(printf 'demo-partner-secret-change-me' | base64)}"

cargo build --release --quiet
crier() { ./target/release/crier --config config.example.toml "$@"; }

python3 scripts/webhook_receiver.py 9000 &
receiver=$!
trap 'kill $receiver 2>/dev/null' EXIT
sleep 0.5

set -x
crier check-config
crier subscribe --order AB-1001 --email ann@example.com --confirmed
crier subscribe --order AB-1002 --email ann@example.com --confirmed
crier subscribe --order AB-1003 --phone +447700900123 --confirmed
crier preview --headline "Activations delayed" --next-update-in 2h "We're working on it. Sorry. Next update by 16:00."
crier send    --headline "Activations delayed" --next-update-in 2h --yes "We're working on it. Sorry. Next update by 16:00."
crier deliveries
set +x
echo
echo "Emails:      $(ls var/outbox/*.eml | wc -l) file(s) in var/outbox/"
echo "Status page: var/status/status.html, var/status/feed.atom, var/status/status.json"
