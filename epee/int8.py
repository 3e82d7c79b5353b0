"""``--precision int8`` (CPU only): the transformer layers' linear layers as int8 x int8 -> int32
products (``torch._int_mm``), weights quantised once per output channel (:class:`Int8Weights`),
each token row of the input on its own scale (:func:`quantize_rows`), so a row's result never
depends on its batch mates, which the regrouping engine changes at every depth. Embeddings,
attention, exit heads and exit decisions stay float32. The mode (:class:`Int8Linear`) is entered
through :func:`epee.kernels.linear_kernel_mode`, and shares oneDNN's bounded row sizes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import OneDNNLinear, _plain, bucket_rows, unhooked


@functools.lru_cache(maxsize=1)
def int8_matmul_available() -> bool:
    """Whether this PyTorch build multiplies int8 matrices into int32 on the CPU (``torch._int_mm``)."""
    try:
        a = torch.ones(2, 3, dtype=torch.int8)
        return bool(torch.equal(torch._int_mm(a, a.t().contiguous()), torch.full((2, 2), 3, dtype=torch.int32)))
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class _Int8Weight:
    param: torch.Tensor  # the float32 weight it was made from (identity and version are checked)
    version: int
    qt: torch.Tensor  # (in, out) int8, round(weight / scale) transposed
    scale: torch.Tensor  # (out,) float32, per output channel: max |weight row| / 127
    transposed: bool = False  # the weight is (in, out): GPT-2's Conv1D, called through torch.addmm


def quantize_rows(
    x: torch.Tensor, rows: int | None = None, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each row of a 2-D float tensor on its own scale.

    Returns ``(q, scale)`` with ``q`` int8 in [-127, 127] and ``scale`` (rows, 1) float32, so
    ``q * scale`` is ``x`` within half a step of its row's scale. An all-zero row gets scale 0 and
    zeros. One row's values never change another row's: this is what makes int8 results
    independent of the batch a row is in. ``rows`` (at least ``x``'s) pads ``q`` with zero rows;
    ``scratch``, a float32 tensor of at least ``x.numel()`` elements, holds the intermediate."""
    m, k = x.shape
    # max |x| per row as max(max x, -min x): two plain reductions, several times faster on the CPU
    # than abs().amax(), aminmax() or vector_norm(inf)
    scale = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_()).div_(127.0)
    inverse = scale.clamp_min(torch.finfo(torch.float32).tiny).reciprocal()
    scaled = torch.mul(x, inverse, out=scratch.view(-1)[: m * k].view(m, k)) if scratch is not None else x * inverse
    q = torch.empty((max(rows or m, m), k), dtype=torch.int8, device=x.device)
    q[:m].copy_(scaled.round_())
    q[m:].zero_()
    return q, scale


def _quantize_weight(w: torch.Tensor, transposed: bool) -> _Int8Weight:
    """``w`` is (out, in) as in ``nn.Linear``, or (in, out) with ``transposed`` (GPT-2's ``Conv1D``)."""
    rows = w.detach().t() if transposed else w.detach()  # rows: the output channels
    q, scale = quantize_rows(rows.contiguous())
    return _Int8Weight(param=w, version=w._version, qt=q.t().contiguous(), scale=scale.view(-1),
                       transposed=transposed)


class Int8Weights:
    """The int8 copies of a model's transformer-layer linear weights (per output channel).

    Built once per engine (after any pruning, like the MAC counter); only the linear layers inside
    the backbone's layers are taken (``nn.Linear``, and GPT-2's ``Conv1D``): embeddings, exit heads
    and poolers stay float32, so the exit decisions see float32 head arithmetic. A weight changed in
    place later (its version moves) is quantised again on its next call."""

    def __init__(self, weights: Sequence[torch.Tensor] = (), transposed: Sequence[torch.Tensor] = ()) -> None:
        self._table: dict[int, _Int8Weight] = {}
        for group, is_transposed in ((weights, False), (transposed, True)):
            for w in group:
                if _plain(w) and w.dim() == 2 and w.dtype == torch.float32 and w.layout == torch.strided:
                    self._table[id(w)] = _quantize_weight(w, is_transposed)

    @classmethod
    def for_model(cls, model: nn.Module) -> "Int8Weights":
        """The layers' linear weights of an :class:`~epee.modeling.EarlyExitModel`; an error if it
        has none (a backbone whose layers this does not know would silently stay float32)."""
        from transformers.pytorch_utils import Conv1D

        if not int8_matmul_available():
            raise ValueError("precision 'int8': this PyTorch build has no CPU int8 matmul (torch._int_mm)")
        linear: dict[int, torch.Tensor] = {}
        conv: dict[int, torch.Tensor] = {}
        for i in range(model.num_layers):  # ALBERT's shared layer appears once
            for sub in model.adapter.layer_module(i).modules():
                if not unhooked(sub):
                    continue
                if type(sub) is nn.Linear:
                    linear[id(sub.weight)] = sub.weight
                elif type(sub) is Conv1D:
                    conv[id(sub.weight)] = sub.weight
        found = cls(list(linear.values()), list(conv.values()))
        if not len(found):
            raise ValueError("precision 'int8': no float32 linear layer found in this backbone's layers")
        return found

    def __len__(self) -> int:
        return len(self._table)

    def get(self, w: torch.Tensor, transposed: bool = False) -> _Int8Weight | None:
        entry = self._table.get(id(w))
        if entry is None or entry.param is not w or entry.transposed != transposed:
            return None
        if entry.version != w._version:
            entry = self._table[id(w)] = _quantize_weight(w, transposed)
        return entry


