"""The adapter contract every backbone family implements, and the helpers the families share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..inputs import Batch


class BackboneAdapter:
    """Family-neutral view of a stock transformers backbone, used by the one exit loop.

    Every family implements the core: :meth:`embed` a batch, build the :meth:`attention_bias`, run
    :meth:`layer` ``i`` (and name its :meth:`layer_module`), turn hidden states into exit-head input
    (:meth:`pooled`, :meth:`pooled_position`, :meth:`token_states`) and give the unmodified
    :meth:`stock_forward` that the engine must reproduce with policy "none". The layer modules are
    the transformers ones, called in the same order with the same masks as the stock forward.

    Capabilities a family may add (the defaults refuse):

    * text families: :meth:`word_embeddings` and :meth:`embed_with_prompts` (soft prompts);
    * a layer in two steps, the exit head's positions first (``EngineConfig.split_layers``):
      :meth:`splits_layer`, :meth:`layer_keys`, :meth:`layer_at`, :meth:`layer_rest` and
      :meth:`key_value_weights`; a family implements ``_layer_from_keys`` (and ``_query_bias``);
    * a layer as its attention sublayer, then its feed-forward (``head_input`` "attention"):
      ``supports_attention_heads``, :meth:`layer_attention`, :meth:`layer_feed_forward` and
      :meth:`feed_forward_weights`.

    ``tests/epee/test_backbones.py`` checks every family against this contract.
    """

    family: str = ""
    is_image: bool = False
    supports_attention_heads: bool = False

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.config = model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    # -- the core -------------------------------------------------------------------------------
    def embed(self, batch: Batch) -> torch.Tensor:
        """Hidden states entering layer 1: (N, T, H)."""
        raise NotImplementedError

    def attention_bias(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask the layers take, in the format of the configured attention implementation."""
        if attention_mask is None:
            return None
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def layer(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Run transformer layer ``i`` (0-based): (N, T, H) -> (N, T, H)."""
        raise NotImplementedError

    def layer_module(self, i: int) -> nn.Module:
        """The module that :meth:`layer` runs for layer ``i`` (ALBERT: a shared group)."""
        raise NotImplementedError

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Sequence-level exit-head input: (N, T, H) -> (N, H)."""
        raise NotImplementedError

    def pooled_position(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The one token :meth:`pooled` reads, per row: (N,) long. BERT, ALBERT, ViT: position 0."""
        return torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)

    def token_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token-level exit-head input: (N, T, H) -> (N, T, H)."""
        return hidden

    def stock_forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The unmodified transformers forward: (pooled (N, H), token states (N, T, H))."""
        raise NotImplementedError

    # -- soft prompts (text families) -----------------------------------------------------------
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (text families); soft prompts live in its space."""
        raise NotImplementedError(f"{self.family} has no token embeddings")

    def embed_with_prompts(self, batch: Batch, prompts: torch.Tensor, position: int) -> torch.Tensor:
        """:meth:`embed`, with the word embeddings of positions ``position .. position + K - 1``
        replaced by the K soft prompt vectors ``prompts`` (K, H) before position embeddings and
        normalisation, as prompt tuning does. The preprocessor reserves those positions."""
        raise NotImplementedError(f"soft prompts are not supported for {self.family}")

    # -- a layer in two steps: the exit head's positions first, the other positions only for the
    # rows that go on. Every token's keys and values are computed once and serve both steps.
    def splits_layer(self, i: int) -> bool:
        """Whether layer ``i`` can run as :meth:`layer_keys` + :meth:`layer_at` (+ :meth:`layer_rest`)
        with the same result as :meth:`layer` (stock types, eval mode, no hooks). Asked once per
        layer when an engine is built (:class:`epee.layer_step.LayerPlan`)."""
        return False

    def layer_keys(self, i: int, hidden: torch.Tensor) -> "LayerKeys":
        """Layer ``i``'s attention keys and values of every token of ``hidden`` (N, T, H)."""
        raise NotImplementedError(f"{self.family} layers do not run in two steps")

    def layer_at(
        self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: "LayerKeys", positions: torch.Tensor
    ) -> torch.Tensor:
        """Layer ``i``'s output at ``positions`` (N, P) only: (N, P, H), equal to
        ``layer(i, hidden, bias)`` gathered there. Queries, attention output and feed-forward run
        for those P positions; the keys and values, which every query needs, come from ``keys``."""
        return self._layer_from_keys(i, gather_tokens(hidden, positions), self._query_bias(bias, hidden, positions), keys)

    def layer_rest(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: "LayerKeys") -> torch.Tensor:
        """Layer ``i``'s whole output (N, T, H) for rows whose keys and values are already in ``keys``."""
        return self._layer_from_keys(i, hidden, bias, keys)

    def key_value_weights(self, i: int) -> list[torch.Tensor]:
        """The weights (or parts of a fused weight) :meth:`layer_keys` multiplies every token by (MACs)."""
        return []

    def _query_bias(self, bias: torch.Tensor | None, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The attention mask for queries at ``positions`` alone: its rows there (None stays None:
        bidirectional attention with no padding needs no mask)."""
        return bias_rows(bias, positions)

    def _layer_from_keys(self, i: int, queries: torch.Tensor, bias: torch.Tensor | None, keys: "LayerKeys") -> torch.Tensor:
        """The family's layer ``i`` for the token states ``queries`` (N, P, H), attending over the
        precomputed ``keys`` with the mask rows ``bias`` (N, h, P, T): (N, P, H)."""
        raise NotImplementedError(f"{self.family} layers do not run in two steps")

    # -- a layer as its attention sublayer, then its feed-forward (head_input "attention"): the
    # exit head reads the first step's output, and only the rows that go on run the second.
    def layer_attention(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Layer ``i``'s attention sublayer (with its residual and norm): (N, T, H) -> (N, T, H)."""
        raise NotImplementedError(f"{self.family} layers do not split after attention")

    def layer_feed_forward(self, i: int, attention: torch.Tensor) -> torch.Tensor:
        """The rest of layer ``i`` on :meth:`layer_attention`'s output: together they are :meth:`layer`."""
        raise NotImplementedError(f"{self.family} layers do not split after attention")

    def feed_forward_weights(self, i: int) -> list[torch.Tensor]:
        """The weights :meth:`layer_feed_forward` multiplies by, per token (MACs)."""
        raise NotImplementedError(f"{self.family} layers do not split after attention")


@dataclass
class LayerKeys:
    """One layer's attention keys and values for a batch of rows: (N, heads, T, head_dim) each."""

    key: torch.Tensor
    value: torch.Tensor

    def take(self, rows: torch.Tensor, length: int) -> "LayerKeys":
        """The rows selected by ``rows`` (bool or index), their first ``length`` tokens."""
        return LayerKeys(self.key[rows][:, :, :length], self.value[rows][:, :, :length])


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(N, T, heads * head_dim) -> (N, heads, T, head_dim), as the transformers attentions do."""
    n, t, _ = x.shape
    return x.view(n, t, -1, head_dim).transpose(1, 2)


def gather_tokens(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N, T, H) states at ``positions`` (N, P) -> (N, P, H)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
    return hidden[rows, positions]


def bias_rows(bias: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """The attention mask's query rows at ``positions`` (N, P): (N, h, T, T) -> (N, h, P, T). A mask
    that does not vary along the query axis (one row, broadcast) is returned as it is."""
    if bias is None or bias.shape[2] == 1:
        return bias
    n, p = positions.shape
    bias = bias.expand(n, -1, -1, -1)
    index = positions[:, None, :, None].expand(n, bias.shape[1], p, bias.shape[3])
    return torch.gather(bias, 2, index)


def attend(module: nn.Module, eager, query: torch.Tensor, keys: LayerKeys, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``query`` (N, heads, P, d) over ``keys`` through the implementation the model is
    configured with (``config._attn_implementation``), as its own forward calls it: (N, P, heads * d)."""
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)
    out, _ = attention(module, query, keys.key, keys.value, bias, dropout=0.0, scaling=module.scaling)
    n, _, p, _ = query.shape
    return out.reshape(n, p, -1).contiguous()


def with_prompts(words: torch.Tensor, prompts: torch.Tensor, position: int) -> torch.Tensor:
    """(N, T, H) word embeddings with positions ``position .. position + K - 1`` set to the
    prompts (K, H); a new tensor, so gradients reach the prompts and not the table."""
    k = prompts.shape[0]
    if words.shape[1] < position + k:
        raise ValueError(f"inputs of {words.shape[1]} tokens cannot hold {k} prompt positions from {position}: "
                         "encode them with the model directory's preprocessor, which reserves them")
    n = words.shape[0]
    return torch.cat([words[:, :position], prompts.to(words.dtype).unsqueeze(0).expand(n, -1, -1),
                      words[:, position + k :]], dim=1)


def encoder_stock_forward(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's and ALBERT's stock forward: (the pooler's output, the last hidden states)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids)
    return out.pooler_output, out.last_hidden_state
