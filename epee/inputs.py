"""Model-ready samples and their collation into right-padded batches.

The engine owns padding: every batch is right-padded, so a token's position id is its index and,
for GPT-2's causal attention, real tokens never see a pad. That is what makes a sample's output
independent of what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass(frozen=True)
class EncodedSample:
    """One sample, already tokenised (text) or preprocessed (image).

    Exactly one of ``input_ids`` and ``pixel_values`` is set.
    """

    input_ids: torch.Tensor | None = None  # (T,) long, no padding
    token_type_ids: torch.Tensor | None = None  # (T,) long; BERT/ALBERT segment ids
    pixel_values: torch.Tensor | None = None  # (C, H, W) float, already normalised
    entity_positions: tuple[int, int] | None = None  # relation task: indices of the two start markers
    token_mask: torch.Tensor | None = None  # (T,) bool: tokens whose tags count; default all

    def __post_init__(self) -> None:
        if (self.input_ids is None) == (self.pixel_values is None):
            raise ValueError("an EncodedSample needs exactly one of input_ids and pixel_values")
        if self.input_ids is not None:
            if self.input_ids.dim() != 1 or self.input_ids.numel() == 0:
                raise ValueError(
                    f"input_ids must be a non-empty 1-D tensor, got shape {tuple(self.input_ids.shape)}"
                )
            n = self.input_ids.numel()
            for name in ("token_type_ids", "token_mask"):
                value = getattr(self, name)
                if value is not None and tuple(value.shape) != (n,):
                    raise ValueError(f"{name} has shape {tuple(value.shape)}, expected ({n},)")
            if self.entity_positions is not None:
                e1, e2 = self.entity_positions
                if not (0 <= e1 < n and 0 <= e2 < n):
                    raise ValueError(f"entity_positions {self.entity_positions} outside a sequence of {n} tokens")
        elif self.pixel_values is not None and self.pixel_values.dim() != 3:
            raise ValueError(f"pixel_values must be (C, H, W), got shape {tuple(self.pixel_values.shape)}")

    @property
    def length(self) -> int:
        """Sequence length used to group samples; images all count as one length."""
        return int(self.input_ids.numel()) if self.input_ids is not None else 0

    def __reduce__(self):
        # Pickled with its tensors as numpy arrays, rebuilt as tensors without a copy. Beam's coders
        # pickle samples whenever they cross a stage boundary and, when sampling byte sizes, inside
        # fused stages too (every record of a sampled RunInference batch): a torch tensor pickles
        # through torch.save, about 5x slower (a 128-token sample: 14 us as arrays, 74 us for its
        # two tensors alone, measured 2026-11-24).
        return (_rebuild_sample, tuple(_to_numpy(getattr(self, f.name)) for f in fields(self)))


def _to_numpy(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _rebuild_sample(*values) -> EncodedSample:
    return EncodedSample(*(torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values))


@dataclass
class Batch:
    """Right-padded tensors for a list of samples; ``attention_mask`` marks real tokens."""

    input_ids: torch.Tensor | None  # (N, T)
    token_type_ids: torch.Tensor | None  # (N, T)
    attention_mask: torch.Tensor | None  # (N, T) long; None for images
    pixel_values: torch.Tensor | None  # (N, C, H, W)
    entity_positions: torch.Tensor | None  # (N, 2) long
    token_mask: torch.Tensor | None  # (N, T) bool

    @property
    def size(self) -> int:
        ref = self.input_ids if self.input_ids is not None else self.pixel_values
        return int(ref.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def collate(samples: list[EncodedSample], pad_token_id: int = 0) -> Batch:
    """Stack samples into one right-padded batch."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if samples[0].pixel_values is not None:
        if any(s.pixel_values is None for s in samples):
            raise ValueError("cannot mix image and text samples in one batch")
        return Batch(None, None, None, torch.stack([s.pixel_values for s in samples]), None, None)
    if any(s.input_ids is None for s in samples):
        raise ValueError("cannot mix image and text samples in one batch")
    n, t = len(samples), max(s.length for s in samples)
    input_ids = torch.full((n, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    has_types = any(s.token_type_ids is not None for s in samples)
    token_type_ids = torch.zeros((n, t), dtype=torch.long) if has_types else None
    token_mask = torch.zeros((n, t), dtype=torch.bool)
    for i, s in enumerate(samples):
        k = s.length
        input_ids[i, :k] = s.input_ids
        attention_mask[i, :k] = 1
        if token_type_ids is not None and s.token_type_ids is not None:
            token_type_ids[i, :k] = s.token_type_ids
        token_mask[i, :k] = True if s.token_mask is None else s.token_mask
    entity_positions = None
    if any(s.entity_positions is not None for s in samples):
        if any(s.entity_positions is None for s in samples):
            raise ValueError("relation samples need entity_positions on every sample of a batch")
        entity_positions = torch.tensor([s.entity_positions for s in samples], dtype=torch.long)
    return Batch(input_ids, token_type_ids, attention_mask, None, entity_positions, token_mask)
