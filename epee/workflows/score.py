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
    if spec.confidence:
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
    policy = ExitPolicyConfig(kind="epee", entropy_threshold=float(chosen.entropy_threshold),
                              patience=int(chosen.patience), min_exit_layer=spec.min_exit_layer)
    record = {
        "metric": metric, "tolerance_points": spec.tolerance, "data": source.uri if source else None,
        "part": source.part if source else None, "examples": n, "skipped_unencodable": encoded.skipped,
        **({"windows": len(samples)} if len(samples) != n else {}),
        "full_depth_score": full.score, "per_layer_scores": per_layer, "selection": selection,
        "precision": spec.precision,
        "chosen": {"kind": "epee", "entropy_threshold": policy.entropy_threshold, "patience": policy.patience,
                   "score": chosen.score, "mean_exit_layer": chosen.mean_exit_layer, "layer_speedup": chosen.layer_speedup},
        "files": ["calibration/sweep.csv", "calibration/frontier.md", "calibration/frontier.png"],
    }
    update_model_dir(model_dir, policy=policy, calibration=record)
    return CalibrationRecord(policy, record, points)


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
