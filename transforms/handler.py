"""EarlyExitModelHandler: our early-exit engine behind Beam's RunInference.

Beam's own Hugging Face handlers do not import with transformers 5, and none of them could exit
early anyway. RunInference gives this handler batches of prepared records; the handler runs all
their windows through one :class:`EarlyExitEngine` call, so exited samples leave and the rest
are regrouped by depth and length inside the batch, then folds windows back into one
:class:`PredictionRecord` per input record. The model and its engine are built once per worker
process (:meth:`EarlyExitModelHandler.load_model`) and shared across its threads by RunInference.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.options.pipeline_options import PipelineOptions, S3Options

from epee.config import EngineConfig, ExitPolicyConfig
from epee.engine import EarlyExitEngine, ExitPrediction
from epee.modeldir import ModelBundle, load_model_dir
from epee.modeling import EarlyExitModel
from epee.policies import ExitPolicy, normalised_entropy
from epee.runtime import sparse_kernels

from .audit import is_audited
from .context import AuditConfig, JobContext, WorkerConfig
from .records import AuditedPrediction, AuditResult, PredictionRecord, PreparedInput, stats_label

log = logging.getLogger(__name__)
NAMESPACE = "epee"


# Beam's S3Options -> boto3 S3 client arguments, as Beam's own S3 client maps them
# (apache_beam/io/aws/clients/s3/boto3_client.py).
_S3_OPTION_TO_CLIENT_ARG = {
    "s3_endpoint_url": "endpoint_url", "s3_access_key_id": "aws_access_key_id",
    "s3_secret_access_key": "aws_secret_access_key", "s3_session_token": "aws_session_token",
    "s3_region_name": "region_name", "s3_api_version": "api_version", "s3_verify": "verify",
}


def s3_client_kwargs(options: PipelineOptions) -> dict[str, Any]:
    """The boto3 S3 client arguments that Beam's S3 options set (``--s3_endpoint_url``,
    ``--s3_access_key_id``, ...), so the model directory is fetched from the same S3 as the
    inputs and outputs. Only options given on the command line appear; the rest come from
    boto3's own chain (``AWS_*`` environment variables, ``~/.aws``)."""
    s3 = options.view_as(S3Options)
    kwargs: dict[str, Any] = {arg: getattr(s3, opt) for opt, arg in _S3_OPTION_TO_CLIENT_ARG.items()
                              if getattr(s3, opt) is not None}
    if isinstance(kwargs.get("verify"), str) and kwargs["verify"].lower() in ("true", "false"):
        kwargs["verify"] = kwargs["verify"].lower() == "true"  # else: a CA bundle path, as boto3 takes it
    if s3.s3_disable_ssl:
        kwargs["use_ssl"] = False
    return kwargs


