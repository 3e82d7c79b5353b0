"""The ``epee`` command: train, calibrate and evaluate early-exit model directories.

    epee train      --task sequence --train notes.jsonl --dev dev.jsonl --backbone DIR --output MODEL
    epee calibrate  --model MODEL [--data dev.jsonl] [--tolerance 1.0] [--confidence 0.9]
    epee evaluate   --model MODEL --data test.jsonl
    epee sparsify   --model MODEL --output SPARSE --sparsity 0.75 [--dense-epochs 1] [--num-prompts 8]
    epee convert    --model MODEL        (pickle weights -> model.safetensors, once)

See the README ("Training a model") for every data format with an example.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import LINEAR_KERNELS, PRECISIONS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("epee")

DATA_TASKS = ("sequence", "relation", "token", "image")


# -- data ------------------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data fields (defaults come from the model directory where it has them)")
    g.add_argument("--text-field", help="column holding the text (default: text)")
    g.add_argument("--label-field", help="column holding the label (default: label)")
    g.add_argument("--id-field", help="column holding a record id (default: row number)")
    g.add_argument("--image-field", help="image tables: column with the file path (default: path)")
    g.add_argument("--label-names", help="two-column table (id,name) mapping raw label values to names")
    g.add_argument("--npz-split", help="npz files: array prefix, e.g. 'train' for train_images/train_labels")
    g.add_argument("--dev-fraction", type=float, help="carve a dev split out of the data, by document")
    g.add_argument("--split-seed", type=int, help="seed of that split (default 13)")


def _fields(args: argparse.Namespace, recorded: dict | None = None) -> dict[str, Any]:
    recorded = recorded or {}
    out = {}
    for key, default in (("text_field", "text"), ("label_field", "label"), ("id_field", None), ("image_field", "path"),
                         ("label_names", None), ("npz_split", None), ("dev_fraction", None), ("split_seed", 13)):
        value = getattr(args, key, None)
        out[key] = value if value is not None else recorded.get(key, default)
    return out


def _load(uri: str, task: str, fields: dict, negative_label: str | None, part: str = "all"):
    from .data import load_examples, read_label_map, split_examples

    label_map = read_label_map(fields["label_names"]) if fields.get("label_names") else None
    examples = load_examples(
        uri, task, text_field=fields["text_field"], label_field=fields["label_field"], id_field=fields["id_field"],
        image_field=fields["image_field"], split=fields.get("npz_split"), label_map=label_map,
        negative_label=negative_label or "negative",
    )
    if part != "all":
        if not fields.get("dev_fraction"):
            raise SystemExit(f"--part {part} needs --dev-fraction")
        train, dev = split_examples(examples, fields["dev_fraction"], fields["split_seed"])
        examples = train if part == "train" else dev
    return examples


def _encode_all(preprocessor, examples, teacher=None) -> tuple[list, list, list, int]:
    """Encode examples: (samples, targets, teacher samples, skipped). Ones that cannot be encoded
    are counted and skipped (ids logged, not text). With a ``teacher`` preprocessor (`sparsify
    --teacher-distill`) each example is also encoded for the teacher, and kept only if both can."""
    samples, targets, teacher_samples, skipped = [], [], [], 0
    for ex in examples:
        try:
            enc = preprocessor.encode(ex)
            teacher_enc = teacher.encode(ex) if teacher is not None else None
        except ValueError as exc:
            skipped += 1
            log.warning("skipping example %s: %s", ex.id, exc)
            continue
        samples.append(enc.sample)
        targets.append(enc.target)
        if teacher_enc is not None:
            teacher_samples.append(teacher_enc.sample)
    return samples, targets, teacher_samples, skipped


def score_function(data_task: str, label_names: Sequence[str], negative_label: str | None) -> tuple[str, Callable]:
    """(metric name, fn(gold, predictions) -> float) for the task's primary metric."""
    from .metrics import primary_metric

    metric_task = "sequence" if data_task == "image" else data_task
    metric = primary_metric(metric_task, negative_label)

    def fn(gold: list, pred: list) -> float:
        return all_scores(metric_task, gold, pred, label_names, negative_label)[metric]

    return metric, fn


def all_scores(metric_task: str, gold: list, pred: list, label_names, negative_label) -> dict[str, float]:
    from .encoding import IGNORE
    from .metrics import task_scores

    if metric_task == "token":  # positions without gold (special tokens) are not scored
        pred = [[-1 if g == IGNORE else p for g, p in zip(gs, ps)] for gs, ps in zip(gold, pred)]
        gold = [[-1 if g == IGNORE else g for g in gs] for gs in gold]
    return task_scores(metric_task, gold, pred, label_names, negative_label)


