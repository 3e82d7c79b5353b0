"""Exit-layer histogram: how many samples left at each layer, and what follows from it.

One computation shared by the engine's statistics (:class:`epee.engine.EngineStats`), the
calibration's simulated runs (:class:`epee.calibration.SimulatedRun`), the pipelines' exit
statistics (``transforms.writers.ExitStatsFn``), the run report (``transforms.run_summary.RunTally``)
and the streaming summary (``pipelines.streaming.summarize_windows``).

The mean exit layer is an integer sum over an integer count (``layer_sum / samples``), so every
place that derives it from the same exits gets the same float, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class ExitHistogram:
    """``counts[i]``: samples that exited at layer ``i + 1`` (layers are 1-based).

    ``counts`` grows when a deeper layer is added, so a histogram can be filled before the depth
    of the model is known (the report reads rows of any depth).
    """

    counts: list[int] = field(default_factory=list)

    @classmethod
    def of_depth(cls, num_layers: int) -> "ExitHistogram":
        """An empty histogram of ``num_layers`` bars."""
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        return cls([0] * num_layers)

    @classmethod
    def of_layers(cls, layers: Iterable[int], num_layers: int = 0) -> "ExitHistogram":
        """The histogram of 1-based exit layers, at least ``num_layers`` bars long."""
        h = cls.of_depth(num_layers)
        for layer in layers:
            h.add(int(layer))
        return h

    @classmethod
    def of_tensor(cls, exit_layers: "torch.Tensor", num_layers: int = 0) -> "ExitHistogram":
        """:meth:`of_layers` of a (N,) tensor of 1-based exit layers, counted in one ``bincount``
        (the calibration sweep builds one per setting)."""
        import torch

        if exit_layers.numel() and int(exit_layers.min()) < 1:
            raise ValueError(f"exit layers are 1-based, got {int(exit_layers.min())}")
        counts = torch.bincount(exit_layers.reshape(-1).long(), minlength=num_layers + 1)
        return cls(counts[1:].tolist())

    def add(self, layer: int, count: int = 1) -> None:
        """Count ``count`` samples that exited at 1-based ``layer``."""
        if layer < 1:
            raise ValueError(f"exit layers are 1-based, got {layer}")
        if layer > len(self.counts):
            self.counts.extend([0] * (layer - len(self.counts)))
        self.counts[layer - 1] += count

    def merge(self, other: "ExitHistogram") -> "ExitHistogram":
        """Add ``other``'s counts to this histogram (in place); returns it."""
        if len(other.counts) > len(self.counts):
            self.counts.extend([0] * (len(other.counts) - len(self.counts)))
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        return self

    @property
    def num_layers(self) -> int:
        return len(self.counts)

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def layer_sum(self) -> int:
        """Layers run, summed over samples (a sample that exits at layer k ran k layers)."""
        return sum(layer * c for layer, c in enumerate(self.counts, start=1))

    @property
    def exits_per_layer(self) -> list[int]:
        return list(self.counts)

    @property
    def mean_exit_layer(self) -> float:
        """Mean 1-based exit layer; 0.0 when there are no samples."""
        n = self.samples
        return self.layer_sum / n if n else 0.0

    def speedup(self, num_layers: int | None = None) -> float:
        """``num_layers / mean exit layer``: the ideal speedup from the layers skipped (0.0 when
        empty). ``num_layers`` defaults to the histogram's length."""
        mean = self.mean_exit_layer
        depth = self.num_layers if num_layers is None else num_layers
        return depth / mean if mean else 0.0
