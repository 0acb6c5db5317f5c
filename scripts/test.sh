#!/usr/bin/env bash
# The whole test suite from a fresh clone: install, start what the tests need, lint, type-check, test.
# Redis (6379) and RabbitMQ (5672) are expected to be running already (they are on the project's
# machines); the tests start private instances of anything else they need on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[all,dev]'

.venv/bin/ruff check src tests
.venv/bin/mypy src/machinery
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
