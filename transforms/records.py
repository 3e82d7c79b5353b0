"""Named records that flow through the pipelines, each mapping one-to-one to a Parquet schema.

No record that is written carries note text or DICOM tag values: predictions hold ids, labels,
scores and character offsets; dead letters hold a stage, an error type and a message that the
reading code wrote itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa


# -- internal records (not written) ----------------------------------------------------------------
@dataclass
class InputRecord:
    """One note, relation candidate or image, as read from storage."""

    record_id: str
    source_uri: str
    text: str | None = None
    entities: tuple[tuple[int, int], tuple[int, int]] | None = None  # relation task: char spans
    pixels: Any = None  # image task: decoded (H, W[, C]) array


@dataclass
class PreparedInput:
    """Model-ready windows of one record (one window unless a long note was split)."""

    record_id: str
    source_uri: str
    samples: list  # list[EncodedSample]
    offsets: list | None = None  # token task: per window, character offsets of its tokens
    entities: tuple[tuple[int, int], tuple[int, int]] | None = None  # relation task: echoed to the output


# -- written records -------------------------------------------------------------------------------
@dataclass
class PredictionRecord:
    record_id: str
    source_uri: str
    task: str  # "sequence", "relation", "token" or "image"
    label: str | None  # predicted class (None for event extraction: see event_spans)
    score: float  # probability of the predicted class (token task: mean over scored tokens)
    probabilities: list[float]  # one per class in label_names order (token task: empty)
    label_names: list[str]
    exit_layer: int  # 1-based; for multi-window notes the deepest window's exit layer
    num_layers: int
    exit_reason: str  # entropy, patience or last_layer
    entropy: float  # normalised entropy at exit (combined distribution for multi-window notes)
    windows: int  # model inputs the record was split into (long notes)
    model_id: str
    run_id: str
    entity1_start: int | None = None  # relation task: the pair the label is about (char offsets)
    entity1_end: int | None = None
    entity2_start: int | None = None
    entity2_end: int | None = None
    event_spans: list[dict] = field(default_factory=list)  # token task: [{"type", "start", "end"}], offsets only
    # multiply-adds, summed over the record's windows (epee.flops): run (sparsity-aware), the same
    # layers with dense weights, and dense full depth with one classifier (the reference)
    macs: int = 0
    dense_exit_macs: int = 0
    dense_full_macs: int = 0

    def to_row(self) -> dict[str, Any]:
        return dict(self.__dict__)  # flat fields: a shallow copy is the row (asdict would deep-copy)


@dataclass(frozen=True)
class AuditResult:
    """What the audit (``--audit_fraction``, transforms.audit) found for one record; not written
    per record: the exit statistics count it."""

    agrees: bool  # the exit prediction is the full-depth one (same label; token task: same set of spans)
    label: str  # the full-depth prediction's stats_label: agreement per label is counted under it
    macs: int  # multiply-adds of the full-depth rerun (0: every window had run to the last layer already)


@dataclass
class AuditedPrediction(PredictionRecord):
    """A prediction that was audited: the same row as any prediction (``audit`` is not written)."""

    audit: AuditResult | None = None

    def to_row(self) -> dict[str, Any]:
        row = dict(self.__dict__)
        del row["audit"]
        return row


def stats_label(label: str | None, event_spans: list | None) -> str:
    """The label a prediction is counted under in the exit statistics and the run report: its
    label; event extraction has none, so its records count as "events" or "no_event"."""
    if label is not None:
        return str(label)
    return "events" if event_spans else "no_event"


PREDICTION_SCHEMA = pa.schema([
    ("record_id", pa.string()), ("source_uri", pa.string()), ("task", pa.string()), ("label", pa.string()),
    ("score", pa.float64()), ("probabilities", pa.list_(pa.float32())), ("label_names", pa.list_(pa.string())),
    ("exit_layer", pa.int32()), ("num_layers", pa.int32()), ("exit_reason", pa.string()), ("entropy", pa.float64()),
    ("windows", pa.int32()), ("model_id", pa.string()), ("run_id", pa.string()),
    ("entity1_start", pa.int32()), ("entity1_end", pa.int32()), ("entity2_start", pa.int32()), ("entity2_end", pa.int32()),
    ("event_spans", pa.list_(pa.struct([("type", pa.string()), ("start", pa.int32()), ("end", pa.int32())]))),
    ("macs", pa.int64()), ("dense_exit_macs", pa.int64()), ("dense_full_macs", pa.int64()),
])


@dataclass
class DeadLetter:
    source_uri: str
    record_id: str | None  # when known
    stage: str  # read, decode, prepare, inference
    error_type: str  # a short machine-readable reason, e.g. invalid_utf8, empty_note, not_dicom
    message: str  # what went wrong, written by us: never note text or tag values
    run_id: str

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


DEAD_LETTER_SCHEMA = pa.schema([
    ("source_uri", pa.string()), ("record_id", pa.string()), ("stage", pa.string()), ("error_type", pa.string()),
    ("message", pa.string()), ("run_id", pa.string()),
])


@dataclass
class ExitStats:
    run_id: str
    model_id: str
    task: str
    records: int
    num_layers: int
    exits_per_layer: list[int]
    mean_exit_layer: float
    layer_speedup: float  # num_layers / mean exit layer
    label_counts: list[dict]  # [{"label", "count", "mean_exit_layer"}]
    exit_reason_counts: list[dict]  # [{"reason", "count"}]
    wall_seconds: float  # from pipeline start to the moment these statistics were computed
    macs: int = 0  # multiply-adds run, all records (epee.flops)
    dense_exit_macs: int = 0  # the same layers and heads with dense weights
    dense_full_macs: int = 0  # dense full depth, one classifier: the reference cost
    macs_saved: float = 0.0  # share of dense_full_macs not spent
    macs_saved_by_exit: float = 0.0  # ... because layers were skipped
    macs_saved_by_sparsity: float = 0.0  # ... because weights are zero
    # the audit (--audit_fraction, transforms.audit): audited records carried on to full depth
    audit_fraction: float = 0.0  # 0: no audit (the audit columns below are then 0 or null)
    audited_records: int = 0
    audit_agreeing: int = 0  # audited records whose exit prediction is the full-depth one
    audit_agreement: float | None = None  # agreeing / audited
    audit_agreement_low: float | None = None  # its Clopper-Pearson (exact binomial) 95% interval
    audit_agreement_high: float | None = None
    audit_per_layer: list[dict] = field(default_factory=list)  # [{"exit_layer", "audited", "agreeing", "agreement"}]
    audit_per_label: list[dict] = field(default_factory=list)  # [{"label", "audited", "agreeing", "agreement"}], full-depth label
    audit_macs: int = 0  # multiply-adds run after the audited records' exits, to the last layer
    audit_compute_share: float | None = None  # audit_macs / (macs + audit_macs)
    audit_status: str = "off"  # off, unchecked (no --min_agreement), passed or failed (lower bound < --min_agreement)

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


EXIT_STATS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model_id", pa.string()), ("task", pa.string()), ("records", pa.int64()),
    ("num_layers", pa.int32()), ("exits_per_layer", pa.list_(pa.int64())), ("mean_exit_layer", pa.float64()),
    ("layer_speedup", pa.float64()),
    ("label_counts", pa.list_(pa.struct([("label", pa.string()), ("count", pa.int64()), ("mean_exit_layer", pa.float64())]))),
    ("exit_reason_counts", pa.list_(pa.struct([("reason", pa.string()), ("count", pa.int64())]))),
    ("wall_seconds", pa.float64()),
    ("macs", pa.int64()), ("dense_exit_macs", pa.int64()), ("dense_full_macs", pa.int64()),
    ("macs_saved", pa.float64()), ("macs_saved_by_exit", pa.float64()), ("macs_saved_by_sparsity", pa.float64()),
    ("audit_fraction", pa.float64()), ("audited_records", pa.int64()), ("audit_agreeing", pa.int64()),
    ("audit_agreement", pa.float64()), ("audit_agreement_low", pa.float64()), ("audit_agreement_high", pa.float64()),
    ("audit_per_layer", pa.list_(pa.struct([("exit_layer", pa.int32()), ("audited", pa.int64()), ("agreeing", pa.int64()),
                                            ("agreement", pa.float64())]))),
    ("audit_per_label", pa.list_(pa.struct([("label", pa.string()), ("audited", pa.int64()), ("agreeing", pa.int64()),
                                            ("agreement", pa.float64())]))),
    ("audit_macs", pa.int64()), ("audit_compute_share", pa.float64()), ("audit_status", pa.string()),
])


@dataclass
class InputFile:
    """One row per input file: status ``processed`` (``records`` = predictions + dead letters it gave)
    or ``skipped`` (unchanged since the run given to ``--skip_processed``)."""

    uri: str  # pseudonymised by the reader with --pseudonymize_ids
    size: int  # bytes as stored (compressed files: their compressed size)
    sha256: str | None  # of the stored bytes; None where the file could not be read
    status: str  # "processed" or "skipped"
    records: int
    run_id: str

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


INPUTS_SCHEMA = pa.schema([
    ("uri", pa.string()), ("size", pa.int64()), ("sha256", pa.string()), ("status", pa.string()),
    ("records", pa.int64()), ("run_id", pa.string()),
])
