"""How much of a measured EPEE score drop is the test sample's noise? Not a test.

``bench.run_all`` measures each corpus on at most ``--max-test`` records of its test half. For one
corpus this takes the EPEE setting that run recorded (``docs/benchmarks.json``), simulates it and
full depth on the whole test half (same seeded split as run_all), and prints the drop in points
there, its paired-bootstrap 90% interval, and the spread of the drop over random subsets of the
size run_all measured:

    .venv/bin/python -m bench.drop_spread --only chemprot
    .venv/bin/python -m bench.drop_spread --only chemprot --confidences 0.9 0.95 0.99

``--confidences`` also re-runs the calibration rule (``choose_robust``, tolerance 1 point) on the
calibration half at each confidence and prints what its setting drops on the whole test half.
``--splits K`` repeats run_all's protocol on K other random halvings of the held-out set (seeds
1..K): calibrate with the default rule on one half, measure the drop on the other; the spread shows
how much one halving decides. ``--alternatives`` does the same for two other calibration rules, neither adopted (docs/analyses.md):
fixed-sequence testing (settings from deepest to fastest, each bootstrap-tested, stop at the first
that fails) and per-layer temperature scaling of the heads (fitted by NLL on the calibration half)
before the default rule. ``--temperature-rule`` (with ``--splits``) also tries, on each halving, the
default rule on tempered heads, and the rule that keeps whichever of the two settings is faster on
the calibration half if it qualifies (not adopted either, docs/analyses.md). ``--small-set-rules``
(with ``--splits``) tries, on each halving, rules meant for small calibration sets (none adopted,
docs/analyses.md): the default rule at confidence 0.95 and 0.99; the confidence (0.9, 0.95, 0.99)
chosen by 5-fold cross-validation on the calibration half (the lowest whose pooled out-of-fold drop
is within the point); and, for classification, the fastest setting whose drop expected under the
last head's probabilities (temperature-scaled on the calibration half) is within the point.
``--precision int8`` (or bfloat16) runs the model in that precision (pair it with ``--docs
docs/int8``); ``--calibrate-precision float32`` with it calibrates each halving on float32's head
outputs and measures on the other precision's: does a float32-calibrated policy hold in int8?

    .venv/bin/python -m bench.drop_spread --only medical_abstracts --docs docs/int8 --precision int8 --splits 10
    .venv/bin/python -m bench.drop_spread --only medical_abstracts --docs docs/int8 --precision int8 --splits 10 \
        --calibrate-precision float32
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np


def main(argv: list[str] | None = None) -> None:
    from epee.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", required=True, help="corpus name, as in docs/benchmarks.json")
    p.add_argument("--models", default="models")
    p.add_argument("--docs", default="docs")
    p.add_argument("--resamples", type=int, default=300)
    p.add_argument("--confidences", type=float, nargs="*", default=[],
                   help="also calibrate on the calibration half at these bootstrap confidences")
    p.add_argument("--alternatives", action="store_true",
                   help="also calibrate with fixed-sequence testing and with per-layer temperatures")
    p.add_argument("--splits", type=int, default=0, help="also re-run calibrate-then-test on this many other halvings")
    p.add_argument("--temperature-rule", action="store_true",
                   help="with --splits: also the default rule on tempered heads, and the faster of the two")
    p.add_argument("--small-set-rules", action="store_true",
                   help="with --splits: also confidences 0.95 and 0.99, a cross-validated confidence, a model-based drop")
    p.add_argument("--precision", default="float32", choices=PRECISIONS, help="run the model in this precision; "
                   "pair it with the --docs of a run_all in that precision (docs/int8)")
    p.add_argument("--calibrate-precision", default=None, choices=PRECISIONS,
                   help="with --splits: calibrate on the head outputs of this precision, measure on --precision's "
                        "(does a float32-calibrated policy hold in int8?)")
    args = p.parse_args(argv)

    from bench.common import encode_examples
    from bench.run_all import held_out
    from epee.calibration import choose_robust, collect_layer_outputs, simulate, sweep
    from epee.workflows import score_function
    from epee.config import ExitPolicyConfig
    from epee.policies import ExitPolicy

    recorded = json.loads((Path(args.docs) / "benchmarks.json").read_text())[args.only]
    setting = recorded["policies"]["epee"]["setting"]
    bundle, examples = held_out(str(Path(args.models) / args.only))
    model = bundle.model
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)  # run_all's split: calibration = order[0::2], test = order[1::2]

    def encoded(indices):
        return encode_examples(bundle, [examples[i] for i in indices])[:2]

    samples, gold = encoded(order[1::2])
    _, fn = score_function(bundle.data_task, model.config.label_names, model.config.negative_label)
    outputs = collect_layer_outputs(model, samples, precision=args.precision)
    L = model.num_layers
    full = simulate(outputs, ExitPolicy(ExitPolicyConfig(kind="none"), L)).predictions
    run = simulate(outputs, ExitPolicy(ExitPolicyConfig(**setting), L))
    exits = np.asarray(run.exit_layers, dtype=float)

    def drop(idx) -> float:
        g = [gold[i] for i in idx]
        return 100 * (fn(g, [full[i] for i in idx]) - fn(g, [run.predictions[i] for i in idx]))

    n, measured = len(samples), recorded["test_records"]
    rng = np.random.default_rng(0)
    print(f"{args.only}: EPEE {setting['entropy_threshold']:.3g}/P={setting['patience']}; run_all measured "
          f"{measured} records, drop {recorded['epee_score_drop_points']:+.2f} points")
    for name, idx in ((f"first {min(measured, n)}", list(range(min(measured, n)))), (f"whole test half ({n})", list(range(n)))):
        boots = [drop(list(rng.choice(idx, size=len(idx)))) for _ in range(args.resamples)]
        lo, hi = np.percentile(boots, [5, 95])
        print(f"  {name}: full depth {fn([gold[i] for i in idx], [full[i] for i in idx]):.4f}, drop {drop(idx):+.2f} "
              f"(bootstrap 90%: {lo:+.2f} .. {hi:+.2f}), mean exit {exits[idx].mean():.2f}")
    if n > measured:
        subsets = [drop(list(rng.choice(n, size=measured, replace=False))) for _ in range(args.resamples)]
        lo, hi = np.percentile(subsets, [5, 95])
        print(f"  random {measured}-record subsets of the test half: drop mean {np.mean(subsets):+.2f}, "
              f"5-95%: {lo:+.2f} .. {hi:+.2f}")

    if args.splits:
        resplit(model, *encoded(range(len(examples))), fn, args.splits, args.temperature_rule, args.small_set_rules,
                args.precision, args.calibrate_precision)
    if not (args.confidences or args.alternatives):
        return
    c_samples, c_gold = encoded(order[0::2])
    c_outputs = collect_layer_outputs(model, c_samples, precision=args.precision)
    points = sweep(c_outputs, lambda p: fn(c_gold, p), L)
    c_full = next(p for p in points if p.kind == "none").score

    def report(label: str, point, test_outputs=outputs, tested: str = "") -> None:
        test_run = simulate(test_outputs, ExitPolicy(point.policy_config(), L))
        print(f"  {label}: τ={point.entropy_threshold:.3g} P={point.patience}; calibration half ({len(c_samples)}): "
              f"drop {100 * (c_full - point.score):+.2f} at {point.mean_exit_layer:.2f} layers{tested}; whole test half: "
              f"drop {100 * (fn(gold, full) - fn(gold, test_run.predictions)):+.2f} at {test_run.mean_exit_layer:.2f} layers")

    for confidence in args.confidences:
        r = choose_robust(c_outputs, points, c_gold, fn, 0.01, "epee", confidence=confidence)
        report(f"confidence {confidence}", r.point, tested=f" ({r.candidates_tested} settings tested)")
    if args.alternatives:
        point = fixed_sequence(c_outputs, points, c_gold, fn, 0.01, 0.9)
        if point is None:
            print("  fixed-sequence testing, confidence 0.9: even the deepest EPEE setting fails")
        else:
            report("fixed-sequence testing, confidence 0.9", point)
        temps = [fit_temperature(p, c_gold, c_outputs.token_mask) for p in c_outputs.probs]
        print(f"  per-layer temperatures fitted on the calibration half: {' '.join(f'{t:.2f}' for t in temps)}")
        tempered = tempered_outputs(c_outputs, temps)
        t_points = sweep(tempered, lambda p: fn(c_gold, p), L)
        r = choose_robust(tempered, t_points, c_gold, fn, 0.01, "epee")
        report("tempered heads, confidence 0.9", r.point, tempered_outputs(outputs, temps))


def subset(outputs, idx):
    from epee.calibration import LayerOutputs

    pick = lambda t: None if t is None else t[idx]  # noqa: E731
    return LayerOutputs([p[idx] for p in outputs.probs], pick(outputs.token_mask), pick(outputs.lengths))


def resplit(model, samples, gold, fn, splits: int, temperature_rule: bool = False,
            small_set_rules: bool = False, precision: str = "float32", calibrate_precision: str | None = None) -> None:
    """Calibrate (default rule, tolerance 1 point) on one random half, measure on the other, ``splits`` times.

    ``temperature_rule``: also the default rule on heads tempered per layer (fitted on the
    calibration half), and "faster": the tempered setting where it qualifies and exits earlier on
    the calibration half than the default one, else the default one.
    """
    from epee.calibration import choose_robust, collect_layer_outputs, simulate, sweep
    from epee.config import ExitPolicyConfig
    from epee.policies import ExitPolicy

    L = model.num_layers
    outputs = collect_layer_outputs(model, samples, precision=precision)
    calibrated_on = (outputs if calibrate_precision in (None, precision)
                     else collect_layer_outputs(model, samples, precision=calibrate_precision))
    results: dict[str, list[tuple[float, float]]] = {}
    for seed in range(1, splits + 1):
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        halves = []
        for source, idx in ((calibrated_on, order[0::2]), (outputs, order[1::2])):
            halves.append((subset(source, idx), [gold[i] for i in idx]))
        (c_out, c_gold), (t_out, t_gold) = halves
        full = fn(t_gold, simulate(t_out, ExitPolicy(ExitPolicyConfig(kind="none"), L)).predictions)

        def calibrate_and_test(c, t):
            r = choose_robust(c, sweep(c, lambda p: fn(c_gold, p), L), c_gold, fn, 0.01, "epee")
            run = simulate(t, ExitPolicy(r.point.policy_config(), L))
            return r, (100 * (full - fn(t_gold, run.predictions)), run.mean_exit_layer)

        plain, measured = calibrate_and_test(c_out, t_out)
        line = {"default": measured}
        if temperature_rule:
            temps = [fit_temperature(p, c_gold, c_out.token_mask) for p in c_out.probs]
            tempered, t_measured = calibrate_and_test(tempered_outputs(c_out, temps), tempered_outputs(t_out, temps))
            faster = (tempered.drop_quantile <= 0.01 + 1e-12
                      and tempered.point.mean_exit_layer < plain.point.mean_exit_layer)
            line.update(tempered=t_measured, faster=t_measured if faster else measured)
        if small_set_rules:
            def measure(point):
                run = simulate(t_out, ExitPolicy(point.policy_config(), L))
                return 100 * (full - fn(t_gold, run.predictions)), run.mean_exit_layer

            points = sweep(c_out, lambda p: fn(c_gold, p), L)
            for confidence in (0.95, 0.99):
                chosen = choose_robust(c_out, points, c_gold, fn, 0.01, "epee", confidence=confidence).point
                line[f"confidence {confidence}"] = measure(chosen)
            confidence = cross_validated_confidence(c_out, c_gold, fn, L, (0.9, 0.95, 0.99))
            line["cross-validated confidence"] = measure(
                choose_robust(c_out, points, c_gold, fn, 0.01, "epee", confidence=confidence).point)
            if model.config.task == "sequence":  # its expected drop is accuracy's, not an F1's
                line["model-based"] = measure(model_based_choice(c_out, points, c_gold, 0.01))
        for rule, value in line.items():
            results.setdefault(rule, []).append(value)
        print(f"  halving {seed}: τ={plain.point.entropy_threshold:.3g} P={plain.point.patience}; other half: "
              + "; ".join(f"{rule} drop {d:+.2f} at {e:.2f} layers" for rule, (d, e) in line.items()), flush=True)
    for rule, values in results.items():
        drops, exits = np.array([d for d, _ in values]), np.array([e for _, e in values])
        print(f"  {splits} halvings, {rule} rule: drop mean {drops.mean():+.2f}, median {np.median(drops):+.2f}, "
              f"above 1 point in {int((drops > 1).sum())}; mean exit {exits.mean():.2f}")


def cross_validated_confidence(outputs, gold, fn, L: int, confidences, folds: int = 5, tolerance: float = 0.01):
    """The lowest bootstrap confidence whose rule, fitted on ``folds - 1`` folds, drops at most
    ``tolerance`` on the records left out (predictions pooled over the folds); else the highest."""
    from epee.calibration import choose_robust, simulate, sweep
    from epee.config import ExitPolicyConfig
    from epee.policies import ExitPolicy

    n = outputs.num_samples
    order = list(range(n))
    random.Random(0).shuffle(order)
    fold_of = {i: k % folds for k, i in enumerate(order)}
    full = simulate(outputs, ExitPolicy(ExitPolicyConfig(kind="none"), L)).predictions
    for confidence in confidences:
        pooled = [None] * n
        for f in range(folds):
            fit = [i for i in range(n) if fold_of[i] != f]
            left_out = [i for i in range(n) if fold_of[i] == f]
            o, g = subset(outputs, fit), [gold[i] for i in fit]
            point = choose_robust(o, sweep(o, lambda p: fn(g, p), L), g, fn, tolerance, "epee",
                                  confidence=confidence).point
            for i, pred in zip(left_out, simulate(subset(outputs, left_out), ExitPolicy(point.policy_config(), L)).predictions):
                pooled[i] = pred
        if fn(gold, full) - fn(gold, pooled) <= tolerance + 1e-12:
            return confidence
    return confidences[-1]


def model_based_choice(outputs, points, gold, tolerance: float):
    """Sequence classification (accuracy) only: the fastest EPEE setting whose expected accuracy drop, taking the last
    head's probabilities (temperature-scaled on ``gold``) as the truth, is at most ``tolerance``:
    mean over records of q(full-depth label) - q(exit label). Label noise does not enter the
    comparison of settings; the last head's calibration does. Else the deepest setting."""
    import torch

    from epee.calibration import _speed_first, simulate
    from epee.config import ExitPolicyConfig
    from epee.policies import ExitPolicy

    L, n = outputs.num_layers, outputs.num_samples
    q = outputs.probs[L - 1]
    q = torch.softmax(torch.log(q.clamp_min(1e-12)) / fit_temperature(q, gold, None), dim=-1)
    rows = torch.arange(n)
    q_full = q[rows, torch.tensor(simulate(outputs, ExitPolicy(ExitPolicyConfig(kind="none"), L)).predictions)]
    pool = [p for p in points if p.kind == "epee"]
    for p in sorted(pool, key=_speed_first):
        preds = torch.tensor(simulate(outputs, ExitPolicy(p.policy_config(), L)).predictions)
        if float((q_full - q[rows, preds]).mean()) <= tolerance + 1e-12:
            return p
    return max(pool, key=lambda p: p.mean_exit_layer)


