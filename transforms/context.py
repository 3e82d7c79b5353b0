"""What one run's transforms share, built once at the edge (``pipelines.common``) and validated there.

:class:`JobContext` is stamped once per run: every DoFn that writes a row takes its ``run_id`` from
it, so no transform defaults one. The other configs here hold the options of one step each; each
validates its values once, in ``__post_init__``, naming the option in its message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class JobContext:
    """One run: its id, the model directory and how to reach it, the pseudonym key."""

    run_id: str  # written to every output row (--run_id, default the start time in UTC)
    model_uri: str  # the model directory: local path, s3:// or gs://
    # s3:// models: boto3 client arguments (endpoint, credentials) from Beam's S3 options
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    key_source: Any = None  # --pseudonymize_ids: a transforms.privacy.KeySource; None: ids written as read

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError(f"run_id ({self.run_id!r}) must be a non-empty string")
        if not self.model_uri:
            raise ValueError("model_uri must name a model directory")
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))


REGROUP = ("bundle", "batch")  # WorkerConfig.regroup


@dataclass(frozen=True)
class WorkerConfig:
    """How each worker process runs the model, besides the engine's own config."""

    # PyTorch's intra-op threads per worker process; 0 keeps PyTorch's default (every core), which
    # several processes on one machine then contend for
    torch_threads: int = 0
    # glibc's freed heap is handed back at most this often, so memory stays flat on long runs; 0 disables
    heap_trim_seconds: float = 2.0
    # pickle weights (pytorch_model.bin) only when the user asked; see epee.weights
    allow_pickle_weights: bool = False
    # where survivors regroup: "bundle", across every batch of a bundle (continuous batching,
    # transforms.inference.RegroupedInference); "batch", inside each RunInference batch (Beam's RunInference)
    regroup: str = "bundle"

    def __post_init__(self) -> None:
        if self.regroup not in REGROUP:
            raise ValueError(f"--regroup must be one of {', '.join(REGROUP)}, got {self.regroup!r}")
        if isinstance(self.torch_threads, bool) or not isinstance(self.torch_threads, int) or self.torch_threads < 0:
            raise ValueError(f"--torch_threads must be >= 0 (0: PyTorch's default, every core), got {self.torch_threads}")
        if not (math.isfinite(self.heap_trim_seconds) and self.heap_trim_seconds >= 0):
            raise ValueError(f"--heap_trim_seconds must be >= 0 (0 disables), got {self.heap_trim_seconds}")


@dataclass(frozen=True)
class PrepareConfig:
    """How a long note becomes model windows (checked once here, not per note)."""

    window_overlap: float = 0.25  # share of each window that overlaps the previous one, in [0, 1)
    max_windows: int = 0  # 0: cover the whole note; N: keep its first N windows (explicit truncation)

    def __post_init__(self) -> None:
        if not 0.0 <= self.window_overlap < 1.0:
            raise ValueError(f"--window_overlap must lie in [0, 1), got {self.window_overlap}")
        if isinstance(self.max_windows, bool) or not isinstance(self.max_windows, int) or self.max_windows < 0:
            raise ValueError(f"--max_windows must be >= 0 (0: the whole note), got {self.max_windows}")


@dataclass(frozen=True)
class AuditConfig:
    """The nightly audit (transforms.audit): which share of records is re-run at full depth, and
    the agreement below which the run is marked failed."""

    # share of records audited, drawn by a keyed hash of the record id; 0 disables. The audit costs
    # about this share of full-depth compute on top of the run
    fraction: float = 0.0
    # the run's audit fails when the agreement's lower 95% bound is below this; None: never fails.
    # Above 1 it always fails (a way to test the alert)
    min_agreement: float | None = None
    confidence: float = 0.95  # of the Clopper-Pearson interval

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0.0 <= self.fraction <= 1.0):
            raise ValueError(f"--audit_fraction must lie in [0, 1] (0 disables), got {self.fraction}")
        if self.min_agreement is not None and not (math.isfinite(self.min_agreement) and self.min_agreement >= 0):
            raise ValueError(f"--min_agreement must be a number >= 0 (an agreement, e.g. 0.95), got {self.min_agreement}")
        if self.min_agreement is not None and self.fraction == 0:
            raise ValueError("--min_agreement needs an audit: --audit_fraction must be > 0")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"audit confidence must lie in (0, 1), got {self.confidence}")
