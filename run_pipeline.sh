#!/usr/bin/env bash
# The nightly job.
#   ./run_pipeline.sh                      set up .venv (first run), then run the built-in sample job
#   ./run_pipeline.sh --runner DaskRunner --dask_client_address tcp://127.0.0.1:8786   the same on a Dask cluster
#   ./run_pipeline.sh --pipeline notes|relations|events|dicom --input PATTERN --model DIR --output PREFIX [Beam options]
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$#" -eq 0 ] || [ "$1" != "--pipeline" ]; then
  # the sample job; any arguments are its own (--workdir, --notes) or Beam options (--runner DaskRunner ...)
  exec .venv/bin/python -m pipelines.sample_job "$@"
fi
if [ "$#" -lt 2 ]; then
  echo "usage: $0 [--pipeline notes|relations|events|dicom --input PATTERN --model DIR --output PREFIX [Beam options]]" >&2
  exit 2
fi
pipeline="$2"; shift 2
case "$pipeline" in
  notes|relations|events|dicom) exec .venv/bin/python -m "pipelines.$pipeline" "$@" ;;
  *) echo "unknown pipeline '$pipeline' (notes, relations, events, dicom)" >&2; exit 2 ;;
esac