# -- train -----------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> dict:
    import torch

    from .config import EarlyExitConfig, ExitPolicyConfig
    from .data import iter_labels, subsample
    from .encoding import ImagePreprocessor, TextPreprocessor, TextSettings, bio_label_names
    from .modeldir import save_model_dir
    from .modeling import EarlyExitModel
    from .training import TrainConfig, train

    task = args.task
    fields = _fields(args)
    neg = args.negative_label
    train_ex = _load(args.train, task, fields, neg)
    if args.dev:
        dev_ex = _load(args.dev, task, {**fields, "npz_split": args.dev_npz_split or fields["npz_split"]}, neg)
    elif fields["dev_fraction"]:
        from .data import split_examples

        train_ex, dev_ex = split_examples(train_ex, fields["dev_fraction"], fields["split_seed"])
    else:
        raise SystemExit("give --dev FILE or --dev-fraction F")
    n_train_all, n_dev_all = len(train_ex), len(dev_ex)
    train_ex = subsample(train_ex, args.max_train, args.seed, neg if task == "relation" else None,
                         args.negative_ratio if task == "relation" else None)
    dev_ex = subsample(dev_ex, args.max_dev, args.seed)

    if task == "token":
        label_names = bio_label_names([s[0] for ex in train_ex for s in (ex.spans or ())])
    else:
        names = sorted(set(iter_labels(train_ex)))
        if neg and neg in names:
            names = [neg] + [n for n in names if n != neg]
        label_names = tuple(names)
    if task != "relation" or (neg and neg not in label_names):
        neg = None if task != "relation" else neg
    model_task = "sequence" if task == "image" else task
    config = EarlyExitConfig(
        task=model_task, label_names=label_names, negative_label=neg if task == "relation" else None,
        pooling=args.pooling, head_input=args.head_input,
        policy=ExitPolicyConfig(kind="epee", entropy_threshold=args.tau, patience=args.patience),
    )
    torch.manual_seed(args.seed)
    if args.backbone:
        model = EarlyExitModel.from_backbone(args.backbone, config, allow_pickle=args.allow_pickle_weights)
    else:
        model = EarlyExitModel.from_config(_architecture_config(args), config)
    if task == "image":
        from .images import ImageSettings

        bc = model.backbone.config
        n_ch = int(bc.num_channels)
        preprocessor = ImagePreprocessor(label_names, ImageSettings(
            image_size=int(bc.image_size), num_channels=n_ch,
            mean=tuple(args.mean or [0.5] * n_ch), std=tuple(args.std or [0.5] * n_ch)))
    else:
        from transformers import AutoTokenizer

        tok_dir = args.tokenizer or args.backbone
        if not tok_dir:
            raise SystemExit("text tasks trained from scratch need --tokenizer DIR")
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        preprocessor = TextPreprocessor(tokenizer, task, label_names, TextSettings(max_length=args.max_length))
    model, preprocessor = _soft_prompts(model, preprocessor, args)
    train_s, train_t, _, skipped_train = _encode_all(preprocessor, train_ex)
    dev_s, dev_t, _, skipped_dev = _encode_all(preprocessor, dev_ex)
    metric, fn = score_function(task, label_names, neg)
    log.info("training %s on %d examples (dev %d); labels: %s", model.adapter.family, len(train_s), len(dev_s), ", ".join(label_names))
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                       head_learning_rate=args.head_lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
                       distill_weight=args.distill)
    started = time.time()
    history = train(model, train_s, train_t, dev_s, dev_t, fn, tcfg, checkpoint_dir=args.output, metric=metric,
                    device=args.device, progress=not args.no_progress, stop_after_steps=args.stop_after_steps)
    if args.stop_after_steps is not None and len(history.epochs) < args.epochs:
        log.info("stopped after %d steps as asked; run the same command again to resume", args.stop_after_steps)
        return {"stopped_after_steps": args.stop_after_steps}
    model.to("cpu")
    record = {
        "data": {"train": args.train, "dev": args.dev, "dev_npz_split": args.dev_npz_split, "task": task, "fields": fields,
                 "train_examples_available": n_train_all, "dev_examples_available": n_dev_all,
                 "train_examples_used": len(train_s), "dev_examples_used": len(dev_s),
                 "skipped_unencodable": {"train": skipped_train, "dev": skipped_dev},
                 "max_train": args.max_train, "max_dev": args.max_dev, "negative_ratio": args.negative_ratio,
                 "subsample_seed": args.seed},
        "config": tcfg.__dict__, "history": history.to_dict(), "seconds": round(time.time() - started, 1),
        "backbone_source": args.backbone or f"from config ({args.architecture})",
    }
    save_model_dir(args.output, model, preprocessor, {"training": record})
    import shutil

    shutil.rmtree(Path(args.output) / "checkpoint", ignore_errors=True)
    last = history.epochs[-1].dev_scores_per_layer if history.epochs else []
    return {"model": str(args.output), "metric": metric, "dev_scores_per_layer": last,
            "full_depth_dev_score": last[-1] if last else None, "train_seconds": record["seconds"],
            "train_examples": len(train_s), "dev_examples": len(dev_s)}