def fixed_sequence(outputs, points, gold, fn, tolerance: float, confidence: float, resamples: int = 200):
    """Fixed-sequence testing: EPEE settings from deepest to fastest mean exit (an order that uses no
    labels), each tested by the paired bootstrap of ``choose_robust``; the last one before the first
    failure. None if even the deepest fails."""
    from epee.calibration import simulate
    from epee.config import ExitPolicyConfig
    from epee.policies import ExitPolicy

    L, n = outputs.num_layers, outputs.num_samples
    full = simulate(outputs, ExitPolicy(ExitPolicyConfig(kind="none"), L)).predictions
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, n, size=n) for _ in range(resamples)]
    full_scores = np.array([fn([gold[i] for i in d], [full[i] for i in d]) for d in draws])
    chosen, quantiles = None, {}
    for p in sorted((p for p in points if p.kind == "epee"), key=lambda p: (-p.mean_exit_layer, -p.score)):
        run = simulate(outputs, ExitPolicy(p.policy_config(), L))
        key = tuple(run.exit_layers)
        if key not in quantiles:
            drops = full_scores - np.array([fn([gold[i] for i in d], [run.predictions[i] for i in d]) for d in draws])
            quantiles[key] = float(np.quantile(drops, confidence))
        if quantiles[key] > tolerance + 1e-12:
            break
        chosen = p
    return chosen