class HeapTrimmer:
    """Hands glibc's free heap back to the system at most every ``every_s`` seconds.

    Batches of variable-length windows allocate and free activations of many sizes; glibc keeps
    the freed memory in its arenas (its mmap threshold also rises with every large free), so a
    worker's resident memory crept up with the archive's size (+325 MiB from 10k to 100k notes)
    though it held no more data. ``malloc_trim(0)`` returns it. Elsewhere than glibc (macOS,
    musl) it does nothing."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s  # >= 0, checked by WorkerConfig; 0 disables
        self.last = time.monotonic()
        self.trims = 0
        self._trim = None
        if every_s > 0:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                self._trim = libc.malloc_trim
                self._trim.argtypes, self._trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                self._trim = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe_trim(self) -> bool:
        now = time.monotonic()
        if self._trim is None or now - self.last < self.every_s:
            return False
        self._trim(0)
        self.last, self.trims = time.monotonic(), self.trims + 1
        return True


@dataclass(frozen=True)
class LoadedModel:
    """What :meth:`EarlyExitModelHandler.load_model` returns once per worker and every
    ``run_inference`` call runs: the loaded directory and its engine (int8 weights quantised, MAC
    counter and exit policy built once)."""

    bundle: ModelBundle
    engine: EarlyExitEngine
    audited: bool = False  # --audit_fraction > 0: the engine carries audited records on to the last layer
    audit_key: bytes | None = field(default=None, repr=False)  # the pseudonym key, which keys the audit sample

    @property
    def model(self) -> EarlyExitModel:
        return self.bundle.model

    @property
    def model_id(self) -> str:
        return self.bundle.model_id


# What this worker process has done (model loads, records predicted), for runners that collect no
# Beam metrics (Beam's DaskRunner): read on each worker with dask's ``client.run(worker_tally)``.
_TALLY: collections.Counter = collections.Counter()
_TALLY_LOCK = threading.Lock()


def _tally(**counts: int) -> None:
    with _TALLY_LOCK:
        _TALLY.update(counts)


def worker_tally() -> dict[str, int]:
    """Model loads and records predicted in this process so far, and its PyTorch threads."""
    import torch

    with _TALLY_LOCK:
        return {**_TALLY, "torch_threads": torch.get_num_threads()}


class EarlyExitModelHandler(ModelHandler[PreparedInput, PredictionRecord, LoadedModel]):
    """``job``: the run (id, model directory, storage options); ``engine``: how the engine runs
    (validated when it was built, at start-up); ``worker``: per-process settings; ``policy``:
    None for the policy stored (calibrated) in the model directory; ``audit``: the share of records
    also run at full depth (transforms.audit), off by default.

    Batching and model sharing are Beam's (``ModelHandler.__init__``). The engine regroups
    survivors only inside one call: a RunInference batch of a few records leaves it half-empty layer
    calls after the first exits. By default a batch is fixed at one engine window (16 x
    ``engine.batch_size`` rows, 512 by default), the most it regroups at once; bundle ends still
    flush smaller batches, so nothing waits (docs/analyses.md measures batch sizes)."""

    def __init__(
        self,
        job: JobContext,
        engine: EngineConfig | None = None,
        worker: WorkerConfig | None = None,
        policy: ExitPolicyConfig | None = None,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        large_model: bool = False,
        audit: AuditConfig | None = None,
    ) -> None:
        self.job = job
        self.audit = audit or AuditConfig()
        self.engine_config = engine or EngineConfig()
        self.worker = worker or WorkerConfig()
        self.policy = policy
        if max_batch_size is None:
            max_batch_size = max(self.engine_config.effective_window, min_batch_size or 0)
        if min_batch_size is None:
            min_batch_size = max_batch_size
        self.min_batch_size, self.max_batch_size = min_batch_size, max_batch_size
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size, large_model=large_model)
        self._trimmer: HeapTrimmer | None = None  # holds a C function pointer: made in each worker

    @property
    def model_uri(self) -> str:
        return self.job.model_uri

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_trimmer"] = None  # holds a C function pointer; each worker makes its own
        return state

    def load_model(self) -> LoadedModel:
        started = time.perf_counter()
        cfg, device = self.engine_config, self.engine_config.device
        if self.worker.torch_threads:
            import torch

            torch.set_num_threads(self.worker.torch_threads)
        # shared: the Prepare step of this process fetches the same directory (epee.modeldir.shared_model_dir)
        bundle = load_model_dir(self.job.model_uri, device=device, s3_client_kwargs=self.job.storage_options,
                                allow_pickle=self.worker.allow_pickle_weights, shared=True)
        log.info("loaded model %s (%d layers) in %.1fs", bundle.model_id, bundle.model.num_layers, time.perf_counter() - started)
        _tally(model_loads=1)
        sparse = sparse_kernels(bundle.model, bundle.sections.get("sparsity"), device)  # before the engine counts weights
        if isinstance(sparse, str):
            log.info("2:4-sparse model runs with dense kernels: %s", sparse)
        elif sparse is not None:
            log.info("2:4 sparse kernels: %d linear layers converted, skipped %s", sparse["converted"], sparse["skipped"])
        policy = None if self.policy is None else ExitPolicy(self.policy, bundle.model.num_layers)
        # once per worker: in int8 this quantises every layer weight (tens of ms on MiniLM)
        engine = EarlyExitEngine(bundle.model, cfg, policy)
        # "onednn" fails now where this worker's PyTorch lacks the op; "auto" falls back to PyTorch's kernel
        if engine.linear_kernel == "onednn":
            log.info("float32 linear layers run through oneDNN (--linear_kernel %s)", cfg.linear_kernel)
        if cfg.precision == "int8":
            log.info("the transformer layers' linear products run in int8 (--precision int8)")
            calibrated_in = (bundle.sections.get("calibration") or {}).get("precision")
            if self.policy is None and calibrated_in != "int8":
                # int8 can change what the early heads predict: on the sample notes model, its
                # float32-calibrated policy scored 0.475 in int8 against 0.99 (docs/analyses.md)
                log.warning("--precision int8 with an exit policy calibrated in %s: int8 can change what the early "
                            "exit heads predict; calibrate this model in int8 (epee calibrate --precision int8) and "
                            "check it (epee evaluate --precision int8)", calibrated_in or "an unrecorded precision")
            from epee.engine import cpu_has_int8_dot_product

            if cpu_has_int8_dot_product() is False:
                log.warning("--precision int8 on a CPU without int8 dot-product instructions (no AVX-512 VNNI, "
                            "AVX-VNNI or AMX): int8 products take a slow path, many times slower than float32")
        if cfg.precision == "bfloat16" and device.split(":", 1)[0] == "cpu":
            from epee.engine import cpu_has_native_bf16

            if cpu_has_native_bf16() is False:
                log.warning("--precision bfloat16 on a CPU without native bfloat16 (no avx512_bf16 or AMX): "
                            "it is emulated and likely slower than float32")
        audited, audit_key = self.audit.fraction > 0, None
        if audited:
            # with --pseudonymize_ids the sample is keyed by the secret: ids alone do not tell which records were audited
            audit_key = self.job.key_source.load() if self.job.key_source is not None else None
        return LoadedModel(bundle=bundle, engine=engine, audited=audited, audit_key=audit_key)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def get_num_bytes(self, batch: Sequence[PreparedInput]) -> int:
        return sum(int(s.input_ids.numel() * 8) if s.input_ids is not None else int(s.pixel_values.numel() * 4)
                   for p in batch for s in p.samples)

    def run_inference(
        self, batch: Sequence[PreparedInput], model: LoadedModel, inference_args: Optional[dict[str, Any]] = None
    ) -> Iterable[PredictionRecord]:
        started = time.perf_counter()
        flat = [s for p in batch for s in p.samples]
        chosen = [i for i, r in enumerate(batch) if self.is_audited(r, model)]
        flags = None
        if chosen:  # audited records ride on to the last layer after their exit (epee.engine)
            picked = set(chosen)
            flags = [i in picked for i, p in enumerate(batch) for _ in p.samples]
        result = model.engine.run(flat, audit=flags)  # the worker's one engine, with its policy
        out, per_record, starts, pos = [], [], [], 0
        for record in batch:
            preds = result.predictions[pos : pos + len(record.samples)]
            starts.append(pos)
            pos += len(record.samples)
            per_record.append(preds)
            out.append(self._combine(record, preds, model.bundle))
        if chosen:
            out = self._audit(batch, chosen, per_record, [result.audit[s : s + len(batch[i].samples)]
                                                          for i, s in enumerate(starts)], out, model)
        self._count(started, len(batch), len(flat), result.stats.exits_per_layer, result.stats.rows_per_layer,
                    result.stats.calls_per_layer)
        del result, flat
        return out

    def _count(self, started: float, records: int, windows: int, exits_per_layer: Sequence[int],
               rows_per_layer: Sequence[int] = (), calls_per_layer: Sequence[int] = ()) -> None:
        """Metrics of one call (records and windows predicted, exits per layer; rows and layer calls
        per layer, whose ratio over batch_size is the batch fill), and the heap trim."""
        Metrics.distribution(NAMESPACE, "inference_batch_latency_micro_secs").update(int((time.perf_counter() - started) * 1e6))
        if records:
            Metrics.counter(NAMESPACE, "elements_processed").inc(records)
            _tally(records=records)
        if windows:
            Metrics.counter(NAMESPACE, "windows_processed").inc(windows)
        for layer, count in enumerate(exits_per_layer, start=1):
            if count:
                Metrics.counter(NAMESPACE, f"exits_layer_{layer:02d}").inc(count)
        for layer, (rows, calls) in enumerate(zip(rows_per_layer, calls_per_layer), start=1):
            if calls:
                Metrics.counter(NAMESPACE, f"layer_rows_{layer:02d}").inc(rows)
                Metrics.counter(NAMESPACE, f"layer_calls_{layer:02d}").inc(calls)
        if self._trimmer is None:
            self._trimmer = HeapTrimmer(self.worker.heap_trim_seconds)
        if self._trimmer.maybe_trim():
            Metrics.counter(NAMESPACE, "heap_trims").inc()

    def is_audited(self, record: PreparedInput, model: LoadedModel) -> bool:
        return model.audited and is_audited(record.record_id, self.audit.fraction, model.audit_key)

    def record_stream(self, model: LoadedModel) -> "RecordStream":
        """Continuous batching across calls for this worker's model (:class:`RecordStream`)."""
        return RecordStream(self, model)

    def _audit(self, batch: Sequence[PreparedInput], chosen: list[int], per_record: list[list[ExitPrediction]],
               full: list[list], out: list[PredictionRecord], model: LoadedModel) -> list[PredictionRecord]:
        """The batch's audited records (:func:`transforms.audit.is_audited`), which the engine carried
        on to the last layer after their exit without changing their prediction (``full[i]``: per
        window of record i, its last-layer prediction, None for a window that ran there itself);
        each comes back as an :class:`AuditedPrediction` with the same row. Audit MACs: the layers
        run after the exit."""
        out = list(out)
        agreeing = continued = 0
        for i in chosen:
            reference = full[i]
            ref, macs = out[i], 0
            if any(r is not None for r in reference):
                preds = [r if r is not None else p for r, p in zip(reference, per_record[i])]
                ref = self._combine(batch[i], preds, model.bundle)
                macs = sum(r.macs - p.macs for r, p in zip(reference, per_record[i]) if r is not None)
                continued += sum(r is not None for r in reference)
            agrees = same_prediction(out[i], ref)
            agreeing += agrees
            out[i] = AuditedPrediction(**out[i].__dict__,
                                       audit=AuditResult(agrees=agrees, label=stats_label(ref.label, ref.event_spans), macs=macs))
        Metrics.counter(NAMESPACE, "audited_records").inc(len(chosen))
        Metrics.counter(NAMESPACE, "audit_agreeing_records").inc(agreeing)
        Metrics.counter(NAMESPACE, "audit_windows_continued").inc(continued)
        return out

    def _combine(self, record: PreparedInput, preds: list[ExitPrediction], bundle: ModelBundle) -> PredictionRecord:
        """One record from its windows.

        Classes: the mean of the windows' probabilities (every window votes with its whole
        distribution), label = its argmax, entropy = normalised entropy of that mean. Events:
        the union of the windows' spans (offsets are relative to the whole note), duplicates from
        overlapping windows removed. Cost: the deepest window's exit layer and its reason.
        """
        model = bundle.model
        names = list(model.config.label_names)
        deepest = max(preds, key=lambda p: p.exit_layer)
        task = bundle.data_task
        common = dict(record_id=record.record_id, source_uri=record.source_uri, task=task, label_names=names,
                      exit_layer=deepest.exit_layer, num_layers=deepest.num_layers, exit_reason=deepest.exit_reason,
                      windows=len(preds), model_id=bundle.model_id, run_id=self.job.run_id,
                      macs=sum(p.macs for p in preds), dense_exit_macs=sum(p.dense_exit_macs for p in preds),
                      dense_full_macs=sum(p.dense_full_macs for p in preds))
        if task == "token":
            spans: set[tuple[str, int, int]] = set()
            confidences = []
            for p, offsets in zip(preds, record.offsets or []):
                tags = [max(t, 0) for t in p.token_labels]
                spans.update(bundle.preprocessor.decode_spans(offsets, tags))
                scored = [row.max() for row, t in zip(p.probs, p.token_labels) if t >= 0]
                confidences += scored
            return PredictionRecord(
                label=None, score=float(np.mean(confidences)) if confidences else 0.0, probabilities=[],
                entropy=max(p.entropy for p in preds),
                event_spans=[{"type": t, "start": s, "end": e} for t, s, e in sorted(spans, key=lambda x: (x[1], x[2], x[0]))],
                **common)
        probs = np.mean(np.stack([p.probs for p in preds]), axis=0)
        label = int(probs.argmax())
        import torch

        entropy = float(normalised_entropy(torch.from_numpy(probs))) if len(preds) > 1 else preds[0].entropy
        rel = {}
        if record.entities is not None:
            (s1, e1), (s2, e2) = record.entities
            rel = dict(entity1_start=s1, entity1_end=e1, entity2_start=s2, entity2_end=e2)
        return PredictionRecord(label=names[label], score=float(probs[label]), probabilities=[float(x) for x in probs],
                                entropy=entropy if math.isfinite(entropy) else 0.0, **rel, **common)


