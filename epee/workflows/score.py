"""The workflows that read a trained model directory: :func:`calibrate`, :func:`evaluate`, :func:`convert`.

Both score what the pipelines run: a long note of a sequence task is read in overlapping
windows (:func:`~epee.workflows.data.encode_windows`), each window a sample the exit policy
decides on; a record's label is the argmax of its windows' mean probabilities, as the handler's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ExitPolicyConfig
from .data import DataSource, all_scores, dev_set, encode_windows, model_task, score_function
from .jobs import CalibrationSpec, EvaluateSpec

log = logging.getLogger("epee")

# Below this many calibration records, the 0.9 bootstrap rule was seen to let settings through whose
# drop on new records exceeded the point (medical abstracts, 200 records; docs/analyses.md).
SMALL_DEV_SET = 500
SMALL_DEV_CONFIDENCE = 0.99


def _local(model_dir: str, command: str) -> None:
    if "://" in str(model_dir):
        raise ValueError(f"{command} writes into the model directory: give a local path, not {model_dir!r}")


@dataclass(frozen=True)
class CalibrationRecord:
    """The calibrated policy, written into the model directory, and the record written beside it."""

    policy: ExitPolicyConfig
    record: dict[str, Any]  # epee_config.json's "calibration" section, what `epee calibrate` prints
    points: list = field(repr=False, default_factory=list)  # every SweepPoint scored


def calibrate(model_dir: str, spec: CalibrationSpec = CalibrationSpec(), examples: list | None = None,
              source: DataSource | None = None) -> CalibrationRecord:
    """Sweep τ and P on a dev set and store the fastest setting within tolerance in ``model_dir``.

    The dev set is ``examples`` if given (``source`` then says where they came from, for the
    record), else :func:`~epee.workflows.data.dev_set`'s. It runs through the model once, at
    ``spec.precision``: the same layer outputs give the sweep and the per-layer scores.
    """
    from ..calibration import (
        choose, choose_robust, collect_layer_outputs, layer_predictions, plot_frontier, render_table_markdown, sweep,
        write_sweep_table,
    )
    from ..modeldir import load_model_dir, update_model_dir

    _local(model_dir, "calibrate")
    if spec.unlabeled:
        return _calibrate_unlabeled(model_dir, spec)
    if examples is None:
        bundle, examples, source = dev_set(model_dir, spec.data, spec.allow_pickle_weights)
    else:
        bundle = load_model_dir(model_dir, allow_pickle=spec.allow_pickle_weights)
    model = bundle.model
    encoded = encode_windows(bundle.preprocessor, examples, bundle.data_task)
    samples, n = encoded.samples, encoded.examples
    gold = [t.tolist() if hasattr(t, "tolist") else t for t in encoded.targets]  # per window
    metric, fn = score_function(bundle.data_task, model.config.label_names, model.config.negative_label)
    outputs = collect_layer_outputs(model, samples, batch_size=spec.batch_size, precision=spec.precision,
                                    linear_kernel=spec.linear_kernel)
    points = sweep(outputs, lambda preds: fn(gold, preds), model.num_layers, min_exit_layer=spec.min_exit_layer)
    full = next(p for p in points if p.kind == "none")
    tolerance = spec.tolerance / 100.0
    if spec.rule == "ltt":
        choice, risk = _ltt_labelled(outputs, points, encoded, bundle, tolerance, round(1.0 - spec.confidence, 12),
                                     spec.seed)
        chosen = choice.point
        selection = {"rule": "ltt", **_ltt_selection(choice), "risk": risk}
    elif spec.confidence:
        robust = choose_robust(outputs, points, gold, fn, tolerance, kind="epee", confidence=spec.confidence,
                               resamples=spec.resamples)
        chosen = robust.point
        selection = {"rule": "paired bootstrap", "confidence": spec.confidence, "resamples": spec.resamples,
                     "drop_quantile": robust.drop_quantile, "mean_drop": robust.mean_drop,
                     "candidates_tested": robust.candidates_tested}
        if n < SMALL_DEV_SET and spec.confidence < SMALL_DEV_CONFIDENCE:
            selection["warning"] = (
                f"calibrated on {n} records at confidence {spec.confidence}: on dev sets this small the "
                f"chosen setting can drop more than the tolerance on new records (docs/analyses.md, 'Calibration "
                f"rules for small dev sets'); --confidence {SMALL_DEV_CONFIDENCE} held it in every case measured, "
                f"at more layers")
            log.warning(selection["warning"])
    else:
        chosen = choose(points, full.score, tolerance, kind="epee")
        selection = {"rule": "point estimate"}
    out = Path(model_dir) / "calibration"
    out.mkdir(exist_ok=True)
    write_sweep_table(points, out / "sweep.csv")
    (out / "frontier.md").write_text(render_table_markdown(points, chosen))
    plot_frontier(points, chosen, out / "frontier.png", title=f"{Path(model_dir).name}: {metric} vs mean exit layer")
    per_layer = [fn(gold, preds) for preds in layer_predictions(outputs)]
    policy = _policy_of(chosen, spec.min_exit_layer)
    record = {
        "metric": metric, "tolerance_points": spec.tolerance, "data": source.uri if source else None,
        "part": source.part if source else None, "examples": n, "skipped_unencodable": encoded.skipped,
        **({"windows": len(samples)} if len(samples) != n else {}),
        "full_depth_score": full.score, "per_layer_scores": per_layer, "selection": selection,
        "precision": spec.precision,
        "chosen": {"kind": policy.kind, "entropy_threshold": policy.entropy_threshold, "patience": policy.patience,
                   "score": chosen.score, "mean_exit_layer": chosen.mean_exit_layer, "layer_speedup": chosen.layer_speedup},
        "files": ["calibration/sweep.csv", "calibration/frontier.md", "calibration/frontier.png"],
    }
    update_model_dir(model_dir, policy=policy, calibration=record)
    return CalibrationRecord(policy, record, points)


# The share of a calibration sample (by keyed hash of the record id) that orders the settings for
# Learn then Test; the rest tests them. Ordering on the tested samples would void the guarantee.
LTT_LEARN_FRACTION = 0.25


def _policy_of(point, min_exit_layer: int) -> ExitPolicyConfig:
    """The stored policy of a chosen point; full depth (no setting certified) is kind "none"."""
    if point.kind == "none":
        return ExitPolicyConfig(kind="none", min_exit_layer=min_exit_layer)
    return ExitPolicyConfig(kind="epee", entropy_threshold=float(point.entropy_threshold),
                            patience=int(point.patience), min_exit_layer=min_exit_layer)


def _learn_mask(ids: list[str], seed: int):
    """Which records order the settings: a keyed hash of the id below LTT_LEARN_FRACTION."""
    import numpy as np

    from .data import record_key

    return np.array([int(record_key(i, seed + 1)[:8], 16) < LTT_LEARN_FRACTION * 16**8 for i in ids], dtype=bool)


def _prediction_losses(outputs, encoded, label_names, reference):
    """``record_losses`` for :func:`~epee.policy_search.choose_ltt`: per record, whether its
    prediction at the exit differs from ``reference(record predictions at full depth)``'s verdict.

    ``reference`` maps (exit predictions, full-depth predictions) to a 0/1 loss array.
    """
    import torch

    from ..policy_search import record_predictions, span_sets

    token = outputs.is_token
    owners = None if token else encoded.owners
    full_layers = torch.full((outputs.num_samples,), outputs.num_layers, dtype=torch.long)
    full = record_predictions(outputs, full_layers, owners)
    full = span_sets(full, label_names) if token else full

    def losses(exit_layers):
        preds = record_predictions(outputs, exit_layers, owners)
        return reference(span_sets(preds, label_names) if token else preds, full)

    return losses


def _ltt_selection(choice) -> dict:
    result = choice.result
    summary = result.to_dict(lambda p: {"kind": p.kind, "entropy_threshold": p.entropy_threshold,
                                        "patience": p.patience, "mean_exit_layer": p.mean_exit_layer})
    return {**summary, "learn_samples": choice.learn_samples, "test_samples": choice.test_samples,
            "learn_fraction": LTT_LEARN_FRACTION,
            "certified": result.chosen is not None and result.chosen.setting.kind != "none"}


def _ltt_labelled(outputs, points, encoded, bundle, epsilon: float, delta: float, seed: int):
    """(LttChoice, risk): `--rule ltt` on labelled data.

    A record's loss is a correct answer at full depth lost at the exit; its rate bounds the
    accuracy drop (the drop is that rate minus the rate of answers gained), so certifying it at
    ε bounds the drop at ε. Relation extraction with a negative class is scored by micro-F1 over
    the positive relations, which a per-pair rate does not bound: there a loss is a true relation
    lost or a wrong relation gained at the exit, and since F1 = 2TP / (predicted + gold) loses at
    most (2·lost + gained) / gold, the loss rate is tested at ε/2 times a Clopper-Pearson lower
    bound (δ/2) of the share of gold relations, at δ/2."""
    import numpy as np

    from ..encoding import IGNORE
    from ..ltt import share_lower_bound
    from ..policy_search import choose_ltt, span_sets

    config = bundle.model.config
    label_names = config.label_names
    gold = encoded.gold
    if outputs.is_token:
        gold = span_sets([[-1 if g == IGNORE else g for g in tags] for tags in gold], label_names)
    ids = [str(i) for i in range(encoded.examples)]  # labelled dev sets: the record's position keys the split
    learn = _learn_mask(ids, seed)
    risk = {"kind": "correct full-depth answers lost at the exit", "per": "record", "epsilon": epsilon, "delta": delta}
    negative = (list(label_names).index(config.negative_label)
                if not outputs.is_token and config.negative_label in label_names else None)

    if negative is None:
        def lost(preds, full):
            return np.array([f == g and p != g for p, f, g in zip(preds, full, gold)], dtype=np.int8)
        eps, test_delta = epsilon, delta
    else:
        def lost(preds, full):
            return np.array([p != f and ((f == g != negative) or (p != negative and p != g))
                             for p, f, g in zip(preds, full, gold)], dtype=np.int8)
        tested = np.asarray(gold)[~learn]
        found = int((tested != negative).sum())
        low = share_lower_bound(found, len(tested), delta / 2) if len(tested) else 0.0
        eps, test_delta = max(epsilon / 2 * low, 1e-12), delta / 2
        risk.update(kind="true relations lost or wrong relations gained at the exit", per="gold relation",
                    positive_share=found / max(1, len(tested)), positive_share_lower_bound=low,
                    tested_at_epsilon=eps, tested_at_delta=test_delta)

    losses = _prediction_losses(outputs, encoded, label_names, lost)
    return choose_ltt(outputs, points, losses, learn, eps, test_delta), risk


def _calibrate_unlabeled(model_dir: str, spec: CalibrationSpec) -> CalibrationRecord:
    """`epee calibrate --unlabeled`: the fastest (τ, P) whose agreement with full depth on a keyed
    sample of the archive is >= 1 - ε with confidence 1 - δ (Learn then Test, epee.ltt)."""
    from ..calibration import collect_layer_outputs
    from ..modeldir import load_model_dir, update_model_dir
    from .data import keyed_sample, read_unlabeled, sample_manifest

    bundle = load_model_dir(model_dir, allow_pickle=spec.allow_pickle_weights)
    model = bundle.model
    training = bundle.sections.get("training", {}).get("data", {})
    fields = spec.data.fields.resolve(training.get("fields"))
    read = read_unlabeled(spec.unlabeled, bundle.data_task, fields,
                          {"endpoint_url": spec.s3_endpoint_url} if spec.s3_endpoint_url else None)
    every, files = read.examples, read.files
    if read.unreadable:
        log.warning("--unlabeled: %d image file(s) could not be read and are not in the sample", read.unreadable)
    sample = keyed_sample(every, spec.sample, spec.seed)
    encoded = encode_windows(bundle.preprocessor, sample, bundle.data_task)
    if not encoded.examples:
        raise ValueError(f"--unlabeled {spec.unlabeled!r}: no record could be encoded")
    kept = _kept_examples(bundle.preprocessor, sample, bundle.data_task) if encoded.skipped else sample
    outputs = collect_layer_outputs(model, encoded.samples, batch_size=spec.batch_size, precision=spec.precision,
                                    linear_kernel=spec.linear_kernel)
    choice, points, risk = unlabeled_ltt(outputs, encoded, [ex.id for ex in kept], model.config.label_names,
                                         spec.epsilon, spec.delta, spec.seed, spec.min_exit_layer,
                                         model.config.negative_label)
    chosen = choice.point
    policy = _policy_of(chosen, spec.min_exit_layer)
    test = choice.result.chosen
    record = {
        "procedure": choice.result.procedure, "epsilon": spec.epsilon, "delta": spec.delta,
        "sample_size": encoded.examples, "sample_requested": spec.sample, "records_available": len(every),
        "skipped_unencodable": encoded.skipped, "skipped_unreadable": read.unreadable, "seed": spec.seed,
        **({"windows": len(encoded.samples)} if len(encoded.samples) != encoded.examples else {}),
        "source": spec.unlabeled, "manifest": sample_manifest(kept, files), "precision": spec.precision,
        "risk": risk["kind"] if risk["per"] == "record" else f"{risk['kind']} per {risk['per']}",
        **({"risk_bound": risk} if risk["per"] != "record" else {}),
        "selection": {"rule": "ltt", **_ltt_selection(choice)},
        "chosen": {"kind": policy.kind, "entropy_threshold": policy.entropy_threshold, "patience": policy.patience,
                   "mean_exit_layer": chosen.mean_exit_layer, "layer_speedup": chosen.layer_speedup,
                   "agreement": 1.0 - (test.risk if test is not None else 0.0),
                   "p_value": test.p_value if test is not None else None},
    }
    log.info("calibrated on %d unlabelled records: %s", encoded.examples, record["chosen"])
    update_model_dir(model_dir, policy=policy, calibration=record)
    return CalibrationRecord(policy, record, points)


def unlabeled_ltt(outputs, encoded, ids: list[str], label_names, epsilon: float, delta: float, seed: int,
                  min_exit_layer: int = 1, negative_label: str | None = None):
    """(LttChoice, sweep points, risk): Learn then Test on unlabelled records whose layer
    ``outputs`` are collected; a record's loss is its disagreement with full depth (span-level
    for token tasks), ``ids`` key which records order the settings (:func:`_learn_mask`).

    With a ``negative_label`` (relation extraction scored on the relations found), ε is a share
    of the relations full depth finds, not of all pairs: most pairs are negatives every layer
    agrees on, and 2% of all pairs can be a fifth of the relations (and of the F1). The share of
    records full depth labels positive, π, is bounded below by Clopper-Pearson at δ/2 on the
    tested records and the settings are tested at ε·π_low and δ/2 (a union bound: the chosen
    setting's disagreements are at most ε of the found relations with probability >= 1 - δ).
    ``risk`` describes what was certified (stored in epee_config.json)."""
    import numpy as np
    import torch

    from ..calibration import sweep
    from ..ltt import share_lower_bound
    from ..policy_search import choose_ltt, record_predictions

    def disagree(preds, full):
        return np.array([p != f for p, f in zip(preds, full)], dtype=np.int8)

    losses = _prediction_losses(outputs, encoded, label_names, disagree)
    full_windows = _full_window_preds(outputs)

    def window_agreement(preds):  # the sweep's score: agreement with full depth per window (for the table)
        return float(np.mean([p == f for p, f in zip(preds, full_windows)]))

    points = sweep(outputs, window_agreement, outputs.num_layers, min_exit_layer=min_exit_layer)
    learn = _learn_mask(ids, seed)
    risk = {"kind": "span-level disagreement with full depth" if outputs.is_token else "disagreement with full depth",
            "per": "record", "epsilon": epsilon, "delta": delta}
    eps, test_delta = epsilon, delta
    if negative_label is not None and not outputs.is_token and negative_label in label_names:
        negative = list(label_names).index(negative_label)
        full_layers = torch.full((outputs.num_samples,), outputs.num_layers, dtype=torch.long)
        full = np.asarray(record_predictions(outputs, full_layers, encoded.owners))
        tested = full[~learn]
        found = int((tested != negative).sum())
        low = share_lower_bound(found, len(tested), delta / 2) if len(tested) else 0.0
        risk.update(per="relation found at full depth", positive_share=found / max(1, len(tested)),
                    positive_share_lower_bound=low, tested_at_epsilon=epsilon * low, tested_at_delta=delta / 2)
        eps, test_delta = epsilon * low, delta / 2
    if eps <= 0.0:  # no relation found in the tested records: nothing can be certified
        eps = 1e-12
    return choose_ltt(outputs, points, losses, learn, eps, test_delta), points, risk


def _full_window_preds(outputs) -> list:
    import torch

    from ..layer_outputs import _predictions_at, _trace

    n = outputs.num_samples
    return _predictions_at(_trace(outputs), outputs, torch.full((n,), outputs.num_layers, dtype=torch.long))


def _kept_examples(preprocessor, examples, data_task: str) -> list:
    """The examples :func:`encode_windows` keeps (it skips those it cannot encode)."""
    kept = []
    for ex in examples:
        if encode_windows(preprocessor, [ex], data_task).examples:
            kept.append(ex)
    return kept


@dataclass(frozen=True)
class Evaluation:
    """A model directory's scores on labelled data, and what the engine did."""

    summary: dict[str, Any]  # what `epee evaluate` prints
    predictions: list = field(repr=False, default_factory=list)  # per record: label id, or tag ids (token tasks)


def _record_predictions(result, encoded, token: bool) -> list:
    """One prediction per record: its window's, or the argmax of its windows' mean probabilities."""
    import numpy as np

    windows: dict[int, list] = {}
    for p, owner in zip(result.predictions, encoded.owners):
        windows.setdefault(owner, []).append(p)
    out = []
    for i in range(encoded.examples):
        preds = windows[i]
        if token:
            out.append(list(preds[0].token_labels))
        elif len(preds) == 1:
            out.append(preds[0].label)
        else:
            out.append(int(np.mean(np.stack([p.probs for p in preds]), axis=0).argmax()))
    return out


def evaluate(model_dir: str, spec: EvaluateSpec = EvaluateSpec(), examples: list | None = None,
             source: DataSource | None = None) -> Evaluation:
    """Score ``model_dir`` with its stored policy (or ``spec.policy``) on ``examples``, else on
    :func:`~epee.workflows.data.dev_set`'s, through the batched engine."""
    from ..config import EngineConfig
    from ..engine import EarlyExitEngine
    from ..modeldir import load_model_dir
    from ..policies import ExitPolicy

    if examples is None:
        bundle, examples, source = dev_set(model_dir, spec.data, spec.allow_pickle_weights)
    else:
        bundle = load_model_dir(model_dir, allow_pickle=spec.allow_pickle_weights)
    model = bundle.model
    t0 = time.perf_counter()
    encoded = encode_windows(bundle.preprocessor, examples, bundle.data_task)
    t_encode = time.perf_counter() - t0
    stored = model.config.policy
    policy_cfg = stored if spec.policy is None else ExitPolicyConfig(
        kind=spec.policy, entropy_threshold=spec.tau if spec.tau is not None else stored.entropy_threshold,
        patience=spec.patience if spec.patience is not None else stored.patience)
    engine = EarlyExitEngine(model, EngineConfig(batch_size=spec.batch_size, precision=spec.precision,
                                                 linear_kernel=spec.linear_kernel, split_layers=not spec.whole_layers))
    t0 = time.perf_counter()
    result = engine.run(encoded.samples, ExitPolicy(policy_cfg, model.num_layers))
    t_run = time.perf_counter() - t0
    metric_task = model_task(bundle.data_task)
    preds = _record_predictions(result, encoded, metric_task == "token")
    n = encoded.examples
    scores = all_scores(metric_task, encoded.gold, preds, model.config.label_names,
                        model.config.negative_label) if n else {}
    stats = result.stats
    summary = {
        "model": str(model_dir), "data": source.uri if source else None, "part": source.part if source else None,
        "records": n, "skipped_unencodable": encoded.skipped,
        **({"windows": len(encoded.samples)} if len(encoded.samples) != n else {}),
        "policy": policy_cfg.to_dict(), "precision": spec.precision, **scores,
        "mean_exit_layer": round(stats.mean_exit_layer, 4), "num_layers": model.num_layers,
        "layer_speedup": round(stats.layer_speedup, 4),
        "samples_per_s": round(n / t_run, 2) if t_run else None,
        "samples_per_s_with_preprocessing": round(n / (t_run + t_encode), 2) if t_run else None,
        "exits_per_layer": stats.exits_per_layer, "mean_batch_fill": round(stats.mean_batch_fill, 4),
        "macs_per_record": stats.macs / n if n else 0.0,
        "dense_full_macs_per_record": stats.dense_full_macs / n if n else 0.0,
        **{f"macs_{k}": round(v, 6) for k, v in stats.mac_savings.items()},
    }
    return Evaluation(summary, preds)


def convert(model_dir: str) -> dict[str, str]:
    """Rewrite a local model directory's pickle weights as model.safetensors, once."""
    from ..modeldir import convert_pickle_weights

    _local(model_dir, "convert")
    return convert_pickle_weights(model_dir)