def fit_temperature(probs, gold, token_mask) -> float:
    """The temperature T minimising the NLL of softmax(log(probs) / T) on the gold labels (grid search)."""
    import torch

    logp = torch.log(probs.clamp_min(1e-12))
    if token_mask is None:
        target, keep = torch.tensor(gold), torch.ones(len(gold), dtype=torch.bool)
    else:
        target = torch.zeros(token_mask.shape, dtype=torch.long)
        for i, g in enumerate(gold):
            target[i, : min(len(g), target.shape[1])] = torch.tensor(g[: target.shape[1]])
        target, keep = target.reshape(-1), token_mask.reshape(-1)
    logp = logp.reshape(-1, logp.shape[-1])[keep]
    grid = np.exp(np.linspace(np.log(0.3), np.log(8.0), 60))
    nll = [torch.nn.functional.cross_entropy(logp / t, target[keep]).item() for t in grid]
    return float(grid[int(np.argmin(nll))])


def tempered_outputs(outputs, temps):
    import torch

    from epee.calibration import LayerOutputs

    probs = [torch.softmax(torch.log(p.clamp_min(1e-12)) / t, dim=-1) for p, t in zip(outputs.probs, temps)]
    return LayerOutputs(probs, outputs.token_mask, outputs.lengths)


if __name__ == "__main__":
    main()
