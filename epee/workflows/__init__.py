"""The library API under the ``epee`` command: one function per workflow, on frozen dataclasses.

    from epee.workflows import TrainJob, CalibrationSpec, train, calibrate, evaluate

    trained = train(TrainJob(task="sequence", train="notes.jsonl", dev="dev.jsonl", backbone=DIR, output=MODEL))
    record = calibrate(MODEL, CalibrationSpec(confidence=0.99))
    evaluation = evaluate(MODEL, EvaluateSpec(data=DataSpec("test.jsonl")))

Bad arguments raise ``ValueError`` with a message naming the value (and the `epee` flag that
sets it); nothing here parses a command line, exits the process or sets environment variables.
"""

from .data import (
    DATA_TASKS, DataFields, DataSource, DataSpec, EncodedSet, all_scores, dev_set, dev_source, encode_all, encode_windows,
    load, model_task, score_function,
)
from .fit import TrainResult, sparsify, train
from .jobs import CalibrationSpec, EvaluateSpec, SparsifyJob, TrainJob
from .score import CalibrationRecord, Evaluation, calibrate, convert, evaluate

__all__ = [
    "DATA_TASKS", "CalibrationRecord", "CalibrationSpec", "DataFields", "DataSource", "DataSpec", "EncodedSet",
    "EvaluateSpec", "Evaluation", "SparsifyJob", "TrainJob", "TrainResult", "all_scores", "calibrate", "convert",
    "dev_set", "dev_source", "encode_all", "encode_windows", "evaluate", "load", "model_task", "score_function",
    "sparsify", "train",
]