def _soft_prompts(model, preprocessor, args: argparse.Namespace):
    """``--num-prompts`` and ``--freeze-backbone`` (train, sparsify): the model with new soft prompts
    and the preprocessor that reserves their positions; the backbone frozen if asked."""
    from .encoding import TextPreprocessor

    if args.freeze_backbone and not args.num_prompts:
        raise SystemExit("--freeze-backbone trains only the exit heads and the soft prompts: give --num-prompts")
    if args.num_prompts:
        if not isinstance(preprocessor, TextPreprocessor):
            raise SystemExit("--num-prompts: soft prompts are for text models")
        if model.prompts is not None:
            raise SystemExit(f"the model already has {model.config.num_prompts} soft prompts")
        pre = preprocessor
        preprocessor = TextPreprocessor(pre.tokenizer, pre.task, pre.label_names, pre.settings, num_prompts=args.num_prompts)
        model = model.with_prompts(args.num_prompts, preprocessor.prompt_position)
    if args.freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return model, preprocessor


def _architecture_config(args: argparse.Namespace):
    from transformers import AlbertConfig, BertConfig, GPT2Config, ViTConfig

    if not args.architecture:
        raise SystemExit("give --backbone DIR (pretrained) or --architecture NAME (from scratch)")
    overrides: dict = {}
    if args.backbone_config:
        text = Path(args.backbone_config).read_text() if os.path.isfile(args.backbone_config) else args.backbone_config
        overrides = json.loads(text)
    classes = {"bert": BertConfig, "albert": AlbertConfig, "gpt2": GPT2Config, "vit": ViTConfig}
    if args.architecture not in classes:
        raise SystemExit(f"--architecture must be one of {sorted(classes)}")
    if args.architecture == "vit":
        base = dict(image_size=args.image_size, patch_size=max(1, args.image_size // 7), num_channels=args.channels,
                    hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256)
        base.update(overrides)
        return ViTConfig(**base)
    return classes[args.architecture](**overrides)


# -- calibrate -------------------------------------------------------------------------------------
def _bundle_and_data(args: argparse.Namespace, part_default: str):
    from .modeldir import load_model_dir

    bundle = load_model_dir(args.model, allow_pickle=args.allow_pickle_weights)
    training = bundle.sections.get("training", {}).get("data", {})
    fields = _fields(args, training.get("fields"))
    neg = bundle.model.config.negative_label
    if args.data:
        uri, part = args.data, args.part
    elif training.get("dev"):
        uri, part = training["dev"], "all"
        fields = {**fields, "npz_split": training.get("dev_npz_split") or fields.get("npz_split")}
    elif training.get("train") and fields.get("dev_fraction"):
        uri, part = training["train"], part_default
    else:
        raise SystemExit("give --data FILE (the model directory records no dev set)")
    examples = _load(uri, bundle.data_task, fields, neg, part)
    if args.max_examples:
        from .data import subsample

        examples = subsample(examples, args.max_examples, 0)
    return bundle, examples, uri, part


# Below this many calibration records, the 0.9 bootstrap rule was seen to let settings through whose
# drop on new records exceeded the point (medical abstracts, 200 records; docs/analyses.md).
SMALL_DEV_SET = 500
SMALL_DEV_CONFIDENCE = 0.99


def cmd_calibrate(args: argparse.Namespace) -> dict:
    from .calibration import (
        choose, choose_robust, collect_layer_outputs, plot_frontier, render_table_markdown, sweep, write_sweep_table,
    )
    from .config import ExitPolicyConfig
    from .modeldir import update_model_dir

    if "://" in args.model:
        raise SystemExit("calibrate writes into the model directory: give a local path")
    if not 0.0 <= args.confidence < 1.0 or args.resamples < 1:
        raise SystemExit("--confidence must be in [0, 1) and --resamples >= 1")
    bundle, examples, uri, part = _bundle_and_data(args, "dev")
    model = bundle.model
    samples, targets, _, skipped = _encode_all(bundle.preprocessor, examples)
    gold = [t.tolist() if hasattr(t, "tolist") else t for t in targets]
    metric, fn = score_function(bundle.data_task, model.config.label_names, model.config.negative_label)
    outputs = collect_layer_outputs(model, samples, batch_size=args.batch_size, precision=args.precision,
                                    linear_kernel=args.linear_kernel)
    points = sweep(outputs, lambda preds: fn(gold, preds), model.num_layers, min_exit_layer=args.min_exit_layer)
    full = next(p for p in points if p.kind == "none")
    if args.confidence:
        robust = choose_robust(outputs, points, gold, fn, args.tolerance / 100.0, kind="epee",
                               confidence=args.confidence, resamples=args.resamples)
        chosen = robust.point
        selection = {"rule": "paired bootstrap", "confidence": args.confidence, "resamples": args.resamples,
                     "drop_quantile": robust.drop_quantile, "mean_drop": robust.mean_drop,
                     "candidates_tested": robust.candidates_tested}
        if len(samples) < SMALL_DEV_SET and args.confidence < SMALL_DEV_CONFIDENCE:
            selection["warning"] = (
                f"calibrated on {len(samples)} records at confidence {args.confidence}: on dev sets this small the "
                f"chosen setting can drop more than the tolerance on new records (docs/analyses.md, 'Calibration "
                f"rules for small dev sets'); --confidence {SMALL_DEV_CONFIDENCE} held it in every case measured, "
                f"at more layers")
            log.warning(selection["warning"])
    else:
        chosen = choose(points, full.score, args.tolerance / 100.0, kind="epee")
        selection = {"rule": "point estimate"}
    out = Path(args.model) / "calibration"
    out.mkdir(exist_ok=True)
    write_sweep_table(points, out / "sweep.csv")
    (out / "frontier.md").write_text(render_table_markdown(points, chosen))
    plot_frontier(points, chosen, out / "frontier.png", title=f"{Path(args.model).name}: {metric} vs mean exit layer")
    per_layer = []
    from .training import predict_all_layers

    import torch

    for preds in predict_all_layers(model, samples, args.batch_size, torch.device("cpu")):
        per_layer.append(fn(gold, preds))
    policy = ExitPolicyConfig(kind="epee", entropy_threshold=float(chosen.entropy_threshold),
                              patience=int(chosen.patience), min_exit_layer=args.min_exit_layer)
    record = {
        "metric": metric, "tolerance_points": args.tolerance, "data": uri, "part": part, "examples": len(samples),
        "skipped_unencodable": skipped, "full_depth_score": full.score, "per_layer_scores": per_layer,
        "selection": selection, "precision": args.precision,
        "chosen": {"kind": "epee", "entropy_threshold": policy.entropy_threshold, "patience": policy.patience,
                   "score": chosen.score, "mean_exit_layer": chosen.mean_exit_layer, "layer_speedup": chosen.layer_speedup},
        "files": ["calibration/sweep.csv", "calibration/frontier.md", "calibration/frontier.png"],
    }
    update_model_dir(args.model, policy=policy, calibration=record)
    return record


# -- evaluate --------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> dict:
    from .config import EngineConfig, ExitPolicyConfig
    from .engine import EarlyExitEngine
    from .policies import ExitPolicy

    bundle, examples, uri, part = _bundle_and_data(args, "dev")
    model = bundle.model
    t0 = time.perf_counter()
    samples, targets, _, skipped = _encode_all(bundle.preprocessor, examples)
    t_encode = time.perf_counter() - t0
    policy_cfg = model.config.policy if args.policy is None else ExitPolicyConfig(
        kind=args.policy, entropy_threshold=args.tau if args.tau is not None else model.config.policy.entropy_threshold,
        patience=args.patience if args.patience is not None else model.config.policy.patience)
    engine = EarlyExitEngine(model, EngineConfig(batch_size=args.batch_size, precision=args.precision,
                                                 linear_kernel=args.linear_kernel, split_layers=not args.whole_layers))
    t0 = time.perf_counter()
    result = engine.run(samples, ExitPolicy(policy_cfg, model.num_layers))
    t_run = time.perf_counter() - t0
    metric_task = "sequence" if bundle.data_task == "image" else bundle.data_task
    if metric_task == "token":
        preds = [list(p.token_labels) for p in result.predictions]
    else:
        preds = [p.label for p in result.predictions]
    gold = [t.tolist() if hasattr(t, "tolist") else t for t in targets]
    scores = all_scores(metric_task, gold, preds, model.config.label_names, model.config.negative_label) if samples else {}
    n = len(samples)
    return {
        "model": str(args.model), "data": uri, "part": part, "records": n, "skipped_unencodable": skipped,
        "policy": policy_cfg.to_dict(), "precision": args.precision, **scores,
        "mean_exit_layer": round(result.stats.mean_exit_layer, 4), "num_layers": model.num_layers,
        "layer_speedup": round(result.stats.layer_speedup, 4),
        "samples_per_s": round(n / t_run, 2) if t_run else None,
        "samples_per_s_with_preprocessing": round(n / (t_run + t_encode), 2) if t_run else None,
        "exits_per_layer": result.stats.exits_per_layer, "mean_batch_fill": round(result.stats.mean_batch_fill, 4),
        "macs_per_record": result.stats.macs / n if n else 0.0,
        "dense_full_macs_per_record": result.stats.dense_full_macs / n if n else 0.0,
        **{f"macs_{k}": round(v, 6) for k, v in result.stats.mac_savings.items()},
    }


# -- sparsify --------------------------------------------------------------------------------------
def cmd_sparsify(args: argparse.Namespace) -> dict:
    """Prune, train sparse (masks enforced), optionally fine-tune dense (masks released); soft
    prompts optional. MediSwift's recipe on a trained early-exit model directory."""
    import torch

    from .data import subsample
    from .modeldir import load_model_dir, save_model_dir
    from .sparsity import MaskEnforcer, SparsityConfig, measured_sparsity
    from .training import TrainConfig, full_depth_logits, train

    for name in ("epochs", "dense_epochs", "num_prompts"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    try:
        sparse_cfg = SparsityConfig(sparsity=args.sparsity, scope=args.scope, pattern=args.pattern,
                                    gradual_steps=args.gradual_steps)
    except ValueError as exc:
        raise SystemExit(f"epee sparsify: {exc}") from None
    if args.freeze_backbone and not args.num_prompts:  # before loading anything
        raise SystemExit("--freeze-backbone trains only the exit heads and the soft prompts: give --num-prompts")
    try:  # the teacher's settings by TrainConfig's own rules, before loading anything
        TrainConfig(teacher_weight=args.teacher_distill, teacher_temperature=args.teacher_temperature)
    except ValueError as exc:
        raise SystemExit(f"epee sparsify (--teacher-distill, --teacher-temperature): {exc}") from None
    bundle = load_model_dir(args.model, allow_pickle=args.allow_pickle_weights)
    model, pre = bundle.model, bundle.preprocessor
    recorded = bundle.sections.get("training", {}).get("data", {})
    fields = _fields(args, recorded.get("fields"))
    task = bundle.data_task
    neg = model.config.negative_label
    train_uri = args.train or recorded.get("train")
    if not train_uri:
        raise SystemExit("give --train FILE (the model directory records no training data)")
    train_ex = _load(train_uri, task, fields, neg)
    dev_uri = args.dev or recorded.get("dev")
    if dev_uri:
        dev_ex = _load(dev_uri, task, {**fields, "npz_split": recorded.get("dev_npz_split") or fields["npz_split"]}, neg)
    elif fields.get("dev_fraction"):
        from .data import split_examples

        train_ex, dev_ex = split_examples(train_ex, fields["dev_fraction"], fields["split_seed"])
    else:
        raise SystemExit("give --dev FILE (the model directory records no dev set)")
    max_train = args.max_train if args.max_train is not None else recorded.get("max_train")
    ratio = recorded.get("negative_ratio") if task == "relation" else None
    train_ex = subsample(train_ex, max_train, args.seed, neg if task == "relation" else None, ratio)
    dev_ex = subsample(dev_ex, args.max_dev if args.max_dev is not None else recorded.get("max_dev"), args.seed)

    if args.teacher_distill > 0 and task == "token":
        raise SystemExit("--teacher-distill is for sequence-level tasks (classification, relation, image), "
                         "not token tagging")
    torch.manual_seed(args.seed)
    teacher, teacher_pre = model, pre  # as loaded: dense, no prompts; shares its weights with the student until training
    model, pre = _soft_prompts(model, pre, args)
    # teacher and student (perhaps with prompts) read each example through their own preprocessors
    train_s, train_t, teacher_s, _ = _encode_all(pre, train_ex, teacher_pre if args.teacher_distill > 0 else None)
    teacher_logits = None
    if args.teacher_distill > 0:
        teacher_logits = full_depth_logits(teacher, teacher_s, 64, args.device).cpu()
        model.to("cpu")
        log.info("teacher: %d training examples' full-depth logits from %s", len(teacher_s), args.model)
    del teacher
    dev_s, dev_t, _, _ = _encode_all(pre, dev_ex)
    metric, fn = score_function(task, model.config.label_names, neg)
    source_id = bundle.model_id or str(args.model)
    before = measured_sparsity(model)

    def stage(epochs: int, hook) -> dict:
        tcfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, learning_rate=args.lr,
                           head_learning_rate=args.head_lr, seed=args.seed, checkpoint_every=10**9,
                           teacher_weight=args.teacher_distill, teacher_temperature=args.teacher_temperature)
        started = time.time()
        history = train(model, train_s, train_t, dev_s, dev_t, fn, tcfg, metric=metric, device=args.device,
                        progress=not args.no_progress, step_hook=hook, teacher_logits=teacher_logits)
        model.to("cpu")
        last = history.epochs[-1].dev_scores_per_layer if history.epochs else []
        return {"epochs": epochs, "config": tcfg.__dict__, "history": history.to_dict(),
                "seconds": round(time.time() - started, 1), "dev_scores_per_layer": last,
                "measured": measured_sparsity(model)}

    enforcer = MaskEnforcer(model, sparse_cfg) if sparse_cfg.sparsity > 0 else None
    pruned = measured_sparsity(model)
    stages = {"sparse_training": stage(args.epochs, enforcer.after_step if enforcer else None) if args.epochs else None}
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
            "masks": {**origin, "enforced_epochs": args.epochs, "released": released,
                      "dense_epochs": args.dense_epochs if released else 0},
            "stages": {k: v for k, v in stages.items() if v is not None},
            "soft_prompts": {"num_prompts": model.config.num_prompts, "frozen_backbone": bool(args.freeze_backbone)},
            "teacher": ({"source_model_id": source_id, "weight": args.teacher_distill,
                         "temperature": args.teacher_temperature} if args.teacher_distill > 0 else None),
        }}

    if args.sparse_output and args.dense_epochs:
        save_model_dir(args.sparse_output, model, pre, sections(released=False))
    if args.dense_epochs:
        stages["dense_finetuning"] = stage(args.dense_epochs, None)  # masks released: pruned weights may regrow
    save_model_dir(args.output, model, pre, sections(released=bool(args.dense_epochs)))
    final = stages.get("dense_finetuning") or stages["sparse_training"] or {}
    last = final.get("dev_scores_per_layer", [])
    return {"model": str(args.output), "sparse_model": args.sparse_output if args.dense_epochs else None,
            "metric": metric, "sparsity_target": sparse_cfg.sparsity,
            "sparsity_after_sparse_training": (stages["sparse_training"] or {}).get("measured", pruned)["sparsity"],
            "sparsity_final": measured_sparsity(model)["sparsity"], "num_prompts": model.config.num_prompts,
            "dev_scores_per_layer": last, "full_depth_dev_score": last[-1] if last else None,
            "train_examples": len(train_s), "dev_examples": len(dev_s)}


