"""One early-exit job: read -> prepare and infer -> write, the graph the batch and the streaming
pipelines share (they differ only in how files are found and how outputs are written)."""

from __future__ import annotations

import apache_beam as beam

from .files import DEAD, INPUTS
from .inference import EarlyExitInference


class EarlyExitJob(beam.PTransform):
    """PBegin -> what ``write`` returns.

    ``read``: a PTransform from the pipeline's start to the readers' outputs (main ``records``,
    tagged ``DEAD`` and ``INPUTS``), e.g. :class:`transforms.note_reader.ReadNotes`.
    ``inference``: the run's :class:`transforms.inference.EarlyExitInference` (prepare + RunInference).
    ``write``: a PTransform taking ``(predictions, dead letters, inputs rows)``, e.g.
    :class:`transforms.writers.WriteOutputs` or :class:`transforms.writers.WriteWindowedOutputs`.
    Every record read ends as exactly one prediction or one dead letter: the reader's dead letters
    and those of inference are written together.
    """

    def __init__(self, read: beam.PTransform, inference: EarlyExitInference, write: beam.PTransform,
                 read_label: str = "Read") -> None:
        super().__init__()
        self.read, self.inference, self.write, self.read_label = read, inference, write, read_label

    def expand(self, pbegin):
        read = pbegin | self.read_label >> self.read
        predictions, inference_dead = read.records | "EarlyExit" >> self.inference
        dead = (read[DEAD], inference_dead) | "DeadLetters" >> beam.Flatten()
        return (predictions, dead, read[INPUTS]) | "Write" >> self.write
