#!/usr/bin/env bash
# Runs crier's whole test suite. The integration tests start real servers and a real browser:
# an SMTP server (aiosmtpd, from PyPI), Kannel (bearerbox, smsbox and fakesmsc, Debian's kannel
# and kannel-extras) and headless chromium driven over WebDriver (Debian's chromium and
# chromium-driver), so each is installed first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs Debian packages, as root. No package may start a daemon here (Kannel's would): the
# tests start their own.
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  local made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  apt-get install -y -qq "$@" >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
  if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
}

can_apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null
}

if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd
fi
if ! { [ -x /usr/sbin/bearerbox ] && [ -x /usr/lib/kannel/test/fakesmsc ]; }; then
  if can_apt_install; then
    apt_install kannel kannel-extras
  else
    echo "scripts/test.sh: Kannel is missing (apt-get install kannel kannel-extras as root); its test will fail" >&2
  fi
fi
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  if can_apt_install; then
    apt_install chromium chromium-driver
  else
    echo "scripts/test.sh: chromium is missing (apt-get install chromium chromium-driver as root); the browser test will fail" >&2
  fi
fi
exec cargo test --all-targets "$@"
