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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", required=True, help="corpus name, as in docs/benchmarks.json")
    p.add_argument("--models", default="models")
    p.add_argument("--docs", default="docs")
    p.add_argument("--resamples", type=int, default=300)
    p.add_argument("--confidences", type=float, nargs="*", default=[],
                   help="also calibrate on the calibration half at these bootstrap confidences")
    args = p.parse_args(argv)

    from bench.run_all import encode_examples, held_out
    from epee.calibration import choose_robust, collect_layer_outputs, simulate, sweep
    from epee.cli import score_function
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
    outputs = collect_layer_outputs(model, samples)
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

    if args.confidences:
        c_samples, c_gold = encoded(order[0::2])
        c_outputs = collect_layer_outputs(model, c_samples)
        points = sweep(c_outputs, lambda p: fn(c_gold, p), L)
        c_full = next(p for p in points if p.kind == "none").score
        for confidence in args.confidences:
            r = choose_robust(c_outputs, points, c_gold, fn, 0.01, "epee", confidence=confidence)
            test_run = simulate(outputs, ExitPolicy(r.point.policy_config(), L))
            print(f"  confidence {confidence}: τ={r.point.entropy_threshold:.3g} P={r.point.patience}; calibration half "
                  f"({len(c_samples)}): drop {100 * (c_full - r.point.score):+.2f} at {r.point.mean_exit_layer:.2f} layers "
                  f"({r.candidates_tested} settings tested); whole test half: drop "
                  f"{100 * (fn(gold, full) - fn(gold, test_run.predictions)):+.2f} at {test_run.mean_exit_layer:.2f} layers")


if __name__ == "__main__":
    main()
