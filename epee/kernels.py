"""Which CPU kernel runs the float32 linear layers at inference: PyTorch's default or oneDNN.

PyTorch's CPU ``linear`` in float32 calls MKL's ``sgemm``. On the AMD EPYC machines our benchmarks
run on, oneDNN (the library PyTorch already ships for its ``mkldnn`` ops) computes the same float32
products about 25% faster for MiniLM's shapes (32 x 125 tokens by 384 -> 1536: 23.6 ms against
32.1 ms; ``bench.kernels`` measures any machine), and linear layers are three quarters of the
engine's time. ``linear_kernel="onednn"`` (``--linear_kernel onednn``) routes them there:

- on a CPU, in float32, outside autocast (``--precision bfloat16`` is refused with it);
- at inference only: a call that needs gradients keeps PyTorch's ``linear`` (training is untouched);
- plain dense weights only (2:4 semi-structured tensors and other subclasses keep theirs).

It is a :class:`torch.overrides.TorchFunctionMode`, active only inside the engine's and
calibration's loops: no module is modified, nothing is saved differently, and the products are
float32 ones, equal to PyTorch's within float32 rounding (about 3e-6 on MiniLM's activations).

**It is not the default.** The process's memory grows with every new input shape oneDNN sees
(a probe over 2000 random batch shapes: 2.2 GiB, 0.7 GiB after ``malloc_trim``; with PyTorch's
kernel 0.3 GiB; two shapes repeated stay flat), and the engine's batch shapes vary with note
lengths and exits. Until that is bounded, a nightly job's memory would not stay flat
(``docs/analyses.md``). Default: ``"aten"``, PyTorch's own kernel.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
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
    if kernel == "onednn":
        if torch.device(device).type != "cpu":
            raise ValueError(f"linear_kernel 'onednn' runs on the CPU only, not on {device}")
        if precision != "float32":
            raise ValueError(f"linear_kernel 'onednn' is for float32; precision {precision!r} uses autocast")


def resolve_linear_kernel(kernel: str, device: str | torch.device, precision: str) -> str:
    """The kernel a run uses, ``"onednn"`` or ``"aten"``: the one asked for, checked. ``"onednn"``
    asked for where it cannot run is an error, not a silent fallback."""
    check_linear_kernel(kernel, device, precision)
    if kernel == "onednn" and not onednn_linear_available():
        raise ValueError("linear_kernel 'onednn': this PyTorch build has no oneDNN linear op")
    return kernel


def _plain(t: Any) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


class OneDNNLinear(TorchFunctionMode):
    """Routes eligible float32 CPU ``F.linear`` calls to oneDNN; every other call passes through."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0  # linear calls oneDNN ran (tests and benchmarks read it)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # nn.Linear's call (F.linear is torch._C._nn.linear)
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if self._eligible(x, w, b):
                self.calls += 1
                return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return func(*args, **kwargs)

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


def linear_kernel_mode(kernel: str) -> ContextManager:
    """The context a resolved kernel runs in (see :func:`resolve_linear_kernel`)."""
    if kernel == "onednn":
        return OneDNNLinear()
    if kernel == "aten":
        return contextlib.nullcontext()
    raise ValueError(f"resolved linear kernel must be 'onednn' or 'aten', not {kernel!r}")