@dataclass
class _InFlight:
    """A record whose windows are in the engine stream: what comes back per window."""

    record: PreparedInput
    meta: Any
    audited: bool
    preds: list
    refs: list
    missing: int


class RecordStream:
    """Prepared records through one :class:`~epee.engine.EngineStream` (continuous batching):
    a record's windows go in together and the record comes back, folded into one
    :class:`PredictionRecord` (audited: :class:`AuditedPrediction`) as ``run_inference`` makes
    it, once its last window has finished, from whichever later call that is. ``meta`` travels
    with each record untouched (the DoFn's window and timestamp)."""

    def __init__(self, handler: EarlyExitModelHandler, model: LoadedModel) -> None:
        self.handler, self.model = handler, model
        self.engine = model.engine.stream()
        self._records: dict[int, _InFlight] = {}
        self._tickets: dict[int, tuple[int, int]] = {}  # ticket -> (record slot, window position)
        self._slot = 0
        self._counted = ([0] * model.model.num_layers, [0] * model.model.num_layers)  # layer rows, calls in metrics

    @property
    def in_flight(self) -> int:
        return len(self._records)

    def submit(self, items: Sequence[tuple[PreparedInput, Any]]) -> list[tuple[Any, PredictionRecord]]:
        """Add records and run every full layer batch there is; the records that finished."""
        started = time.perf_counter()
        flat, flags, where = [], [], []
        for record, meta in items:
            audited = self.handler.is_audited(record, self.model)
            n = len(record.samples)
            self._records[self._slot] = _InFlight(record, meta, audited, [None] * n, [None] * n, n)
            for j, sample in enumerate(record.samples):
                flat.append(sample)
                flags.append(audited)
                where.append((self._slot, j))
            self._slot += 1
        tickets = self.engine.submit(flat, audit=flags if any(flags) else None)
        self._tickets.update(zip(tickets, where))
        return self._finish(self.engine.advance(), started)

    def flush(self) -> list[tuple[Any, PredictionRecord]]:
        """Run everything still in flight: every record submitted comes back."""
        return self._finish(self.engine.flush(), time.perf_counter())

    def reset(self) -> list[tuple[Any, PreparedInput]]:
        """Drop every record in flight (after a failure); them and their meta."""
        self.engine.reset()
        dropped = [(r.meta, r.record) for r in self._records.values()]
        self._records.clear()
        self._tickets.clear()
        return dropped

    def _finish(self, finished, started: float) -> list[tuple[Any, PredictionRecord]]:
        out, exits, windows = [], [0] * self.model.model.num_layers, 0
        for f in finished:
            slot, j = self._tickets.pop(f.ticket)
            entry = self._records[slot]
            entry.preds[j], entry.refs[j] = f.prediction, f.audit
            entry.missing -= 1
            exits[f.prediction.exit_layer - 1] += 1
            windows += 1
            if entry.missing:
                continue
            del self._records[slot]
            h, record = self.handler, entry.record
            result = h._combine(record, entry.preds, self.model.bundle)
            if entry.audited:
                result = h._audit([record], [0], [entry.preds], [entry.refs], [result], self.model)[0]
            out.append((entry.meta, result))
        stats, (rows, calls) = self.engine.stats, self._counted
        new_rows = [a - b for a, b in zip(stats.rows_per_layer, rows)]
        new_calls = [a - b for a, b in zip(stats.calls_per_layer, calls)]
        self._counted = (list(stats.rows_per_layer), list(stats.calls_per_layer))
        self.handler._count(started, len(out), windows, exits, new_rows, new_calls)
        return out


def same_prediction(a: PredictionRecord, b: PredictionRecord) -> bool:
    """Whether two predictions of one record agree: the same label, or for event extraction the
    same set of spans (type, start, end)."""
    if a.task == "token":
        return {(e["type"], e["start"], e["end"]) for e in a.event_spans} == {(e["type"], e["start"], e["end"]) for e in b.event_spans}
    return a.label == b.label
