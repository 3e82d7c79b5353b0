"""Which CPU kernel runs the float32 linear layers at inference: PyTorch's default or oneDNN.

PyTorch's CPU ``linear`` in float32 calls MKL's ``sgemm``. On the AMD EPYC machines our benchmarks
run on, oneDNN (the library PyTorch already ships for its ``mkldnn`` ops) computes the same float32
products about 25% faster for MiniLM's shapes (32 x 125 tokens by 384 -> 1536: 23.6 ms against
32.1 ms; ``bench.kernels`` measures any machine), and linear layers are three quarters of the
engine's time. ``linear_kernel="auto"`` (the default) routes them there on x86-64 CPUs, and
``"onednn"`` anywhere it can run (``"aten"`` keeps PyTorch's own):

- on a CPU, in float32, outside autocast (under ``--precision bfloat16``, ``auto`` keeps PyTorch's
  kernel and ``onednn`` is refused);
- at inference only: a call that needs gradients keeps PyTorch's ``linear`` (training is untouched);
- plain dense weights only (2:4 semi-structured tensors and other subclasses keep theirs).

BERT's up-projection and its GELU are one oneDNN call (:func:`linear_gelu`, called by
``BertAdapter.layer``): GELU is applied to each output tile as a post-op instead of a second pass
over the (rows, 4H) activations.

It is a :class:`torch.overrides.TorchFunctionMode`, active only inside the engine's and
calibration's loops: no module is modified, nothing is saved differently, and the products are
float32 ones, equal to PyTorch's within float32 rounding (about 3e-6 on MiniLM's activations).

**Shapes are bounded.** A process's memory grows with every distinct input shape oneDNN sees (a
probe over 3000 random batch shapes of 1-32 rows x 8-128 tokens: 2.6 GiB and growing, against
0.3 GiB with PyTorch's kernel; setting oneDNN's primitive cache to 0 did not stop it, so the cause
inside oneDNN is not pinned down). The engine's shapes vary with note lengths and exits, so the
token rows of each call are padded up to one of :data:`ROW_STEPS` sizes per power of two
(:func:`bucket_rows`: at most 12.5% more rows, about 6% on average; the padded rows' outputs are
dropped). The same probe then stays flat, at about 0.54 GiB from its first 500 shapes to 8000
(``docs/analyses.md``).

**int8** (``--precision int8``, CPU only; :class:`Int8Linear`): the linear layers inside the
transformer layers run as int8 x int8 -> int32 products (``torch._int_mm``), weights quantised once
per output channel (:class:`Int8Weights`), each token row of the input on its own scale
(:func:`quantize_rows`), so a row's result never depends on its batch mates, which the regrouping
engine changes at every depth. About 2x float32 at full depth on AVX-512 VNNI CPUs. Embeddings,
attention, exit heads and exit decisions stay float32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import threading
from dataclasses import dataclass
from typing import Any, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import LINEAR_KERNELS


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's float32 linear op."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(op(x, w, None, "none", [], ""), torch.full((2, 4), 3.0)))
    except (AttributeError, RuntimeError):
        return False


def check_linear_kernel(kernel: str, device: str | torch.device, precision: str) -> None:
    """Refuse a kernel that cannot run with this device and precision (checks only what a launcher
    can know; whether the op exists is checked where the engine runs)."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear_kernel ({kernel!r}) must be one of {', '.join(LINEAR_KERNELS)}")
    if precision == "int8" and torch.device(device).type != "cpu":
        raise ValueError(f"precision 'int8' runs on the CPU only, not on {device} (use bfloat16 there)")
    if kernel == "onednn":
        if torch.device(device).type != "cpu":
            raise ValueError(f"linear_kernel 'onednn' runs on the CPU only, not on {device}")
        if precision == "bfloat16":
            raise ValueError(f"linear_kernel 'onednn' is for float32; precision {precision!r} uses autocast")


def resolve_linear_kernel(kernel: str, device: str | torch.device, precision: str) -> str:
    """The kernel a run uses, ``"onednn"`` or ``"aten"``.

    ``"auto"`` picks oneDNN on an x86-64 CPU in float32 where the op exists, else PyTorch's own;
    ``"onednn"`` asked for where it cannot run is an error, not a silent fallback."""
    check_linear_kernel(kernel, device, precision)
    if kernel == "aten":
        return "aten"
    if kernel == "onednn":
        if not onednn_linear_available():
            raise ValueError("linear_kernel 'onednn': this PyTorch build has no oneDNN linear op")
        return "onednn"
    on_cpu = torch.device(device).type == "cpu"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "onednn" if on_cpu and precision != "bfloat16" and x86 and onednn_linear_available() else "aten"


# Row sizes per power of two that oneDNN is called with (see the module docstring). 8: at most
# 12.5% padding. The probe (3000 random shapes of 1-32 rows x 8-128 tokens) stayed flat at about
# 540 MiB with 8 and about 700 MiB with 16, against 2.6 GiB growing without buckets.
ROW_STEPS = 8


