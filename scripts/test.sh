#!/usr/bin/env bash
# Runs crier's whole test suite. The integration tests start a real SMTP server (aiosmtpd,
# from PyPI), so it is installed first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd
fi
exec cargo test --all-targets "$@"
