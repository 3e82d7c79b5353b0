#!/usr/bin/env bash
# Set up the environment (first run only) and run the test suite. Extra arguments go to pytest.
# The Dask runner tests use a real cluster: a scheduler and 2 single-threaded worker processes on
# 127.0.0.1 (scripts/dask_cluster.sh), started here and stopped on exit, whatever happens.
set -uo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0
EPEE_DASK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/epee-dask.XXXXXX")"
export EPEE_DASK_DIR
trap './scripts/dask_cluster.sh stop; rm -rf "$EPEE_DASK_DIR"' EXIT
trap 'exit 130' INT TERM
EPEE_DASK_ADDRESS="$(./scripts/dask_cluster.sh start 2)" || { echo "run_tests.sh: the Dask cluster did not start" >&2; exit 1; }
export EPEE_DASK_ADDRESS
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$rc"
