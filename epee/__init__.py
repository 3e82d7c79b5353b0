"""epee: entropy- and patience-based early exit (EPEE, arXiv 2503.02053) with a batched engine.

Pure torch + transformers; the Beam side lives in ``transforms/``.

The public names below are imported on first use (PEP 562), so that ``import epee.images`` in the
DICOM decoder process costs pydicom and numpy, not torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # the engine, its configs and inputs
    "EarlyExitConfig": "config",
    "EngineConfig": "config",
    "ExitPolicyConfig": "config",
    "EarlyExitEngine": "engine",
    "EngineStats": "engine",
    "ExitPrediction": "engine",
    "RunResult": "engine",
    "Batch": "inputs",
    "EncodedSample": "inputs",
    "collate": "inputs",
    "AllLayerOutput": "modeling",
    "EarlyExitModel": "modeling",
    "PickleWeightsRefused": "modeling",
    "ExitPolicy": "policies",
    "ScheduledExit": "policies",
    "exit_signal": "policies",
    "normalised_entropy": "policies",
    "run_reference": "reference",
    # offline calibration of τ and P on a dev set, and the task metrics it ranks settings by
    "LayerOutputs": "calibration",
    "SimulatedRun": "calibration",
    "RobustChoice": "calibration",
    "SweepPoint": "calibration",
    "choose": "calibration",
    "choose_robust": "calibration",
    "collect_layer_outputs": "calibration",
    "frontier": "calibration",
    "simulate": "calibration",
    "sweep": "calibration",
    "primary_metric": "metrics",
    "task_scores": "metrics",
    # image loading and preprocessing (PNG, .npy, DICOM) into normalised (C, H, W) pixel_values
    "ImageSettings": "images",
    "dicom_to_array": "images",
    "load_image_file": "images",
    "read_dicom": "images",
    "read_png": "images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'epee' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