def int8_linear(
    x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor], weight: _Int8Weight, b: torch.Tensor | None,
    post: str = "none",
) -> torch.Tensor:
    """``F.linear(x, w, b)`` (``post="gelu"``: with the exact GELU) as an int8 product.

    ``quantized`` is ``quantize_rows`` of ``x``'s token rows, padded to :func:`bucket_rows` (as for
    oneDNN, so the int8 kernel too sees a bounded set of shapes; `docs/analyses.md` probes its
    memory); Q, K and V share it. Each row, on its own scale, is multiplied exactly into int32 by
    the per-channel int8 weight, then scaled back: the result depends on that row and the weight
    only, never on the other rows of the batch."""
    rows = x.reshape(-1, x.shape[-1])
    m, n = rows.shape[0], weight.qt.shape[1]
    q, scale = quantized
    # The int32 product is written into the float32 output's own memory (same element size) and
    # converted there, element by element in place: one pass and one allocation fewer than a
    # separate int32 buffer (6.5 against 8.4 ms for (4000, 1536)). Converting before scaling also
    # avoids multiplying int32 by a float scale, a slow mixed-dtype path (15x slower).
    padded = torch.empty((q.shape[0], n), dtype=torch.float32, device=x.device)
    acc = torch._int_mm(q, weight.qt, out=padded.view(torch.int32))
    out = padded[:m]
    out.copy_(acc[:m]).mul_(scale).mul_(weight.scale)
    if b is not None:
        out.add_(b)
    if post == "gelu":
        torch.ops.aten.gelu_(out)  # exact (erf) GELU, in place
    return out.view(*x.shape[:-1], n)


class Int8Linear(OneDNNLinear):
    """``--precision int8``: the transformer layers' linear calls as int8 products with dynamic
    per-row activation scales (:func:`int8_linear`); every other float32 linear call (exit heads,
    poolers) goes to oneDNN where ``onednn`` is set, else to PyTorch's own kernel."""

    def __init__(self, weights: Int8Weights, onednn: bool = False) -> None:
        super().__init__()
        self.weights = weights
        self.onednn = onednn
        self.int8_calls = 0  # linear calls run in int8 (tests and benchmarks read it)
        # the last input quantised, with its int8 rows: Q, K and V are called on the same tensor
        self._last: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        # reused by every quantisation of this mode's run, grown to the largest input: a fresh large
        # tensor costs page faults on its first touch
        self._scratch: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # an in-place op (add_, __setitem__, out=) could change the input Q, K and V share: forget it
        if self._last is not None and func is not F.linear and (
            getattr(func, "__name__", "").endswith("_") or (kwargs and kwargs.get("out") is not None)
        ):
            self._last = None
        if func is torch.addmm and len(args) == 3 and not kwargs:  # Conv1D: addmm(bias, x, weight)
            b, x, w = args
            entry = self.weights.get(w, transposed=True) if _plain(w) else None
            if entry is not None and x.dim() == 2 and self._eligible(x, w.t(), b):
                return self._int8(x, entry, b, "none")
        return super().__torch_function__(func, types, args, kwargs)

    def route(self, x: Any, w: Any, b: Any, post: str = "none") -> torch.Tensor | None:
        entry = self.weights.get(w) if _plain(w) else None
        if entry is not None and self._eligible(x, w, b):
            return self._int8(x, entry, b, post)
        return super().route(x, w, b, post) if self.onednn else None

    def _int8(self, x: torch.Tensor, entry: _Int8Weight, b: torch.Tensor | None, post: str) -> torch.Tensor:
        self.int8_calls += 1
        if self._last is None or self._last[0] is not x:  # Q, K and V: one quantisation
            rows = x.reshape(-1, x.shape[-1])
            scratch = self._scratch
            if scratch is None or scratch.numel() < rows.numel() or scratch.device != rows.device:
                scratch = self._scratch = torch.empty(rows.numel(), dtype=torch.float32, device=rows.device)
            self._last = (x, quantize_rows(rows, bucket_rows(rows.shape[0]), scratch))
        return int8_linear(x, self._last[1], entry, b, post)
