"""How one layer runs for rows that may exit after it: a :class:`LayerStep`, chosen once per layer.

A layer runs in one of three ways, each a step with two halves: :meth:`LayerStep.first` runs what
the exit head needs and returns its logits; the policy decides; :meth:`LayerStep.rest` finishes
the layer for the rows that go on only. The engine, the batch-size-1 reference and the full-depth
forward (training, calibration) all run layers through these, and each step reports the
multiply-adds of a row that exits after its first half (:meth:`LayerStep.macs`), so the count is
of what ran.

* :class:`WholeLayer`: the whole layer, then the head (``rest`` has nothing left to do).
* :class:`PositionsFirst` (``EngineConfig.split_layers``, where a row may exit and the head reads
  a few positions: [CLS], GPT-2's last token, a relation's entity markers): every token's keys and
  values and the layer's output at the head's positions only; ``rest`` runs the queries, attention
  output and feed-forward of every token (the head's positions a second time: 1/T of the work),
  reusing the keys and values, for the rows that go on. The results are the whole layer's.
* :class:`AttentionFirst` (``EarlyExitConfig.head_input`` "attention", every layer but the last):
  the attention sublayer, the head on its output; ``rest`` is the feed-forward.

:class:`LayerPlan` picks the step of every layer once, from the model, the engine's
``split_layers`` and, per policy, whether a row may exit at that layer at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .flops import Cost, MacCounter, SampleMacs, weight_macs

if TYPE_CHECKING:
    from .backbones import LayerKeys
    from .modeling import EarlyExitModel
    from .policies import ExitPolicy


@dataclass
class StepState:
    """What :meth:`LayerStep.first` leaves for :meth:`LayerStep.rest`, per row of its batch."""

    carry: torch.Tensor  # (N, T, H) the rows' states until `rest`: the layer's output (whole), its
    # attention sublayer's (attention first) or its input (positions first)
    head_input: torch.Tensor  # the states the exit head read: (N, T, H), or (N, P, H) at positions
    bias: torch.Tensor | None = None  # the attention mask `first` ran with
    keys: "LayerKeys | None" = None  # positions first: every token's keys and values


class LayerStep:
    """One layer (0-based ``layer``) of ``model``, in two halves around the exit decision."""

    two_step: bool = True  # False: the whole layer runs in `first`

    def __init__(self, model: "EarlyExitModel", layer: int, counter: MacCounter | None = None) -> None:
        self.model, self.layer, self.counter = model, layer, counter

    def start(self, hidden: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
              entity_positions: torch.Tensor | None) -> StepState:
        """The first half on rows (N, T, H) entering the layer."""
        raise NotImplementedError

    def head_logits(self, state: StepState, mask: torch.Tensor | None,
                    entity_positions: torch.Tensor | None) -> torch.Tensor:
        return self.model.head_logits(self.layer, state.head_input, mask, entity_positions)

    def first(self, hidden: torch.Tensor, mask: torch.Tensor | None,
              entity_positions: torch.Tensor | None) -> tuple[torch.Tensor, StepState]:
        """Run what the exit head needs on rows (N, T, H): (its logits, the state for :meth:`rest`)."""
        state = self.start(hidden, self.model.adapter.attention_bias(hidden, mask), mask, entity_positions)
        return self.head_logits(state, mask, entity_positions), state

    def rest(self, state: StepState, hidden: torch.Tensor, mask: torch.Tensor | None,
             keep: torch.Tensor | None) -> torch.Tensor:
        """The layer's output (M, T', H) for the rows that go on: ``hidden`` and ``mask`` are their
        ``state.carry`` and mask (M of N rows, selected by ``keep``, None for all; trimmed to T')."""
        return hidden

    def exit_cost(self, t: torch.Tensor, k: torch.Tensor) -> Cost:
        """(actual, dense) multiply-adds of :meth:`first` on T tokens (``k``: this layer, 1-based)."""
        assert self.counter is not None
        return self.counter.whole_layer(t, k)

    def macs(self, lengths: torch.Tensor) -> list[SampleMacs]:
        """The MACs of rows of real lengths T (images: patches + 1) that exit after :meth:`first`:
        every earlier layer whole, this one as far as :meth:`first` ran it."""
        if self.counter is None:
            raise ValueError("this layer step was built without a MacCounter")
        return self.counter.count(lengths, torch.full((len(lengths),), self.layer + 1), self.exit_cost)


class WholeLayer(LayerStep):
    two_step = False

    def start(self, hidden, bias, mask, entity_positions) -> StepState:
        out = self.model.adapter.layer(self.layer, hidden, bias)
        return StepState(carry=out, head_input=out)


class AttentionFirst(LayerStep):
    def __init__(self, model: "EarlyExitModel", layer: int, counter: MacCounter | None = None) -> None:
        super().__init__(model, layer, counter)
        # what a row that exits here never runs, per token: the feed-forward's weights
        self._ffn = weight_macs(model.adapter.feed_forward_weights(layer)) if counter is not None else (0, 0)

    def start(self, hidden, bias, mask, entity_positions) -> StepState:
        attention = self.model.adapter.layer_attention(self.layer, hidden, bias)
        return StepState(carry=attention, head_input=attention)

    def rest(self, state, hidden, mask, keep) -> torch.Tensor:
        return self.model.adapter.layer_feed_forward(self.layer, hidden)

    def exit_cost(self, t: torch.Tensor, k: torch.Tensor) -> Cost:
        actual, dense = super().exit_cost(t, k)
        return actual - t * self._ffn[0], dense - t * self._ffn[1]


class PositionsFirst(LayerStep):
    def __init__(self, model: "EarlyExitModel", layer: int, counter: MacCounter | None = None) -> None:
        super().__init__(model, layer, counter)
        self.positions = model.head_position_count  # P: 1 (the pooled token) or 2 (entity markers)
        # what `first` multiplies every token by: the keys' and values' weights
        self._kv = weight_macs(model.adapter.key_value_weights(layer)) if counter is not None else (0, 0)

    def start(self, hidden, bias, mask, entity_positions) -> StepState:
        adapter, i = self.model.adapter, self.layer
        positions = self.model.head_positions(hidden, mask, entity_positions)  # (N, P)
        keys = adapter.layer_keys(i, hidden)
        picked = adapter.layer_at(i, hidden, bias, keys, positions)  # (N, P, H)
        return StepState(carry=hidden, head_input=picked, bias=bias, keys=keys)  # rows keep their inputs

    def head_logits(self, state, mask, entity_positions) -> torch.Tensor:
        return self.model.head_logits_at(self.layer, state.head_input)

    def rest(self, state, hidden, mask, keep) -> torch.Tensor:
        adapter, keys, bias = self.model.adapter, state.keys, state.bias
        if keep is not None:  # rows left: their keys, and the mask of their (trimmed) length
            keys = keys.take(keep, hidden.shape[1])
            bias = adapter.attention_bias(hidden, mask)
        return adapter.layer_rest(self.layer, hidden, bias, keys)

    def exit_cost(self, t: torch.Tensor, k: torch.Tensor) -> Cost:
        """Keys and values of every token, T·(their weights); the rest of the layer at the P
        positions, P·(the other weights) + 2·P·T·H of attention."""
        assert self.counter is not None
        c, p = self.counter, self.positions
        attention = 2.0 * p * t * c.hidden
        (kv_sparse, kv_dense), i = self._kv, self.layer
        actual = t * kv_sparse + p * (c.sparse_per_token[i] - kv_sparse) + attention
        dense = t * kv_dense + p * (c.dense_per_token[i] - kv_dense) + attention
        return actual, dense


class LayerPlan:
    """The step of every layer of ``model``, decided once: where the head reads the attention
    sublayer, :class:`AttentionFirst`; else, with ``split_layers``, where the head reads a few
    positions and the family can run the layer in two steps (types and hooks checked here, once),
    :class:`PositionsFirst` at the layers a policy lets rows exit at; else :class:`WholeLayer`.
    ``counter``: the MAC counter the steps report with (None: no accounting, e.g. training)."""

    def __init__(self, model: "EarlyExitModel", split_layers: bool = False, counter: MacCounter | None = None) -> None:
        self.counter = counter
        self._whole: list[LayerStep] = []
        self._split: list[LayerStep | None] = []
        splits = split_layers and model.head_position_count > 0
        for i in range(model.num_layers):
            if model.head_reads_attention(i):
                self._whole.append(AttentionFirst(model, i, counter))
                self._split.append(None)
                continue
            self._whole.append(WholeLayer(model, i, counter))
            self._split.append(PositionsFirst(model, i, counter) if splits and model.adapter.splits_layer(i) else None)

    def steps(self, policy: "ExitPolicy | None" = None) -> list[LayerStep]:
        """Each layer's step under ``policy``: a layer no row may exit at runs whole (None: every
        layer as if none may exit)."""
        return [split if split is not None and policy is not None and policy.may_exit(i + 1) else whole
                for i, (whole, split) in enumerate(zip(self._whole, self._split))]
