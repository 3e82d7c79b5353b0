"""Benchmarks and real-data proofs (not tests); see docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """Architecture, CPU model (where /proc/cpuinfo names it) and cores, for the figures' headers:
    machines of one kind differ in speed, so a figure names the one it ran on."""
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return ", ".join(x for x in (platform.machine(), model, f"{os.cpu_count()} cores") if x)


def stock_pipeline():
    """A Beam pipeline for the stock RunInference baselines, on the FnApiRunner.

    That is where Beam's DirectRunner runs them offline, but only after offering them to Prism, which
    tries to download its binary from GitHub (a network call at run time; offline it fails, and leaves
    an empty /tmp/beam-temp* directory behind). Our pipelines never reach Prism: their RunInference uses
    exception handling, which the DirectRunner keeps off Prism
    (tests/pipelines/test_pipelines.py::test_direct_runner_never_offers_our_pipelines_to_prism).
    """
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return beam.Pipeline(runner=FnApiRunner())


def add_text_corpus_arguments(parser, default: str) -> None:
    """``--corpus`` (one of run_all's text corpora) and ``--models`` (where their model directories are)."""
    from bench.run_all import CORPORA

    parser.add_argument("--corpus", default=default, choices=[c for c in CORPORA if c != "pneumoniamnist"])
    parser.add_argument("--models", default="models")
