#!/usr/bin/env bash
# Runs the tests with dependencies at the lower bounds pyproject.toml names, so that a bound
# that no longer holds (code started to use a newer API) shows up as a failing test.
#
#   bash scripts/check_lower_bounds.sh                     # the whole suite
#   bash scripts/check_lower_bounds.sh -m 'not slow' tests/app
#
# The virtual environment (default /tmp/usae-lower-bounds, or $LOWER_BOUNDS_VENV) sees this
# Python's packages (--system-site-packages: torch and the rest stay as installed) and holds,
# over them, each package of CHECKED at its lower bound. Arguments go to pytest.
# docs/architecture.md ("Lower bounds ...") says what was last checked.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${LOWER_BOUNDS_VENV:-/tmp/usae-lower-bounds}
# Checked packages; torch, torchvision, numpy and the scientific stack are not (their wheels
# are tied to each other and to the Python version).
CHECKED="fastapi uvicorn sqlalchemy alembic pydantic-settings jinja2 tqdm huey itsdangerous
python-multipart argon2-cffi rich typer timm transformers pillow"

pins=$($PY - "$CHECKED" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
checked = sys.argv[1].split()
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = {}
for dep in deps:
    m = re.match(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?\s*>=\s*([0-9][^,;\s]*)", dep)
    if m and m.group(1).lower() in checked:
        pins[m.group(1).lower()] = f"{m.group(1)}=={m.group(3)}"
missing = sorted(set(checked) - set(pins))
if missing:
    sys.exit(f"pyproject.toml has no '>=' bound for: {', '.join(missing)}")
print(" ".join(pins[name] for name in checked))
EOF
)
echo "== lower bounds: $pins"
[ -x "$VENV/bin/python" ] || $PY -m venv --system-site-packages "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $pins
"$VENV/bin/python" -c "import fastapi, sqlalchemy, timm, transformers; print('== running with fastapi', fastapi.__version__, 'sqlalchemy', sqlalchemy.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
[ $rc -eq 5 ] && echo "no tests were collected" >&2
exit $rc
