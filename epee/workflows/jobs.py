"""What each workflow is asked to do: frozen dataclasses, validated when built, with messages
that name the bad value (and the `epee` flag that sets it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import LINEAR_KERNELS, PRECISIONS
from .data import DATA_TASKS, DataFields, DataSpec

ARCHITECTURES = ("bert", "albert", "gpt2", "vit")
POLICY_KINDS = ("entropy", "patience", "epee", "none")
CALIBRATION_RULES = ("bootstrap", "ltt")


def _at_least(owner: str, low: int, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value < low:
            raise ValueError(f"{owner}: {name} ({value}) must be >= {low} (--{name.replace('_', '-')})")


def _one_of(owner: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} ({value!r}) must be one of {list(choices)}")


def _prompts_for_frozen(freeze_backbone: bool, num_prompts: int) -> None:
    if freeze_backbone and not num_prompts:
        raise ValueError("--freeze-backbone trains only the exit heads and the soft prompts: give --num-prompts")


@dataclass(frozen=True)
class TrainJob:
    """`epee train`: fine-tune a backbone (or one built from a config) with an exit head per layer."""

    task: str  # "sequence", "relation", "token" or "image"
    train: str  # training data: file, DDI directory or .npz (local, s3://, gs://)
    output: str  # model directory to write (also holds the resume checkpoint)
    dev: str | None = None  # dev data; else fields.dev_fraction carves it out of ``train``
    dev_npz_split: str | None = None  # npz dev file: array prefix, e.g. "val"
    backbone: str | None = None  # pretrained transformers directory (BERT, ALBERT, GPT-2, ViT)
    architecture: str | None = None  # or train from scratch: "bert", "albert", "gpt2", "vit"
    backbone_config: str | None = None  # JSON (or a JSON file) of config values for ``architecture``
    tokenizer: str | None = None  # tokenizer directory (text tasks from scratch)
    allow_pickle_weights: bool = False  # let ``backbone`` load pytorch_model.bin
    image_size: int = 28  # vit from scratch: input side in pixels
    channels: int = 1  # vit from scratch: 1 or 3
    mean: tuple[float, ...] | None = None  # image normalisation mean per channel (default 0.5)
    std: tuple[float, ...] | None = None  # image normalisation std per channel (default 0.5)
    fields: DataFields = DataFields()
    negative_label: str | None = None  # relation task: the no-relation class
    max_length: int = 256  # tokens per input
    pooling: str = "default"  # sequence/image head input: the family's pooled vector, or "mean" of real tokens
    head_input: str = "layer"  # what heads 1..L-1 read: each layer's output, or (bert) its "attention" sublayer's
    epochs: int = 3
    batch_size: int = 16
    lr: float = 5e-5  # backbone learning rate
    head_lr: float = 1e-3  # exit heads (and soft prompts)
    distill: float = 0.0  # self-distillation weight in [0, 1]
    seed: int = 42
    max_train: int | None = None  # subsample training examples (seeded)
    max_dev: int | None = None  # subsample dev examples (seeded)
    negative_ratio: float | None = None  # relation task: keep at most R negatives per positive
    checkpoint_every: int = 200
    # tests only: stop after this many steps, as an interruption would (the checkpoint stays to resume from)
    stop_after_steps: int | None = None
    num_prompts: int = 0  # soft prompt vectors to learn (text models)
    freeze_backbone: bool = False  # with num_prompts: train only prompts and exit heads
    tau: float = 0.2  # entropy threshold until calibrated
    patience: int = 2  # patience until calibrated
    device: str = "cpu"
    progress: bool = True  # progress bar

    def __post_init__(self) -> None:
        _one_of("TrainJob", "task", self.task, DATA_TASKS)
        if not self.backbone and not self.architecture:
            raise ValueError("give --backbone DIR (pretrained) or --architecture NAME (from scratch)")
        if self.architecture is not None:
            _one_of("TrainJob", "architecture", self.architecture, ARCHITECTURES)
        if self.task != "image" and not (self.tokenizer or self.backbone):
            raise ValueError("text tasks trained from scratch need --tokenizer DIR")
        _one_of("TrainJob", "channels", self.channels, (1, 3))
        _one_of("TrainJob", "pooling", self.pooling, ("default", "mean"))
        _one_of("TrainJob", "head_input", self.head_input, ("layer", "attention"))
        _at_least("TrainJob", 0, num_prompts=self.num_prompts, epochs=self.epochs)
        _at_least("TrainJob", 1, max_length=self.max_length, image_size=self.image_size)
        _prompts_for_frozen(self.freeze_backbone, self.num_prompts)


@dataclass(frozen=True)
class CalibrationSpec:
    """`epee calibrate`: sweep τ and P on a dev set, keep the fastest setting within tolerance; or,
    with ``unlabeled``, on a sample of the archive it will run on, without labels (epee.ltt)."""

    data: DataSpec = DataSpec()
    tolerance: float = 1.0  # score points below full depth allowed (1.0 = 1 point)
    confidence: float = 0.9  # bootstrap confidence of the drop staying within tolerance; 0: point estimate
    resamples: int = 200  # bootstrap resamples for ``confidence``
    min_exit_layer: int = 1
    batch_size: int = 64
    precision: str = "float32"  # the precision the pipelines will run in
    linear_kernel: str = "auto"
    allow_pickle_weights: bool = False
    rule: str = "bootstrap"  # labelled data: "bootstrap" (paired bootstrap, or the point estimate) or "ltt"
    # label-free calibration on the target archive (epee.ltt): agreement with full depth >= 1 - ε at 1 - δ
    unlabeled: str | None = None  # records to sample: file, glob pattern or directory (local, s3://, gs://)
    sample: int = 2000  # records drawn from ``unlabeled``, keyed by a hash of the record id
    epsilon: float = 0.02  # disagreement with full depth allowed (a fraction of records)
    delta: float = 0.1  # chance allowed that the chosen setting's true disagreement exceeds ε
    seed: int = 13  # key of the sample (and of its learn/test halves)
    s3_endpoint_url: str | None = None  # s3:// archives on an S3-compatible store (MinIO, Ceph); else boto3's settings

    def __post_init__(self) -> None:
        _one_of("CalibrationSpec", "rule", self.rule, CALIBRATION_RULES)
        if not 0.0 < self.epsilon < 1.0 or not 0.0 < self.delta < 1.0:
            raise ValueError(f"--epsilon and --delta must lie in (0, 1) (got epsilon {self.epsilon}, delta {self.delta})")
        _at_least("CalibrationSpec", 1, sample=self.sample)
        if self.unlabeled and self.data.data:
            raise ValueError("give --data (labelled dev data) or --unlabeled PATTERN (the archive's own records), not both")
        if self.rule == "ltt" and not 0.0 < self.confidence < 1.0:
            raise ValueError(f"--rule ltt tests at confidence --confidence in (0, 1) (got {self.confidence})")
        if not 0.0 <= self.confidence < 1.0 or self.resamples < 1:
            raise ValueError(f"--confidence must be in [0, 1) and --resamples >= 1 (got confidence {self.confidence}, "
                             f"resamples {self.resamples})")
        if self.tolerance < 0:
            raise ValueError(f"tolerance ({self.tolerance}) must be >= 0 score points")
        _at_least("CalibrationSpec", 1, min_exit_layer=self.min_exit_layer, batch_size=self.batch_size)
        _one_of("CalibrationSpec", "precision", self.precision, PRECISIONS)
        _one_of("CalibrationSpec", "linear_kernel", self.linear_kernel, LINEAR_KERNELS)


@dataclass(frozen=True)
class EvaluateSpec:
    """`epee evaluate`: score a model directory on labelled data with its stored (or another) policy."""

    data: DataSpec = DataSpec()
    batch_size: int = 32
    policy: str | None = None  # override the stored policy's kind
    tau: float | None = None  # with ``policy``: its entropy threshold (default: the stored one)
    patience: int | None = None  # with ``policy``: its patience (default: the stored one)
    precision: str = "float32"
    linear_kernel: str = "auto"
    whole_layers: bool = False  # every layer whole, never at the exit heads' positions first
    allow_pickle_weights: bool = False

    def __post_init__(self) -> None:
        if self.policy is not None:
            _one_of("EvaluateSpec", "policy", self.policy, POLICY_KINDS)
        _at_least("EvaluateSpec", 1, batch_size=self.batch_size)
        _one_of("EvaluateSpec", "precision", self.precision, PRECISIONS)
        _one_of("EvaluateSpec", "linear_kernel", self.linear_kernel, LINEAR_KERNELS)


@dataclass(frozen=True)
class SparsifyJob:
    """`epee sparsify`: prune a trained model directory, train sparse, optionally fine-tune dense
    (MediSwift's recipe), optionally with soft prompts and distillation from the dense model."""

    model: str  # trained model directory (local, s3:// or gs://)
    output: str  # new model directory
    sparsity: float  # share of transformer linear weights set to zero; 0 = none
    scope: str = "global"  # one magnitude threshold for all ("global"), or per matrix ("layer")
    pattern: str = "unstructured"  # or "2:4" (needs sparsity 0.5)
    gradual_steps: int = 0  # raise sparsity gradually (cubic) over this many steps
    epochs: int = 1  # epochs of sparse training (masks enforced); 0 = prune only
    dense_epochs: int = 0  # then epochs of dense fine-tuning (masks released)
    sparse_output: str | None = None  # with dense_epochs: also save the model as it was after sparse training
    num_prompts: int = 0
    freeze_backbone: bool = False
    teacher_distill: float = 0.0  # weight in [0, 1] of distillation from the dense model
    teacher_temperature: float = 2.0
    train: str | None = None  # default: the data recorded at training
    dev: str | None = None  # default: the dev set recorded at training
    max_train: int | None = None  # default: as recorded
    max_dev: int | None = None
    batch_size: int = 16
    lr: float = 5e-5
    head_lr: float = 1e-3
    seed: int = 42
    device: str = "cpu"
    progress: bool = True
    fields: DataFields = DataFields()
    allow_pickle_weights: bool = False
    sparsity_config: object = field(init=False, repr=False, compare=False)  # SparsityConfig

    def __post_init__(self) -> None:
        from ..sparsity import SparsityConfig
        from ..training import TrainConfig

        _at_least("SparsifyJob", 0, epochs=self.epochs, dense_epochs=self.dense_epochs, num_prompts=self.num_prompts)
        object.__setattr__(self, "sparsity_config", SparsityConfig(
            sparsity=self.sparsity, scope=self.scope, pattern=self.pattern, gradual_steps=self.gradual_steps))
        _prompts_for_frozen(self.freeze_backbone, self.num_prompts)
        try:  # the teacher's settings by TrainConfig's own rules, before loading anything
            TrainConfig(teacher_weight=self.teacher_distill, teacher_temperature=self.teacher_temperature)
        except ValueError as exc:
            raise ValueError(f"--teacher-distill, --teacher-temperature: {exc}") from None
