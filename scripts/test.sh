#!/usr/bin/env bash
# The whole test suite from a fresh clone: install, start what the tests need, lint, type-check, test.
# RabbitMQ (5672) is expected to be running already (it is on the project's machines; the tests use
# names unique to the run there); the tests start private instances of anything else they need on
# free ports, Redis included.
#
# Everything is installed at the versions that constraints/dev.txt pins (scripts/lock.sh moves them
# forward on purpose), so a release made since the last lock cannot change the result. A second
# pass then runs the driver and core tests again with every direct dependency at the lowest
# release pyproject.toml admits (constraints/lowest.txt): MACHINERY_SKIP_LOWEST=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
install() {  # install VENV LOCK: the project with every extra, pip and the build backend from LOCK
  local venv=$1 lock=$PWD/$2
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q -c "$lock" pip >/dev/null
  # PIP_CONSTRAINT also reaches the isolated environment that builds the editable install
  PIP_CONSTRAINT=$lock "$venv/bin/python" -m pip install -q -e '.[all,dev]'
}
install .venv constraints/dev.txt
# memcached for the memcache backend's tests (Debian package; this runs as root in CI)
if ! command -v memcached >/dev/null 2>&1 && [ ! -x /usr/bin/memcached ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q memcached >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q memcached >/dev/null 2>&1; } \
    || echo "warning: could not install memcached; the memcache tests will fail with CI=true" >&2
fi
# SecantusDB, a MongoDB wire-protocol server, for the mongodb backend's tests: in its own venv because
# its pins clash with botocore's (tests/mongo_server.py starts it, and creates this venv when missing)
if [ ! -x .venv-mongo/bin/secantusd-py ]; then
  "$PY" -m venv .venv-mongo
  .venv-mongo/bin/python -m pip install -q 'secantusdb==0.7.0b3' \
    || echo "warning: could not install secantusdb; the mongodb tests will fail with CI=true" >&2
fi

.venv/bin/ruff check src tests
.venv/bin/mypy src/machinery

if [ "${MACHINERY_SKIP_LOWEST:-}" = 1 ] || [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider --cov --cov-report=term "$@"  # branch coverage: pyproject.toml
fi
# The lowest-versions pass runs beside the main one (test runs keep apart: each has its own Redis
# server and RabbitMQ names), its output shown when both are done.
install .venv-lowest constraints/lowest.txt
lowest_log=$(mktemp)
.venv-lowest/bin/python -m pytest -q -p no:cacheprovider -m "not slow" >"$lowest_log" 2>&1 &
lowest=$!
main_status=0
.venv/bin/python -m pytest -q -p no:cacheprovider --cov --cov-report=term || main_status=$?
lowest_status=0
wait "$lowest" || lowest_status=$?
echo "== the same tests at the lowest supported versions (constraints/lowest.txt), slow tests left out"
cat "$lowest_log"
rm -f "$lowest_log"
echo "== main run: exit $main_status; lowest-versions run: exit $lowest_status"
[ "$main_status" = 0 ] && [ "$lowest_status" = 0 ]
