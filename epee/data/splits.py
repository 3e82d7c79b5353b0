"""Deterministic train/dev splits by document, subsampling, and the labels of a set of examples."""

from __future__ import annotations

import hashlib
import random
from typing import Iterator, Sequence

from .example import Example

def split_examples(examples: Sequence[Example], dev_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic train/dev split by document (``group``, else id): the same inputs, fraction
    and seed always give the same split, and no document is in both parts."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction ({dev_fraction}) must lie in (0, 1)")
    train, dev = [], []
    for ex in examples:
        (dev if split_bucket(ex.group or ex.id, seed) < dev_fraction else train).append(ex)
    return train, dev


def split_bucket(document: str, seed: int) -> float:
    """Where ``document`` falls in [0, 1) for a split with ``seed``: a keyed hash, the same every run."""
    key = f"{seed}:{document}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def subsample(
    examples: Sequence[Example], max_examples: int | None, seed: int,
    negative_label: str | None = None, max_negative_ratio: float | None = None,
) -> list[Example]:
    """Optionally cap negatives at ``max_negative_ratio`` x positives, then cap the total; the
    order of what is kept is the input order."""
    rng = random.Random(seed)
    keep = list(range(len(examples)))
    if negative_label is not None and max_negative_ratio is not None:
        neg = [i for i in keep if examples[i].label == negative_label]
        pos = [i for i in keep if examples[i].label != negative_label]
        cap = int(len(pos) * max_negative_ratio)
        if len(neg) > cap:
            neg = rng.sample(neg, cap)
        keep = sorted(pos + neg)
    if max_examples is not None and len(keep) > max_examples:
        keep = sorted(rng.sample(keep, max_examples))
    return [examples[i] for i in keep]


def iter_labels(examples: Sequence[Example]) -> Iterator[str]:
    for ex in examples:
        if ex.label is not None:
            yield ex.label
