"""Prepare records for the model and run early-exit inference, dead letters kept at every step."""

from __future__ import annotations

from typing import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference

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
        yield DeadLetter(record.source_uri, record.record_id, "inference", "inference_error",
                         f"model inference failed for this batch ({exc_type.__name__})", run_id)


class EarlyExitInference(beam.PTransform):
    """InputRecords -> (PredictionRecords, DeadLetters); the run is the handler's ``job``."""

    def __init__(self, handler: EarlyExitModelHandler, prepare: PrepareConfig | None = None) -> None:
        super().__init__()
        self.handler, self.prepare = handler, prepare or PrepareConfig()

    def expand(self, records):
        job = self.handler.job
        prepared = records | "Prepare" >> beam.ParDo(Prepare(job, self.prepare)).with_outputs(DEAD, main="prepared")
        predictions, other = prepared.prepared | "RunInference" >> RunInference(self.handler).with_exception_handling()
        failed = other.failed_inferences | "FailedBatches" >> beam.FlatMap(failed_batch_to_dead_letters, job.run_id)
        dead = (prepared[DEAD], failed) | "AllDead" >> beam.Flatten()
        return predictions, dead