def bucket_rows(m: int, steps: int = ROW_STEPS) -> int:
    """``m`` rounded up to the next of ``steps`` evenly spaced sizes in its power of two
    (``[2**k, 2**(k+1))``); sizes up to ``steps`` stay as they are. So rows 1..4096 map to at most
    8 + 8 x 9 = 80 sizes, and ``m <= bucket_rows(m) < m * (1 + 1 / steps)``."""
    if m <= steps:
        return m
    quantum = 1 << (m.bit_length() - steps.bit_length())  # 2**k / steps for a power-of-two steps
    return -(-m // quantum) * quantum


# oneDNN post-ops the engine uses: attr and algorithm of mkldnn._linear_pointwise. "gelu" with
# algorithm "none" is the exact (erf) GELU of F.gelu, not the tanh approximation.
_POST_OPS = {"none": ("none", ""), "gelu": ("gelu", "none")}


def _onednn_linear(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, post: str = "none") -> torch.Tensor:
    attr, algorithm = _POST_OPS[post]
    return torch.ops.mkldnn._linear_pointwise(rows, w, b, attr, [], algorithm)


def bucketed_onednn_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, post: str = "none"
) -> torch.Tensor:
    """oneDNN's linear over ``x``'s token rows padded to :func:`bucket_rows`; the padding's
    outputs are dropped, so the result is ``F.linear(x, w, b)`` within float32 rounding
    (``post="gelu"``: ``F.gelu(F.linear(x, w, b))``, GELU applied inside the same call)."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    extra = bucket_rows(m) - m
    if extra:  # F.pad copies even when there is nothing to pad
        rows = F.pad(rows, (0, 0, 0, extra))  # zero rows appended
    out = _onednn_linear(rows, w, b, post)
    return out[:m].view(*x.shape[:-1], w.shape[0])


def _plain(t: Any) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


class OneDNNLinear(TorchFunctionMode):
    """Routes eligible float32 CPU ``F.linear`` calls to oneDNN; every other call passes through."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0  # linear calls oneDNN ran (tests and benchmarks read it)
        self.fused_gelu_calls = 0  # those of them with GELU fused (linear_gelu)

    def __enter__(self):
        entered = super().__enter__()
        _active.modes = [*getattr(_active, "modes", ()), self]
        return entered

    def __exit__(self, *exc):
        _active.modes = _active.modes[:-1]
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # nn.Linear's call (F.linear is torch._C._nn.linear)
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            out = self.route(x, w, b)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def route(self, x: Any, w: Any, b: Any, post: str = "none") -> torch.Tensor | None:
        """``post(F.linear(x, w, b))`` through this mode's kernel, or None where it does not apply."""
        if not self._eligible(x, w, b):
            return None
        self.calls += 1
        if post != "none":
            self.fused_gelu_calls += 1
        return bucketed_onednn_linear(x, w, b, post)

    @staticmethod
    def _eligible(x: Any, w: Any, b: Any) -> bool:
        if not (_plain(x) and _plain(w) and (b is None or _plain(b))):
            return False
        if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32:
            return False
        if w.dim() != 2 or x.dim() < 2 or x.shape[-1] != w.shape[1] or w.layout != torch.strided:
            return False
        if b is not None and (b.dtype != torch.float32 or b.shape != (w.shape[0],)):
            return False
        if torch.is_autocast_enabled("cpu"):
            return False
        needs_grad = x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
        return not (torch.is_grad_enabled() and needs_grad)


_active = threading.local()  # the OneDNNLinear modes entered on this thread, innermost last


def unhooked(module: nn.Module) -> bool:
    """Whether ``module`` has no forward hooks, so code may run its steps instead of calling it."""
    return not (module._forward_hooks or module._forward_pre_hooks)


def linear_gelu(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``F.gelu(linear(x))`` with the exact (erf) GELU.

    Inside an active :class:`OneDNNLinear` mode, on inputs it would route to oneDNN anyway, this is
    one oneDNN call that applies GELU to each output tile while it is still in cache (a post-op),
    instead of a second pass over the (rows, 4H) activations: the same values within float32
    rounding. Elsewhere (PyTorch's kernel, bfloat16, GPUs, training, a subclassed or hooked
    module) it is exactly ``F.gelu(linear(x))``.
    """
    modes = getattr(_active, "modes", ())
    if modes and type(linear) is nn.Linear and unhooked(linear):
        out = modes[-1].route(x, linear.weight, linear.bias, post="gelu")
        if out is not None:
            return out
    return F.gelu(linear(x))


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


def linear_kernel_mode(kernel: str, int8: Int8Weights | None = None) -> ContextManager:
    """The context a resolved kernel runs in (see :func:`resolve_linear_kernel`); with ``int8``
    weights (``--precision int8``) those weights' calls run in int8 and the rest on ``kernel``."""
    if kernel not in ("onednn", "aten"):
        raise ValueError(f"resolved linear kernel must be 'onednn' or 'aten', not {kernel!r}")
    if int8 is not None:
        return Int8Linear(int8, onednn=kernel == "onednn")
    return OneDNNLinear() if kernel == "onednn" else contextlib.nullcontext()
