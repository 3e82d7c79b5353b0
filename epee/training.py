"""Fine-tune a backbone and all its exit heads together (PABEE/EPEE weighted loss).

The loss of exit head i (1-based) is weighted by i and the weights are normalised to sum to 1
(PABEE, Zhou et al. 2020, eq. 6; EPEE trains the same way), so deep heads, which see the most
computation, count most while every head learns. Training is seeded, checkpoints after every
epoch and every ``checkpoint_every`` steps (safetensors plus a JSON state, no pickle), and
resumes from the last checkpoint with the same data order it would have had without the stop.

The loss is :mod:`epee.losses`; fitting heads as probes on a frozen backbone is :mod:`epee.probes`.
Both stay importable from here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .inputs import Batch, EncodedSample, collate
from .losses import layer_weights, stack_targets, weighted_exit_loss
from .modeling import EarlyExitModel
from .probes import LOW_PRECISION_SPREAD, feature_spread, fit_heads_as_probes

__all__ = [
    "LOW_PRECISION_SPREAD", "EpochRecord", "TrainConfig", "TrainHistory", "feature_spread", "fit_heads_as_probes",
    "full_depth_logits", "layer_weights", "predict_all_layers", "stack_targets", "train", "weighted_exit_loss",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 5e-5  # backbone; pretrained weights want a small step
    head_learning_rate: float = 1e-3  # fresh exit heads learn faster
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06  # share of all steps with a linear warm-up
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (also one after each epoch)
    eval_batch_size: int = 64
    # weight of self-distillation: each earlier exit head also learns the last head's (detached)
    # distribution, so early heads agree with full depth more often; 0 = labels only
    distill_weight: float = 0.0
    # weight of distillation from a teacher (``epee sparsify --teacher-distill``: the dense model the
    # sparse one starts from): every exit head also learns the teacher's full-depth distribution,
    # softened by ``teacher_temperature``; 0 = none
    teacher_weight: float = 0.0
    teacher_temperature: float = 2.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
        for name in ("learning_rate", "head_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio ({self.warmup_ratio}) must lie in [0, 1)")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight ({self.distill_weight}) must lie in [0, 1]")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError(f"teacher_weight ({self.teacher_weight}) must lie in [0, 1]")
        if not self.teacher_temperature > 0:
            raise ValueError(f"teacher_temperature ({self.teacher_temperature}) must be > 0")


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    dev_scores_per_layer: list[float]  # the task's primary metric for each exit head


@dataclass
class TrainHistory:
    metric: str
    epochs: list[EpochRecord] = field(default_factory=list)
    resumed_from_step: int = 0

    def to_dict(self) -> dict:
        return {"metric": self.metric, "resumed_from_step": self.resumed_from_step, "epochs": [asdict(e) for e in self.epochs]}



def _epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort inside pools of 50 batches, shuffle
    the batches. Deterministic in (seed, epoch), which is what makes resuming exact."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _length_sorted_batches(
    model: EarlyExitModel, samples: Sequence[EncodedSample], batch_size: int, device: str | torch.device
) -> Iterator[tuple[list[int], Batch]]:
    """(sample indices, collated batch on ``device``), batches of similar lengths (little padding)."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].length)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, collate([samples[i] for i in idx], model.adapter.pad_token_id).to(device)


def predict_all_layers(
    model: EarlyExitModel, samples: Sequence[EncodedSample], batch_size: int, device: torch.device
) -> list[list]:
    """Per layer, per sample: argmax class (or the tag ids over the sample's tokens)."""
    model.eval()
    slots: list[list] = [[None] * len(samples) for _ in range(model.num_layers)]
    with torch.inference_mode():
        for idx, batch in _length_sorted_batches(model, samples, batch_size, device):
            for layer, lg in enumerate(model(batch).logits):
                pred = lg.argmax(dim=-1).cpu()
                for j, i in enumerate(idx):
                    if pred.dim() == 2:
                        k = samples[i].length
                        slots[layer][i] = pred[j, :k].tolist()
                    else:
                        slots[layer][i] = int(pred[j])
    return slots


