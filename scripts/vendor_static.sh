#!/usr/bin/env bash
# Copy the front-end packages the templates use from the npm registry into static/vendor/.
# The output is committed, so the server never needs npm or a CDN at run time.
# Rerun after changing a version below.
set -euo pipefail

HTMX_VERSION="2.0.11"
SWAGGER_UI_VERSION="5.35.0"  # the API page at /docs

repo="$(cd "$(dirname "$0")/.." && pwd)"
vendor="$repo/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm init -y >/dev/null
npm install --no-audit --no-fund --ignore-scripts "htmx.org@$HTMX_VERSION" "swagger-ui-dist@$SWAGGER_UI_VERSION" >/dev/null

mkdir -p "$vendor"
cp node_modules/htmx.org/dist/htmx.min.js "$vendor/htmx.min.js"
cp node_modules/htmx.org/LICENSE "$vendor/htmx.LICENSE"
mkdir -p "$vendor/swagger-ui"
for f in swagger-ui-bundle.js swagger-ui.css favicon-32x32.png LICENSE; do
  cp "node_modules/swagger-ui-dist/$f" "$vendor/swagger-ui/$f"
done
printf 'htmx.org@%s\nswagger-ui-dist@%s\n' "$HTMX_VERSION" "$SWAGGER_UI_VERSION" > "$vendor/VERSIONS"
echo "vendored into $vendor: $(tr '\n' ' ' < "$vendor/VERSIONS")"
