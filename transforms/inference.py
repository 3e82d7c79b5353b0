"""Prepare records for the model and run early-exit inference, dead letters kept at every step."""

from __future__ import annotations

import uuid
from typing import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from epee.errors import InputError, describe

from .context import JobContext, PrepareConfig
from .handler import EarlyExitModelHandler
from .readers import DEAD, NAMESPACE
from .records import DeadLetter, InputRecord, PreparedInput


class Prepare(beam.DoFn):
    """InputRecord -> PreparedInput (tokenised windows or normalised pixels) with the model
    directory's own preprocessor; records it cannot encode become dead letters."""

    def __init__(self, job: JobContext, config: PrepareConfig | None = None) -> None:
        self.job = job
        self.config = config or PrepareConfig()
        self.preprocessor = None
        self.task = ""

    def setup(self) -> None:
        from epee import modeldir

        # shared: the model handler of this worker process opens the same directory, fetched once
        self.preprocessor, self.task = modeldir.load_preprocessor(
            self.job.model_uri, s3_client_kwargs=self.job.storage_options, shared=True)

    def process(self, record: InputRecord) -> Iterator:
        from epee.data import Example
        from epee.encoding import model_inputs

        try:
            if self.task == "image":
                if record.pixels is None:
                    raise InputError("prepare_error", "the model takes images, this record has none")
                ex = Example(id=record.record_id, image=record.pixels)
            else:
                if record.text is None:
                    raise InputError("prepare_error", "the model takes text, this record has none")
                ex = Example(id=record.record_id, text=record.text, entities=record.entities)
            # with max_windows, only the beginning of a long note that those windows need is tokenised
            encoded, truncated = model_inputs(self.preprocessor, ex, "windows", self.config.window_overlap,
                                              self.config.max_windows)
            if truncated:
                Metrics.counter(NAMESPACE, "notes_truncated_by_max_windows").inc()
        except Exception as exc:  # noqa: BLE001 - one record the preprocessor cannot encode costs that record
            # the tokenizer's or image code's own text can quote the note: only its type is kept
            Metrics.counter(NAMESPACE, "dead_letters_prepare_error").inc()
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(record.source_uri, record.record_id, "prepare", "prepare_error",
                                                            describe(exc, "the preprocessor cannot encode this record"),
                                                            self.job.run_id))
            return
        Metrics.counter(NAMESPACE, "model_windows").inc(len(encoded))
        yield PreparedInput(record_id=record.record_id, source_uri=record.source_uri,
                            samples=[e.sample for e in encoded],
                            offsets=[e.offsets for e in encoded] if self.task == "token" else None,
                            entities=record.entities)


def failed_batch_to_dead_letters(failed, run_id: str) -> Iterator[DeadLetter]:
    """RunInference's dead-letter element is (failed batch, what failed): one dead letter per record.

    What failed is, in Beam's exception handling, (exception type, repr, formatted traceback), or
    the exception itself. Only the exception's type name is kept: its text could quote model input.
    """
    batch, failure = failed
    exc_type = failure[0] if isinstance(failure, tuple) and failure and isinstance(failure[0], type) else type(failure)
    Metrics.counter(NAMESPACE, "dead_letters_inference_error").inc(len(batch))
    for record in batch:
        yield inference_dead_letter(record, exc_type, "batch", run_id)


def inference_dead_letter(record: PreparedInput, exc_type: type, what: str, run_id: str) -> DeadLetter:
    """The dead letter of a record the model failed on (``what``: "batch" or "record"). Only the
    exception's type is named: its text could quote model input."""
    return DeadLetter(record.source_uri, record.record_id, "inference", "inference_error",
                      f"model inference failed for this {what} ({exc_type.__name__})", run_id)


