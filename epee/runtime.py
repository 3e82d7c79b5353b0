"""How a model's arithmetic runs: precision, linear kernel, int8 weights and 2:4 sparse kernels.

A :class:`Runtime` is decided once per model and :class:`~epee.config.EngineConfig`, where the
model is loaded (after any pruning): the engine and calibration both run the model inside its
:meth:`Runtime.context`, so calibration sees the arithmetic the pipeline runs with. Building one
quantises the layers' weights in int8 (tens of milliseconds on MiniLM), which is why a worker
builds it once, not per batch.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .config import EngineConfig
from .int8 import Int8Weights
from .kernels import linear_kernel_mode, resolve_linear_kernel
from .modeling import precision_autocast

log = logging.getLogger(__name__)


class Runtime:
    """The arithmetic one model runs with.

    ``precision``: "bfloat16" runs under ``torch.autocast``; "int8" routes the layers' linear
    products through int8 copies of their weights (quantised here, once). ``linear_kernel``: the
    float32 CPU kernel, resolved here ("auto" becomes "onednn" or "aten"; an "onednn" this PyTorch
    cannot run is an error now, not in the first batch)."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "float32",
                 linear_kernel: str = "auto") -> None:
        self.device = torch.device(device)
        precision_autocast(self.device, precision)  # refuses an unknown precision
        self.precision = precision
        # "onednn" or "aten": the float32 CPU linear kernel of every run (epee.kernels)
        self.linear_kernel = resolve_linear_kernel(linear_kernel, self.device, precision)
        # --precision int8: the layers' weights quantised once, here (after any pruning)
        self.int8 = Int8Weights.for_model(model) if precision == "int8" else None

    @classmethod
    def from_config(cls, model: nn.Module, config: EngineConfig) -> "Runtime":
        return cls(model, config.device, config.precision, config.linear_kernel)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Inference mode, autocast and the linear kernel: what every forward pass runs inside
        (a new context each time, so threads sharing one runtime do not share its state)."""
        with torch.inference_mode(), precision_autocast(self.device, self.precision), \
                linear_kernel_mode(self.linear_kernel, self.int8):
            yield


def sparse_kernels(model: nn.Module, sparsity: Mapping[str, Any] | None, device: str) -> dict[str, Any] | str | None:
    """Put a 2:4-sparse model on PyTorch's semi-structured kernels where the device has sparse
    tensor cores: the model becomes float16 and its pruned linear layers semi-structured tensors.
    Call before building a :class:`Runtime` or an engine (they count and quantise the weights as
    they are then).

    ``sparsity`` is the model directory's ``sparsity`` section. Returns None where the model is
    not 2:4-sparse (or its masks were released), the reason it stays dense (a string) where the
    device cannot, else the conversion's report (``converted``, ``skipped``)."""
    from .sparsity import convert_semi_structured, semi_structured_support

    sparsity = sparsity or {}
    if (sparsity.get("config") or {}).get("pattern") != "2:4" or (sparsity.get("masks") or {}).get("released"):
        return None
    why = semi_structured_support(device)
    if why:
        return why
    model.half()
    return convert_semi_structured(model)
