"""Runnable jobs: ``notes``, ``relations``, ``events``, ``dicom`` (``python -m pipelines.<name> --help``),
``sample_job`` (what ./run_pipeline.sh runs with no arguments) and ``engine_demo``."""
