#!/usr/bin/env bash
# Runs crier's whole test suite. The integration tests start real servers: an SMTP server
# (aiosmtpd, from PyPI) and Kannel (bearerbox, smsbox and fakesmsc, Debian's kannel and
# kannel-extras), so each is installed first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd
fi
if ! { [ -x /usr/sbin/bearerbox ] && [ -x /usr/lib/kannel/test/fakesmsc ]; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # No package may start a daemon here (Kannel's would): the tests start their own.
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      made_policy=1
    fi
    apt-get install -y -qq kannel kannel-extras >/dev/null ||
      { apt-get update -qq && apt-get install -y -qq kannel kannel-extras >/dev/null; }
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  else
    echo "scripts/test.sh: Kannel is missing (apt-get install kannel kannel-extras as root); its test will fail" >&2
  fi
fi
exec cargo test --all-targets "$@"
