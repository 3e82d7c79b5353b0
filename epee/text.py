"""Tokenising text into :class:`EncodedSample` records."""

from __future__ import annotations

from typing import Sequence

import torch

from .inputs import EncodedSample


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[EncodedSample]:
    """Tokenise without padding (the engine pads per regrouped batch), truncating at max_length.

    Truncation is only for callers that accept it; the note pipeline covers long notes with
    overlapping windows instead.
    """
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    types = enc.get("token_type_ids")
    return [
        EncodedSample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            token_type_ids=None if types is None else torch.tensor(types[i], dtype=torch.long),
        )
        for i, ids in enumerate(enc["input_ids"])
    ]