class RegroupedInference(beam.DoFn):
    """PreparedInput -> PredictionRecord with continuous batching across a whole bundle.

    Beam's RunInference hands the model one batch at a time and wants that batch's predictions
    back, so the engine regroups survivors only inside a batch and its deep layers run
    part-filled at the end of every one. This DoFn keeps the records that have not finished
    between ``process`` calls (:class:`~transforms.handler.RecordStream`): new records enter
    layer 1 while earlier ones continue at layer d, every layer call but the bundle's last at
    each depth runs full, and ``finish_bundle`` flushes the rest, so no record waits longer than
    its bundle and none is lost. Each record leaves with its own window, timestamp and pane
    (``WindowedValue``), whenever it finishes. The model is loaded once per worker process and
    shared by its threads (``beam.utils.shared``, as RunInference does); each DoFn instance has
    its own stream. When a model call fails, the records in flight run again one by one and only
    those that fail alone become dead letters.
    """

    def __init__(self, handler: EarlyExitModelHandler) -> None:
        self.handler = handler
        self._shared = shared.Shared()
        self._tag = uuid.uuid4().hex  # one model per transform and worker process, as RunInference's model tag
        self._model = None
        self._stream = None
        self._buffer: list = []
        self._buffered = 0

    def setup(self) -> None:
        self._model = self._shared.acquire(self.handler.load_model, tag=self._tag)
        self._stream = self.handler.record_stream(self._model)

    def start_bundle(self) -> None:
        self._buffer, self._buffered = [], 0

    def process(self, record: PreparedInput, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam,
                pane=beam.DoFn.PaneInfoParam) -> Iterator:
        # records gather to one engine window of rows (sorted by length inside it) before they enter
        self._buffer.append((record, (timestamp, window, pane)))
        self._buffered += len(record.samples)
        if self._buffered >= self.handler.engine_config.effective_window or len(self._buffer) >= self.handler.max_batch_size:
            yield from self._submit()

    def finish_bundle(self) -> Iterator:
        yield from self._submit()
        yield from self._outputs(self._stream.flush)

    def _submit(self) -> Iterator:
        items, self._buffer, self._buffered = self._buffer, [], 0
        if items:
            yield from self._outputs(lambda: self._stream.submit(items), items)

    def _outputs(self, call, items=()) -> Iterator:
        try:
            done = call()
        except Exception:  # noqa: BLE001 - a failed model call costs the records that fail alone, not the job
            lost = self._stream.reset()
            submitted = {id(r) for _, r in lost}
            lost += [(meta, r) for r, meta in items if id(r) not in submitted]
            yield from self._isolate(lost)
            return
        for (ts, window, pane), prediction in done:
            yield WindowedValue(prediction, ts, (window,), pane)

    def _isolate(self, lost) -> Iterator:
        """A layer call failed with records from many batches in flight, and which of them caused
        it is unknown: each runs again on its own (predictions are batch-invariant, so a record
        that succeeds alone gets the prediction it would have had), and only the records that
        fail alone become dead letters, as with RunInference at batch size 1."""
        Metrics.counter(NAMESPACE, "inference_failures_isolated").inc(len(lost))
        failed = 0
        for (ts, window, pane), r in lost:
            try:
                out = self.handler.run_inference([r], self._model)
            except Exception as alone:  # noqa: BLE001
                failed += 1
                dead = inference_dead_letter(r, type(alone), "record", self.handler.job.run_id)
                yield beam.pvalue.TaggedOutput(DEAD, WindowedValue(dead, ts, (window,), pane))
                continue
            for prediction in out:
                yield WindowedValue(prediction, ts, (window,), pane)
        if failed:
            Metrics.counter(NAMESPACE, "dead_letters_inference_error").inc(failed)


class EarlyExitInference(beam.PTransform):
    """InputRecords -> (PredictionRecords, DeadLetters); the run is the handler's ``job``."""

    def __init__(self, handler: EarlyExitModelHandler, prepare: PrepareConfig | None = None) -> None:
        super().__init__()
        self.handler, self.prepare = handler, prepare or PrepareConfig()

    def expand(self, records):
        job = self.handler.job
        prepared = records | "Prepare" >> beam.ParDo(Prepare(job, self.prepare)).with_outputs(DEAD, main="prepared")
        if self.handler.worker.regroup == "bundle":
            out = prepared.prepared | "RegroupedInference" >> beam.ParDo(RegroupedInference(self.handler)).with_outputs(
                DEAD, main="predictions")
            predictions, failed = out.predictions, out[DEAD]
        else:
            predictions, other = prepared.prepared | "RunInference" >> RunInference(self.handler).with_exception_handling()
            failed = other.failed_inferences | "FailedBatches" >> beam.FlatMap(failed_batch_to_dead_letters, job.run_id)
        dead = (prepared[DEAD], failed) | "AllDead" >> beam.Flatten()
        return predictions, dead
