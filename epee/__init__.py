"""epee: entropy- and patience-based early exit (EPEE, arXiv 2503.02053) with a batched engine.

Pure torch + transformers; the Beam side lives in ``transforms/``.
"""

from .config import EarlyExitConfig, EngineConfig, ExitPolicyConfig
from .engine import EarlyExitEngine, EngineStats, ExitPrediction, RunResult
from .inputs import Batch, EncodedSample, collate
from .modeling import AllLayerOutput, EarlyExitModel, PickleWeightsRefused
from .policies import ExitPolicy, ScheduledExit, exit_signal, normalised_entropy
from .reference import run_reference

__all__ = [
    "AllLayerOutput",
    "Batch",
    "EarlyExitConfig",
    "EarlyExitEngine",
    "EarlyExitModel",
    "EncodedSample",
    "EngineConfig",
    "EngineStats",
    "ExitPolicy",
    "ExitPolicyConfig",
    "ExitPrediction",
    "PickleWeightsRefused",
    "RunResult",
    "ScheduledExit",
    "collate",
    "exit_signal",
    "normalised_entropy",
    "run_reference",
]

# Offline calibration of τ and P on a dev set, and the task metrics it ranks settings by.
from .calibration import (  # noqa: E402
    LayerOutputs,
    SimulatedRun,
    RobustChoice,
    SweepPoint,
    choose,
    choose_robust,
    collect_layer_outputs,
    frontier,
    simulate,
    sweep,
)
from .metrics import primary_metric, task_scores  # noqa: E402

__all__ += [
    "LayerOutputs",
    "SimulatedRun",
    "RobustChoice",
    "SweepPoint",
    "choose",
    "choose_robust",
    "collect_layer_outputs",
    "frontier",
    "primary_metric",
    "simulate",
    "sweep",
    "task_scores",
]

# Image loading and preprocessing (PNG, .npy, DICOM) into normalised (C, H, W) pixel_values.
from .images import ImageSettings, dicom_to_array, load_image_file, read_dicom, read_png  # noqa: E402

__all__ += ["ImageSettings", "dicom_to_array", "load_image_file", "read_dicom", "read_png"]
