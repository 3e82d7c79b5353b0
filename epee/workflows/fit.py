"""The workflows that write a model directory: :func:`train` and :func:`sparsify`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import DataSource, dev_source, encode_all, load, load_source, model_task, score_function
from .jobs import SparsifyJob, TrainJob

log = logging.getLogger("epee")


@dataclass(frozen=True)
class TrainResult:
    """A trained model directory (``None`` if training stopped early, as asked) and its summary."""

    model_dir: str | None
    summary: dict[str, Any]  # what `epee train` / `epee sparsify` print


def _train_and_dev(train_uri: str, source: DataSource, task: str, fields: dict, neg: str | None) -> tuple[list, list]:
    train_ex = load(train_uri, task, fields, neg)
    if source.part == "dev" and source.uri == train_uri:  # a dev_fraction split of the training data
        from ..data import split_examples

        return split_examples(train_ex, fields["dev_fraction"], fields["split_seed"])
    return train_ex, load_source(source, task, fields, neg)


def train(job: TrainJob) -> TrainResult:
    import torch

    from ..config import EarlyExitConfig, ExitPolicyConfig
    from ..data import iter_labels, subsample
    from ..encoding import ImagePreprocessor, TextPreprocessor, TextSettings, bio_label_names
    from ..modeldir import save_model_dir
    from ..modeling import EarlyExitModel
    from ..training import TrainConfig
    from ..training import train as fit

    task, neg = job.task, job.negative_label
    fields = job.fields.resolve()
    source = dev_source(fields, data=job.dev, npz_split=job.dev_npz_split, train=job.train,
                        missing="give --dev FILE or --dev-fraction F")
    train_ex, dev_ex = _train_and_dev(job.train, source, task, fields, neg)
    n_train_all, n_dev_all = len(train_ex), len(dev_ex)
    relation = task == "relation"
    train_ex = subsample(train_ex, job.max_train, job.seed, neg if relation else None,
                         job.negative_ratio if relation else None)
    dev_ex = subsample(dev_ex, job.max_dev, job.seed)

    if task == "token":
        label_names = bio_label_names([s[0] for ex in train_ex for s in (ex.spans or ())])
    else:
        names = sorted(set(iter_labels(train_ex)))
        if neg and neg in names:
            names = [neg] + [n for n in names if n != neg]
        label_names = tuple(names)
    if not relation or (neg and neg not in label_names):
        neg = None if not relation else neg
    config = EarlyExitConfig(
        task=model_task(task), label_names=label_names, negative_label=neg if relation else None,
        pooling=job.pooling, head_input=job.head_input,
        policy=ExitPolicyConfig(kind="epee", entropy_threshold=job.tau, patience=job.patience),
    )
    torch.manual_seed(job.seed)
    if job.backbone:
        model = EarlyExitModel.from_backbone(job.backbone, config, allow_pickle=job.allow_pickle_weights)
    else:
        model = EarlyExitModel.from_config(_architecture_config(job), config)
    if task == "image":
        from ..images import ImageSettings

        bc = model.backbone.config
        n_ch = int(bc.num_channels)
        preprocessor = ImagePreprocessor(label_names, ImageSettings(
            image_size=int(bc.image_size), num_channels=n_ch,
            mean=tuple(job.mean or [0.5] * n_ch), std=tuple(job.std or [0.5] * n_ch)))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(job.tokenizer or job.backbone, local_files_only=True)
        preprocessor = TextPreprocessor(tokenizer, task, label_names, TextSettings(max_length=job.max_length))
    model, preprocessor = _soft_prompts(model, preprocessor, job.num_prompts, job.freeze_backbone)
    train_s, train_t, _, skipped_train = encode_all(preprocessor, train_ex)
    dev_s, dev_t, _, skipped_dev = encode_all(preprocessor, dev_ex)
    metric, fn = score_function(task, label_names, neg)
    log.info("training %s on %d examples (dev %d); labels: %s", model.adapter.family, len(train_s), len(dev_s),
             ", ".join(label_names))
    tcfg = TrainConfig(epochs=job.epochs, batch_size=job.batch_size, learning_rate=job.lr,
                       head_learning_rate=job.head_lr, seed=job.seed, checkpoint_every=job.checkpoint_every,
                       distill_weight=job.distill)
    started = time.time()
    history = fit(model, train_s, train_t, dev_s, dev_t, fn, tcfg, checkpoint_dir=job.output, metric=metric,
                  device=job.device, progress=job.progress, stop_after_steps=job.stop_after_steps)
    if job.stop_after_steps is not None and len(history.epochs) < job.epochs:
        log.info("stopped after %d steps as asked; run the same command again to resume", job.stop_after_steps)
        return TrainResult(None, {"stopped_after_steps": job.stop_after_steps})
    model.to("cpu")
    record = {
        "data": {"train": job.train, "dev": job.dev, "dev_npz_split": job.dev_npz_split, "task": task, "fields": fields,
                 "train_examples_available": n_train_all, "dev_examples_available": n_dev_all,
                 "train_examples_used": len(train_s), "dev_examples_used": len(dev_s),
                 "skipped_unencodable": {"train": skipped_train, "dev": skipped_dev},
                 "max_train": job.max_train, "max_dev": job.max_dev, "negative_ratio": job.negative_ratio,
                 "subsample_seed": job.seed},
        "config": tcfg.__dict__, "history": history.to_dict(), "seconds": round(time.time() - started, 1),
        "backbone_source": job.backbone or f"from config ({job.architecture})",
    }
    save_model_dir(job.output, model, preprocessor, {"training": record})
    shutil.rmtree(Path(job.output) / "checkpoint", ignore_errors=True)
    last = history.epochs[-1].dev_scores_per_layer if history.epochs else []
    return TrainResult(str(job.output), {
        "model": str(job.output), "metric": metric, "dev_scores_per_layer": last,
        "full_depth_dev_score": last[-1] if last else None, "train_seconds": record["seconds"],
        "train_examples": len(train_s), "dev_examples": len(dev_s)})


def _soft_prompts(model, preprocessor, num_prompts: int, freeze_backbone: bool):
    """The model with ``num_prompts`` new soft prompts and the preprocessor that reserves their
    positions; the backbone frozen if asked (train, sparsify)."""
    from ..encoding import TextPreprocessor

    if num_prompts:
        if not isinstance(preprocessor, TextPreprocessor):
            raise ValueError(f"--num-prompts ({num_prompts}): soft prompts are for text models")
        if model.prompts is not None:
            raise ValueError(f"the model already has {model.config.num_prompts} soft prompts")
        pre = preprocessor
        preprocessor = TextPreprocessor(pre.tokenizer, pre.task, pre.label_names, pre.settings, num_prompts=num_prompts)
        model = model.with_prompts(num_prompts, preprocessor.prompt_position)
    if freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return model, preprocessor


def _architecture_config(job: TrainJob):
    from transformers import AlbertConfig, BertConfig, GPT2Config, ViTConfig

    overrides: dict = {}
    if job.backbone_config:
        text = Path(job.backbone_config).read_text() if os.path.isfile(job.backbone_config) else job.backbone_config
        overrides = json.loads(text)
    if job.architecture == "vit":
        base = dict(image_size=job.image_size, patch_size=max(1, job.image_size // 7), num_channels=job.channels,
                    hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256)
        base.update(overrides)
        return ViTConfig(**base)
    classes = {"bert": BertConfig, "albert": AlbertConfig, "gpt2": GPT2Config}
    return classes[job.architecture](**overrides)


def sparsify(job: SparsifyJob) -> TrainResult:
    """Prune, train sparse (masks enforced), optionally fine-tune dense (masks released); soft
    prompts optional. MediSwift's recipe on a trained early-exit model directory."""
    import torch

    from ..data import subsample
    from ..modeldir import load_model_dir, save_model_dir
    from ..sparsity import MaskEnforcer, measured_sparsity
    from ..training import TrainConfig, full_depth_logits
    from ..training import train as fit

    sparse_cfg = job.sparsity_config
    bundle = load_model_dir(job.model, allow_pickle=job.allow_pickle_weights)
    model, pre = bundle.model, bundle.preprocessor
    recorded = bundle.sections.get("training", {}).get("data", {})
    fields = job.fields.resolve(recorded.get("fields"))
    task = bundle.data_task
    neg = model.config.negative_label
    train_uri = job.train or recorded.get("train")
    if not train_uri:
        raise ValueError("give --train FILE (the model directory records no training data)")
    source = dev_source(fields, {k: recorded.get(k) for k in ("dev", "dev_npz_split")}, data=job.dev,
                        npz_split=recorded.get("dev_npz_split"), train=train_uri,
                        missing="give --dev FILE (the model directory records no dev set)")
    train_ex, dev_ex = _train_and_dev(train_uri, source, task, fields, neg)
    dev_uri = None if source.part == "dev" else source.uri
    max_train = job.max_train if job.max_train is not None else recorded.get("max_train")
    ratio = recorded.get("negative_ratio") if task == "relation" else None
    train_ex = subsample(train_ex, max_train, job.seed, neg if task == "relation" else None, ratio)
    dev_ex = subsample(dev_ex, job.max_dev if job.max_dev is not None else recorded.get("max_dev"), job.seed)

    if job.teacher_distill > 0 and task == "token":
        raise ValueError("--teacher-distill is for sequence-level tasks (classification, relation, image), "
                         "not token tagging")
    torch.manual_seed(job.seed)
    teacher, teacher_pre = model, pre  # as loaded: dense, no prompts; shares its weights with the student until training
    model, pre = _soft_prompts(model, pre, job.num_prompts, job.freeze_backbone)
    # teacher and student (perhaps with prompts) read each example through their own preprocessors
    train_s, train_t, teacher_s, _ = encode_all(pre, train_ex, teacher_pre if job.teacher_distill > 0 else None)
    teacher_logits = None
    if job.teacher_distill > 0:
        teacher_logits = full_depth_logits(teacher, teacher_s, 64, job.device).cpu()
        model.to("cpu")
        log.info("teacher: %d training examples' full-depth logits from %s", len(teacher_s), job.model)
    del teacher
    dev_s, dev_t, _, _ = encode_all(pre, dev_ex)
    metric, fn = score_function(task, model.config.label_names, neg)
    source_id = bundle.model_id or str(job.model)
    before = measured_sparsity(model)

    def stage(epochs: int, hook) -> dict:
        tcfg = TrainConfig(epochs=epochs, batch_size=job.batch_size, learning_rate=job.lr,
                           head_learning_rate=job.head_lr, seed=job.seed, checkpoint_every=10**9,
                           teacher_weight=job.teacher_distill, teacher_temperature=job.teacher_temperature)
        started = time.time()
        history = fit(model, train_s, train_t, dev_s, dev_t, fn, tcfg, metric=metric, device=job.device,
                      progress=job.progress, step_hook=hook, teacher_logits=teacher_logits)
        model.to("cpu")
        last = history.epochs[-1].dev_scores_per_layer if history.epochs else []
        return {"epochs": epochs, "config": tcfg.__dict__, "history": history.to_dict(),
                "seconds": round(time.time() - started, 1), "dev_scores_per_layer": last,
                "measured": measured_sparsity(model)}

    enforcer = MaskEnforcer(model, sparse_cfg) if sparse_cfg.sparsity > 0 else None
    pruned = measured_sparsity(model)
    stages = {"sparse_training": stage(job.epochs, enforcer.after_step if enforcer else None) if job.epochs else None}
    if enforcer is not None:
        enforcer.finish()  # the target holds exactly, however many steps training ran
        if stages["sparse_training"]:
            stages["sparse_training"]["measured"] = measured_sparsity(model)
    origin = {
        "source_model_id": source_id, "method": "magnitude", "scope": sparse_cfg.scope, "pattern": sparse_cfg.pattern,
        "gradual_steps": sparse_cfg.gradual_steps, "sparsity_before": before["sparsity"],
        "sparsity_after_pruning": pruned["sparsity"],
    }
    training_record = {
        "data": {**recorded, "train": train_uri, "dev": dev_uri, "train_examples_used": len(train_s),
                 "dev_examples_used": len(dev_s), "max_train": max_train},
        "lineage": bundle.sections.get("training"),
    }

    def sections(released: bool) -> dict:
        measured = measured_sparsity(model)
        return {"training": training_record, "sparsity": {
            "target": sparse_cfg.sparsity, "config": sparse_cfg.to_dict(), "measured": measured["sparsity"],
            "per_layer": measured["per_layer"], "prunable_weights": measured["prunable_weights"],
            "masks": {**origin, "enforced_epochs": job.epochs, "released": released,
                      "dense_epochs": job.dense_epochs if released else 0},
            "stages": {k: v for k, v in stages.items() if v is not None},
            "soft_prompts": {"num_prompts": model.config.num_prompts, "frozen_backbone": bool(job.freeze_backbone)},
            "teacher": ({"source_model_id": source_id, "weight": job.teacher_distill,
                         "temperature": job.teacher_temperature} if job.teacher_distill > 0 else None),
        }}

    if job.sparse_output and job.dense_epochs:
        save_model_dir(job.sparse_output, model, pre, sections(released=False))
    if job.dense_epochs:
        stages["dense_finetuning"] = stage(job.dense_epochs, None)  # masks released: pruned weights may regrow
    save_model_dir(job.output, model, pre, sections(released=bool(job.dense_epochs)))
    final = stages.get("dense_finetuning") or stages["sparse_training"] or {}
    last = final.get("dev_scores_per_layer", [])
    return TrainResult(str(job.output), {
        "model": str(job.output), "sparse_model": job.sparse_output if job.dense_epochs else None,
        "metric": metric, "sparsity_target": sparse_cfg.sparsity,
        "sparsity_after_sparse_training": (stages["sparse_training"] or {}).get("measured", pruned)["sparsity"],
        "sparsity_final": measured_sparsity(model)["sparsity"], "num_prompts": model.config.num_prompts,
        "dev_scores_per_layer": last, "full_depth_dev_score": last[-1] if last else None,
        "train_examples": len(train_s), "dev_examples": len(dev_s)})
