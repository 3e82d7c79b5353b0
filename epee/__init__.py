"""epee: entropy- and patience-based early exit (EPEE, arXiv 2503.02053) with a batched engine.

Pure torch + transformers; the Beam side lives in ``transforms/``.
"""

from .config import EarlyExitConfig, EngineConfig, ExitPolicyConfig
from .engine import EarlyExitEngine, EngineStats, ExitPrediction, RunResult
from .inputs import Batch, EncodedSample, collate
from .modeling import AllLayerOutput, EarlyExitModel
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
    "RunResult",
    "ScheduledExit",
    "collate",
    "exit_signal",
    "normalised_entropy",
    "run_reference",
]