def full_depth_logits(
    model: EarlyExitModel, samples: Sequence[EncodedSample], batch_size: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(N, C) float32 logits of the last exit head, in the samples' order (sequence-level tasks):
    the teacher's targets for ``train(..., teacher_logits=...)``."""
    model.eval()
    model.to(device)
    out: list[torch.Tensor | None] = [None] * len(samples)
    with torch.inference_mode():
        for idx, batch in _length_sorted_batches(model, samples, batch_size, device):
            last = model(batch).logits[-1]
            if last.dim() != 2:
                raise ValueError("teacher logits are for sequence-level tasks (classification, relation, image), "
                                 "not token tagging")
            for j, i in enumerate(idx):
                out[i] = last[j].float().cpu()
    return torch.stack(out) if out else torch.empty(0)


def _save_checkpoint(path: Path, model: EarlyExitModel, opt: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    opt_state = opt.state_dict()
    tensors = {}
    for pid, pstate in opt_state["state"].items():
        for key, value in pstate.items():
            tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu() if torch.is_tensor(value) else torch.tensor(value)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {**state, "param_groups": opt_state["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    # The previous checkpoint is moved aside, not removed, before the new one takes its name: a kill at any point
    # leaves a complete checkpoint at `path` or at `path.old` (`_resumable_checkpoint` picks it up).
    old = _previous(path)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _resumable_checkpoint(path: Path) -> Path | None:
    """The complete checkpoint to resume from: `path`, or the previous one a kill mid-save left at `path.old`."""
    for candidate in (path, _previous(path)):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def _load_checkpoint(path: Path, model: EarlyExitModel, opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    flat = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for key, value in flat.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state


def train(
    model: EarlyExitModel,
    train_samples: Sequence[EncodedSample],
    train_targets: Sequence[int | torch.Tensor],
    dev_samples: Sequence[EncodedSample],
    dev_targets: Sequence[int | torch.Tensor],
    score_fn: Callable[[list, list], float],
    config: TrainConfig,
    checkpoint_dir: str | os.PathLike | None = None,
    metric: str = "score",
    device: str = "cpu",
    progress: bool = True,
    stop_after_steps: int | None = None,
    step_hook: Callable[[int], None] | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> TrainHistory:
    """Train in place. ``score_fn(gold, predictions)`` scores one layer's dev predictions.

    ``stop_after_steps`` ends the run early (after checkpointing), as an interruption would;
    calling ``train`` again with the same ``checkpoint_dir`` resumes where it stopped.
    ``step_hook(step)`` runs after every optimiser step (sparse training re-applies its masks
    there). Parameters with ``requires_grad`` False (a frozen backbone) are not trained; soft
    prompts learn at the exit heads' rate, as new parameters. ``teacher_logits`` (N, C), one row
    per training sample, are the teacher's targets when ``config.teacher_weight`` > 0.
    """
    from tqdm.auto import tqdm

    if len(train_samples) != len(train_targets) or len(dev_samples) != len(dev_targets):
        raise ValueError("samples and targets differ in length")
    if not train_samples:
        raise ValueError("no training examples")
    if config.teacher_weight > 0:
        if teacher_logits is None or teacher_logits.dim() != 2 or teacher_logits.shape[0] != len(train_samples):
            got = None if teacher_logits is None else tuple(teacher_logits.shape)
            raise ValueError(f"teacher_weight > 0 needs teacher_logits with one row per training sample "
                             f"({len(train_samples)}); got {got}")
    dev_gold = [t.tolist() if torch.is_tensor(t) else t for t in dev_targets]
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    model.to(dev)

    head_params = [p for p in model.exit_heads.parameters() if p.requires_grad]
    if model.prompts is not None and model.prompts.requires_grad:
        head_params.append(model.prompts)
    head_ids = {id(p) for p in head_params}
    backbone_params = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    groups = [
        {"params": backbone_params, "lr": config.learning_rate, "base_lr": config.learning_rate},
        {"params": head_params, "lr": config.head_learning_rate, "base_lr": config.head_learning_rate},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)
    lengths = [s.length for s in train_samples]
    steps_per_epoch = math.ceil(len(train_samples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_ratio * total_steps)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    history = TrainHistory(metric=metric)
    start_epoch, start_batch, global_step, running = 0, 0, 0, 0.0
    ckpt = Path(checkpoint_dir) / "checkpoint" if checkpoint_dir else None
    fingerprint = {"n_train": len(train_samples), "config": asdict(config), "num_layers": model.num_layers}
    resume_from = _resumable_checkpoint(ckpt) if ckpt else None
    if resume_from:
        state = _load_checkpoint(resume_from, model, opt)
        if state.get("fingerprint") != fingerprint:
            raise ValueError(
                f"checkpoint in {resume_from} was made with other data or settings; remove it or use another output"
            )
        start_epoch, start_batch, global_step = state["epoch"], state["batch"], state["global_step"]
        running = state.get("running_loss", 0.0)
        history = TrainHistory(metric=metric, epochs=[EpochRecord(**e) for e in state["history"]], resumed_from_step=global_step)
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        log.info("resuming from step %d (epoch %d, batch %d)", global_step, start_epoch + 1, start_batch)

    def checkpoint(epoch: int, batch: int, running_loss: float) -> None:
        if ckpt:
            _save_checkpoint(ckpt, model, opt, {
                "epoch": epoch, "batch": batch, "global_step": global_step, "running_loss": running_loss,
                "history": [asdict(e) for e in history.epochs], "fingerprint": fingerprint,
                "torch_rng": torch.get_rng_state().tolist(),
            })

    for epoch in range(start_epoch, config.epochs):
        batches = _epoch_batches(lengths, config.batch_size, config.seed, epoch)
        first = start_batch if epoch == start_epoch else 0
        if first == 0:
            running = 0.0
        model.train()
        bar = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for b in range(first, len(batches)):
            idx = batches[b]
            batch = collate([train_samples[i] for i in idx], model.adapter.pad_token_id).to(dev)
            targets = stack_targets([train_targets[i] for i in idx], batch.input_ids.shape[1] if batch.input_ids is not None else None).to(dev)
            teacher = {}
            if config.teacher_weight > 0:
                teacher = {"teacher": teacher_logits[idx].to(dev), "teacher_weight": config.teacher_weight,
                           "temperature": config.teacher_temperature}
            loss = weighted_exit_loss(model(batch).logits, targets, config.distill_weight, **teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            factor = lr_factor(global_step)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            opt.step()
            global_step += 1
            if step_hook is not None:
                step_hook(global_step)
            running += float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{running / (b + 1):.4f}")
            if global_step % config.checkpoint_every == 0 and b + 1 < len(batches):
                checkpoint(epoch, b + 1, running)
            if stop_after_steps is not None and global_step >= stop_after_steps:
                bar.close()
                checkpoint(epoch, b + 1, running)
                return history
        bar.close()
        preds = predict_all_layers(model, dev_samples, config.eval_batch_size, dev) if dev_samples else []
        scores = [float(score_fn(dev_gold, p)) for p in preds]
        history.epochs.append(EpochRecord(epoch=epoch + 1, train_loss=running / len(batches), dev_scores_per_layer=scores))
        log.info(
            "epoch %d/%d: train loss %.4f; dev %s per layer: %s",
            epoch + 1, config.epochs, running / len(batches), metric, " ".join(f"{s:.3f}" for s in scores),
        )
        checkpoint(epoch + 1, 0, 0.0)
        model.train()
    model.eval()
    return history
