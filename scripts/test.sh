#!/usr/bin/env bash
# Runs crier's whole test suite. The tests start real servers and a real browser: an SMTP
# server (aiosmtpd, from PyPI; openapi-spec-validator too, which checks the API's document), PostgreSQL (Debian's postgresql: initdb into a temporary folder,
# the server on a free port, stopped when the tests end), Kannel (bearerbox, smsbox and
# fakesmsc, Debian's kannel and kannel-extras) and headless chromium driven over WebDriver (Debian's chromium and
# chromium-driver), which checks pages for accessibility with axe-core (from npm, into
# target/npm; Debian's nodejs and npm to fetch it), so each is installed first when missing.
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
# Validates the admin API's OpenAPI document against the schema of its version.
if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check openapi-spec-validator
fi
if ! { [ -x /usr/sbin/bearerbox ] && [ -x /usr/lib/kannel/test/fakesmsc ]; }; then
  if can_apt_install; then
    apt_install kannel kannel-extras
  else
    echo "scripts/test.sh: Kannel is missing (apt-get install kannel kannel-extras as root); its test will fail" >&2
  fi
fi
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  if can_apt_install; then
    apt_install postgresql
  else
    echo "scripts/test.sh: PostgreSQL is missing (apt-get install postgresql as root); its tests will fail" >&2
  fi
fi
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  if can_apt_install; then
    apt_install chromium chromium-driver
  else
    echo "scripts/test.sh: chromium is missing (apt-get install chromium chromium-driver as root); the browser test will fail" >&2
  fi
fi
axe_core=axe-core@4.10.3
if [ ! -f target/npm/node_modules/axe-core/axe.min.js ]; then
  if ! command -v npm >/dev/null && can_apt_install; then
    apt_install nodejs npm || true
  fi
  if ! { command -v npm >/dev/null &&
    npm install --prefix target/npm --no-audit --no-fund --silent "$axe_core" &&
    [ -f target/npm/node_modules/axe-core/axe.min.js ]; }; then
    echo "scripts/test.sh: axe-core is missing (npm install --prefix target/npm $axe_core); the browser test will fail" >&2
  fi
fi
exec cargo test --all-targets "$@"
