#!/usr/bin/env bash
# Set up the environment (first run only) and run the test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$rc"
