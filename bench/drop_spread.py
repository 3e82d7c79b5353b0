"""How much of a measured EPEE score drop is the test sample's noise? Not a test.

``bench.run_all`` measures each corpus on at most ``--max-test`` records of its test half. For one
corpus this takes the EPEE setting that run recorded (``docs/benchmarks.json``), simulates it and
full depth on the whole test half (same seeded split as run_all), and prints the drop in points
there, its paired-bootstrap 90% interval, and the spread of the drop over random subsets of the
size run_all measured:

    .venv/bin/python -m bench.drop_spread --only chemprot
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
    args = p.parse_args(argv)

    from bench.run_all import held_out
    from epee.calibration import collect_layer_outputs, simulate
    from epee.cli import score_function
    from epee.config import ExitPolicyConfig
    from epee.policies import ExitPolicy

    recorded = json.loads((Path(args.docs) / "benchmarks.json").read_text())[args.only]
    setting = recorded["policies"]["epee"]["setting"]
    bundle, examples = held_out(str(Path(args.models) / args.only))
    model = bundle.model
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)  # run_all's split: calibration = order[0::2], test = order[1::2]
    samples, gold = [], []
    for ex in (examples[i] for i in order[1::2]):
        try:
            enc = bundle.preprocessor.encode(ex)
        except ValueError:
            continue
        samples.append(enc.sample)
        gold.append(enc.target.tolist() if hasattr(enc.target, "tolist") else enc.target)
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


if __name__ == "__main__":
    main()
