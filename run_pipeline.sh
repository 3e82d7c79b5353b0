#!/usr/bin/env bash
# The main job. Sets up .venv on first use, then runs the engine demo on the built-in sample of
# generated notes. Extra arguments go to the demo (see --help).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pipelines.engine_demo "$@"
