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

BERT's up-projection and its GELU are one oneDNN call (:func:`gelu_feed_forward`, run by
``BertAdapter`` where :func:`fusable_gelu_ffn` allows): GELU is applied to each output tile as a post-op instead of a second pass
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

**int8** (``--precision int8``, CPU only): :mod:`epee.int8`, entered through
:func:`linear_kernel_mode` too; its names are importable from here as well.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import threading
from typing import TYPE_CHECKING, Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.activations import GELUActivation
from transformers.models.bert.modeling_bert import BertIntermediate, BertLayer

from .config import LINEAR_KERNELS

if TYPE_CHECKING:
    from .int8 import Int8Weights


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


def fusable_gelu_ffn(layer: nn.Module) -> bool:
    """Whether a BERT layer is the stock encoder layer whose feed-forward block is
    ``output(F.gelu(intermediate.dense(x)), x)`` (``hidden_act="gelu"``), unhooked: then
    :func:`gelu_feed_forward` may run it. Other activations, decoders with cross-attention and
    modified layers run their own forward."""
    inter = getattr(layer, "intermediate", None)
    return (
        type(layer) is BertLayer
        and type(inter) is BertIntermediate
        and type(inter.intermediate_act_fn) is GELUActivation
        and getattr(inter.intermediate_act_fn, "act", None) is F.gelu
        and not getattr(layer, "add_cross_attention", False)
        and unhooked(layer)
        and unhooked(inter)
    )


def gelu_feed_forward(layer: nn.Module, attention: torch.Tensor) -> torch.Tensor:
    """A :func:`fusable_gelu_ffn` BERT layer's feed-forward block on its attention output, the
    up-projection and its GELU as one call (:func:`linear_gelu`: fused by oneDNN where a mode
    routes there, else the same ops as the stock block)."""
    return layer.output(linear_gelu(attention, layer.intermediate.dense), attention)


def linear_kernel_mode(kernel: str, int8: "Int8Weights | None" = None) -> ContextManager:
    """The context a resolved kernel runs in (see :func:`resolve_linear_kernel`); with ``int8``
    weights (``--precision int8``) those weights' calls run in int8 and the rest on ``kernel``."""
    if kernel not in ("onednn", "aten"):
        raise ValueError(f"resolved linear kernel must be 'onednn' or 'aten', not {kernel!r}")
    if int8 is not None:
        from .int8 import Int8Linear

        return Int8Linear(int8, onednn=kernel == "onednn")
    return OneDNNLinear() if kernel == "onednn" else contextlib.nullcontext()


_INT8_NAMES = ("Int8Linear", "Int8Weights", "int8_linear", "int8_matmul_available", "quantize_rows")


def __getattr__(name: str) -> Any:
    """The int8 kernel's names, importable from here as before they moved to :mod:`epee.int8`."""
    if name in _INT8_NAMES:
        from . import int8

        return getattr(int8, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
