"""One labelled (or unlabelled) input, before tokenisation or pixel preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Span = tuple[int, int]  # character offsets [start, end)


@dataclass(frozen=True)
class Example:
    """One labelled (or unlabelled) input, before tokenisation or pixel preprocessing."""

    id: str
    text: str | None = None
    label: str | None = None  # class name (sequence, relation, image tasks)
    entities: tuple[Span, Span] | None = None  # relation task: entity 1 and entity 2
    spans: tuple[tuple[str, int, int], ...] | None = None  # token task: (type, start, end)
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    group: str | None = None  # document the example comes from, so splits never share a document