# -- convert ---------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> dict:
    from .modeldir import convert_pickle_weights

    if "://" in args.model:
        raise SystemExit("convert rewrites the model directory: give a local path")
    return convert_pickle_weights(args.model)


def _add_kernel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--linear-kernel", default="auto", choices=LINEAR_KERNELS,
                   help="float32 CPU kernel of the linear layers: auto (oneDNN on x86-64 CPUs in float32, see "
                        "epee/kernels.py; PyTorch's elsewhere), aten (PyTorch's default) or onednn")


def _add_pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="load a model directory whose weights are a pickle file (pytorch_model.bin, model.pt) "
                        "instead of model.safetensors, through PyTorch's restricted unpickler (weights_only=True); "
                        "refused without this flag. `epee convert` turns such a directory into safetensors once")


# -- entry point -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epee", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune backbone and exit heads (weighted loss)")
    t.add_argument("--task", required=True, choices=DATA_TASKS)
    t.add_argument("--train", required=True, help="training data: file, DDI directory or .npz (local, s3://, gs://)")
    t.add_argument("--dev", help="dev data (else --dev-fraction carves it out of --train)")
    t.add_argument("--dev-npz-split", help="npz dev file: array prefix, e.g. 'val'")
    t.add_argument("--output", required=True, help="model directory to write (also holds the resume checkpoint)")
    src = t.add_argument_group("backbone")
    src.add_argument("--backbone", help="pretrained transformers directory (BERT, ALBERT, GPT-2, ViT)")
    src.add_argument("--architecture", choices=["bert", "albert", "gpt2", "vit"], help="train from scratch")
    src.add_argument("--backbone-config", help="JSON (or a JSON file) of config values for --architecture")
    src.add_argument("--tokenizer", help="tokenizer directory (text tasks from scratch)")
    src.add_argument("--allow-pickle-weights", action="store_true",
                     help="let --backbone load pytorch_model.bin when it has no *.safetensors (read by transformers "
                          "with torch.load weights_only=True); refused without this flag")
    src.add_argument("--image-size", type=int, default=28, help="vit from scratch: input side in pixels")
    src.add_argument("--channels", type=int, default=1, choices=[1, 3])
    src.add_argument("--mean", type=float, nargs="+", help="image normalisation mean per channel (default 0.5)")
    src.add_argument("--std", type=float, nargs="+", help="image normalisation std per channel (default 0.5)")
    _add_data_args(t)
    t.add_argument("--negative-label", help="relation task: the no-relation class (DDI: negative)")
    t.add_argument("--max-length", type=int, default=256, help="tokens per input")
    t.add_argument("--pooling", choices=["default", "mean"], default="default",
                   help="sequence/image exit-head input: the family's pooled vector ([CLS] via the pooler, "
                        "GPT-2 last token, ViT CLS) or the mean of the real tokens (sentence-transformers "
                        "backbones such as all-MiniLM were trained with mean pooling)")
    t.add_argument("--head-input", choices=["layer", "attention"], default="layer",
                   help="what the exit heads after layers 1..L-1 read: each layer's output, or (bert) its attention "
                        "sublayer's output, so that a record exiting there skips that layer's feed-forward; the "
                        "last head reads the last layer's output either way")
    h = t.add_argument_group("training")
    h.add_argument("--epochs", type=int, default=3)
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--lr", type=float, default=5e-5, help="backbone learning rate")
    h.add_argument("--head-lr", type=float, default=1e-3, help="exit-head learning rate")
    h.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                   help="self-distillation weight in [0, 1]: earlier exit heads also learn the last head's "
                        "distribution (default 0: labels only)")
    h.add_argument("--seed", type=int, default=42)
    h.add_argument("--max-train", type=int, help="subsample training examples (seeded)")
    h.add_argument("--max-dev", type=int, help="subsample dev examples (seeded)")
    h.add_argument("--negative-ratio", type=float, help="relation task: keep at most R negatives per positive")
    h.add_argument("--checkpoint-every", type=int, default=200)
    h.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # simulates an interruption (tests)
    h.add_argument("--num-prompts", type=int, default=0, help="soft prompt vectors to learn (text models)")
    h.add_argument("--freeze-backbone", action="store_true", help="with --num-prompts: train only prompts and exit heads")
    h.add_argument("--tau", type=float, default=0.2, help="entropy threshold until calibrated")
    h.add_argument("--patience", type=int, default=2, help="patience until calibrated")
    h.add_argument("--device", default="cpu")
    h.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="sweep τ and P on a dev set and store the fastest setting within tolerance")
    c.add_argument("--model", required=True)
    c.add_argument("--data", help="labelled dev data (default: the dev set recorded at training)")
    c.add_argument("--part", default="all", choices=["all", "train", "dev"], help="with --dev-fraction: which part")
    c.add_argument("--tolerance", type=float, default=1.0, help="score points below full depth allowed (1.0 = 1 point)")
    c.add_argument("--confidence", type=float, default=0.9,
                   help="take the fastest setting whose score drop stays within tolerance at this bootstrap "
                        "confidence (guards against picking a setting for its luck on the dev set); "
                        "0 takes the fastest within tolerance on the dev set itself")
    c.add_argument("--resamples", type=int, default=200, help="bootstrap resamples for --confidence")
    c.add_argument("--min-exit-layer", type=int, default=1)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--max-examples", type=int)
    c.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="calibrate in the precision the pipelines will run in (--precision there)")
    _add_kernel_arg(c)
    _add_data_args(c)
    _add_pickle_arg(c)
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("evaluate", help="score a model directory on labelled data with its stored policy")
    e.add_argument("--model", required=True, help="model directory: local path, s3:// or gs://")
    e.add_argument("--data", help="labelled data (default: the dev set recorded at training)")
    e.add_argument("--part", default="all", choices=["all", "train", "dev"])
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-examples", type=int)
    e.add_argument("--policy", choices=["entropy", "patience", "epee", "none"], help="override the stored policy")
    e.add_argument("--tau", type=float)
    e.add_argument("--patience", type=int)
    e.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="run the engine in this precision (bfloat16: torch.autocast; int8: the layers' linear "
                        "products in int8), to check its scores before a pipeline runs with that --precision")
    _add_kernel_arg(e)
    e.add_argument("--whole-layers", action="store_true",
                   help="run every layer whole, never at the exit heads' positions first (EngineConfig."
                        "split_layers; the same predictions, more multiply-adds): for comparisons")
    _add_data_args(e)
    _add_pickle_arg(e)
    e.set_defaults(func=cmd_evaluate)

    z = sub.add_parser("sparsify", help="prune a model directory's transformer weights, train sparse, optionally "
                                        "fine-tune dense; optional soft prompts (MediSwift)")
    z.add_argument("--model", required=True, help="trained model directory (local, s3:// or gs://)")
    z.add_argument("--output", required=True, help="new model directory")
    z.add_argument("--sparsity", type=float, required=True, help="share of transformer linear weights set to zero, e.g. 0.5 or 0.75; 0 = none")
    z.add_argument("--scope", default="global", choices=["global", "layer"], help="one magnitude threshold for all, or per matrix")
    z.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"], help="2:4 needs --sparsity 0.5")
    z.add_argument("--gradual-steps", type=int, default=0, help="raise sparsity gradually (cubic) over this many steps")
    z.add_argument("--epochs", type=int, default=1, help="epochs of sparse training (masks enforced); 0 = prune only")
    z.add_argument("--dense-epochs", type=int, default=0, help="then epochs of dense fine-tuning (masks released)")
    z.add_argument("--sparse-output", help="with --dense-epochs: also save the model as it was after sparse training here")
    z.add_argument("--num-prompts", type=int, default=0, help="add this many soft prompt vectors (text models)")
    z.add_argument("--freeze-backbone", action="store_true", help="train only soft prompts and exit heads")
    z.add_argument("--teacher-distill", type=float, default=0.0, metavar="BETA",
                   help="weight in [0, 1] of distillation from the dense model given by --model: every exit head "
                        "also learns its full-depth distribution, in both stages (sequence-level tasks; default 0)")
    z.add_argument("--teacher-temperature", type=float, default=2.0, help="softening of --teacher-distill's targets")
    z.add_argument("--train", help="training data (default: the data recorded at training)")
    z.add_argument("--dev", help="dev data (default: the dev set recorded at training)")
    z.add_argument("--max-train", type=int, help="use at most this many training examples (default: as recorded)")
    z.add_argument("--max-dev", type=int)
    z.add_argument("--batch-size", type=int, default=16)
    z.add_argument("--lr", type=float, default=5e-5)
    z.add_argument("--head-lr", type=float, default=1e-3, help="exit heads and soft prompts")
    z.add_argument("--seed", type=int, default=42)
    z.add_argument("--device", default="cpu")
    z.add_argument("--no-progress", action="store_true")
    _add_data_args(z)
    _add_pickle_arg(z)
    z.set_defaults(func=cmd_sparsify)

    v = sub.add_parser("convert", help="rewrite a model directory's pickle weights as model.safetensors")
    v.add_argument("--model", required=True, help="local model directory holding pytorch_model.bin or model.pt")
    v.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from .weights import PickleWeightsRefused

    try:
        result = args.func(args)
    except PickleWeightsRefused as exc:  # a refusal, not a crash: the message says what to do
        raise SystemExit(f"epee {args.command}: {exc}") from None
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
