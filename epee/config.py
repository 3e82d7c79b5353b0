"""Frozen, validated configuration records for early-exit models and the engine.

Every config validates itself in ``__post_init__`` and names the offending value in its error, so a
bad option fails when a job starts, not after the first batch of a nightly run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

POLICY_KINDS = ("entropy", "patience", "epee", "none")
TASKS = ("sequence", "relation", "token")
POOLINGS = ("default", "mean")
HEAD_INPUTS = ("layer", "attention")  # EarlyExitConfig.head_input


@dataclass(frozen=True)
class ExitPolicyConfig:
    """When a sample may leave the model (EPEE, arXiv 2503.02053, section 3).

    ``entropy``: exit once the normalised entropy of the exit head is below ``entropy_threshold``.
    ``patience``: exit once the predicted label has stayed the same for ``patience`` consecutive
    layers (PABEE's counter: it grows by one each layer whose argmax equals the previous layer's).
    ``epee``: entropy OR patience, whichever holds first. ``none``: always run to the last layer.
    """

    kind: str = "epee"
    entropy_threshold: float = 0.2  # τ in [0, 1]; higher exits earlier at some cost in accuracy
    patience: int = 2  # P >= 1; lower exits earlier, PABEE found 2-6 safe for BERT-base
    min_exit_layer: int = 1  # no exit before this 1-based layer (except at the last layer)

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"exit policy kind ({self.kind!r}) must be one of {POLICY_KINDS}")
        if not (0.0 <= self.entropy_threshold <= 1.0) or math.isnan(self.entropy_threshold):
            raise ValueError(
                f"entropy_threshold ({self.entropy_threshold}) must lie in [0, 1]: it is compared "
                "with the entropy normalised by log(num_labels)"
            )
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience ({self.patience!r}) must be an integer >= 1")
        if (
            isinstance(self.min_exit_layer, bool)
            or not isinstance(self.min_exit_layer, int)
            or self.min_exit_layer < 1
        ):
            raise ValueError(f"min_exit_layer ({self.min_exit_layer!r}) must be an integer >= 1")

    @property
    def uses_entropy(self) -> bool:
        return self.kind in ("entropy", "epee")

    @property
    def uses_patience(self) -> bool:
        return self.kind in ("patience", "epee")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EarlyExitConfig:
    """What the exit heads predict; stored beside the backbone's own transformers config."""

    task: str  # "sequence" (notes, images), "relation" (marked entity pair) or "token" (event tags)
    label_names: tuple[str, ...]  # one name per class; its length is the number of labels
    policy: ExitPolicyConfig = field(default_factory=ExitPolicyConfig)
    head_dropout: float = 0.1  # dropout before each exit head, active in training only
    negative_label: str | None = None  # relation task: the "no relation" class, left out of micro-F1
    # sequence task: "default" is the family's own pooled vector (BERT/ALBERT [CLS] through the
    # pooler, GPT-2 last token, ViT CLS); "mean" averages the real tokens' states, the pooling that
    # sentence-transformers backbones such as all-MiniLM were trained with.
    pooling: str = "default"
    # soft prompts (text backbones): K learnable vectors in the word-embedding space, placed at
    # input positions prompt_position .. prompt_position + K - 1, which the model directory's
    # preprocessor reserves (after [CLS] for BERT/ALBERT, at the start for GPT-2)
    num_prompts: int = 0
    prompt_position: int = 0
    # what the exit heads after layers 1 .. L-1 read: "layer", each layer's output; "attention",
    # the layer's attention sublayer output before its feed-forward (BERT backbones). A record that
    # exits then never runs its exit layer's feed-forward, about 60% of a MiniLM layer, which
    # matters where the head reads every token (mean pooling, token tasks). The last head always
    # reads the last layer's output, so full depth is the unchanged backbone.
    head_input: str = "layer"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task ({self.task!r}) must be one of {TASKS}")
        object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
        if len(self.label_names) < 2:
            raise ValueError(
                f"an exit head needs at least 2 labels, got {len(self.label_names)}: {self.label_names}"
            )
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label names must be unique, got {self.label_names}")
        if not (0.0 <= self.head_dropout < 1.0):
            raise ValueError(f"head_dropout ({self.head_dropout}) must lie in [0, 1)")
        if isinstance(self.policy, dict):
            object.__setattr__(self, "policy", ExitPolicyConfig(**self.policy))
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling ({self.pooling!r}) must be one of {POOLINGS}")
        if self.pooling != "default" and self.task != "sequence":
            raise ValueError(f"pooling {self.pooling!r} applies to task 'sequence' only, not {self.task!r}")
        if self.head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input ({self.head_input!r}) must be one of {HEAD_INPUTS}")
        for name in ("num_prompts", "prompt_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 0")
        if self.negative_label is not None and self.negative_label not in self.label_names:
            raise ValueError(f"negative_label ({self.negative_label!r}) is not one of the labels {self.label_names}")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "label_names": list(self.label_names),
            "policy": self.policy.to_dict(),
            "head_dropout": self.head_dropout,
            "negative_label": self.negative_label,
            "pooling": self.pooling,
            "num_prompts": self.num_prompts,
            "prompt_position": self.prompt_position,
            "head_input": self.head_input,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EarlyExitConfig":
        known = {"task", "label_names", "policy", "head_dropout", "negative_label", "pooling", "num_prompts",
                 "prompt_position", "head_input"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown early-exit config keys: {sorted(unknown)}")
        return cls(
            task=data["task"],
            label_names=tuple(data["label_names"]),
            policy=ExitPolicyConfig(**data.get("policy", {})),
            head_dropout=float(data.get("head_dropout", 0.1)),
            negative_label=data.get("negative_label"),
            pooling=data.get("pooling", "default"),
            num_prompts=int(data.get("num_prompts", 0)),
            prompt_position=int(data.get("prompt_position", 0)),
            head_input=data.get("head_input", "layer"),
        )


PRECISIONS = ("float32", "bfloat16", "int8")  # EngineConfig.precision
LINEAR_KERNELS = ("auto", "aten", "onednn")  # EngineConfig.linear_kernel (epee.kernels)


@dataclass(frozen=True)
class EngineConfig:
    """How the batched engine schedules work."""

    batch_size: int = 32  # rows per layer call; regrouping keeps calls this full at every depth
    window_size: int = 0  # samples in flight at once (bounds memory); 0 means 16 x batch_size
    sort_by_length: bool = True  # group similar lengths so long notes do not pad short ones
    device: str = "cpu"
    # "bfloat16": layers and heads run under torch.autocast in bfloat16 (exit decisions stay float32).
    # Pays on CPUs with native bf16 (avx512_bf16, AMX) and on GPUs; emulated elsewhere, and slower.
    # "int8" (CPU only): the transformer layers' linear layers as int8 products, weights per output
    # channel, activations per token row, so results do not depend on the batch (epee.kernels);
    # embeddings, attention, exit heads and exit decisions stay float32.
    precision: str = "float32"
    # Kernel of the float32 linear layers on a CPU: "auto" (oneDNN on x86-64 CPUs in float32,
    # PyTorch's elsewhere), "aten" (PyTorch's default, MKL) or "onednn" (an error where it cannot
    # run). See epee.kernels; measured in docs/analyses.md.
    linear_kernel: str = "auto"
    # Run each layer where rows may exit in two steps: first at the positions the exit head reads
    # ([CLS], GPT-2's last token, the entity markers) over every token's keys and values, then the
    # rest of the layer only for the rows that go on. A row pays its exit layer's keys and values,
    # not the whole layer. Same results; not for mean pooling or token tasks, which read every
    # token. False runs every layer whole.
    split_layers: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.split_layers, bool):
            raise ValueError(f"split_layers ({self.split_layers!r}) must be True or False")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision ({self.precision!r}) must be one of {', '.join(PRECISIONS)}")
        from .kernels import check_linear_kernel  # the kernel's device and precision rules live there

        check_linear_kernel(self.linear_kernel, self.device, self.precision)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size ({self.batch_size!r}) must be an integer >= 1")
        if not isinstance(self.window_size, int) or self.window_size < 0:
            raise ValueError(f"window_size ({self.window_size!r}) must be an integer >= 0")
        if self.window_size and self.window_size < self.batch_size:
            raise ValueError(
                f"window_size ({self.window_size}) must be 0 or at least batch_size ({self.batch_size})"
            )

    @property
    def effective_window(self) -> int:
        return self.window_size or 16 * self.batch_size

    @classmethod
    def from_options(cls, options: Any) -> "EngineConfig":
        """From a launcher's parsed options: any object with the pipelines' attributes
        ``engine_batch_size``, ``device``, ``precision``, ``linear_kernel`` and ``whole_layers``
        (Beam's ``EpeeOptions``, an ``argparse.Namespace``); epee itself never imports Beam."""
        return cls(batch_size=options.engine_batch_size, device=options.device, precision=options.precision,
                   linear_kernel=options.linear_kernel, split_layers=not options.whole_layers)
