"""Two-step layers (``EngineConfig.split_layers``) against whole layers, in the engine. Not a test.

Where the exit heads read a few positions ([CLS], GPT-2's last token, a relation's two entity
markers), the engine runs each layer where rows may exit at those positions first, over every
token's keys and values, and the rest of the layer only for the rows that go on: a row pays its
exit layer's keys and values (2 of BERT's 6 token-wise matrices of H x H size units: about a sixth
of the layer), not the whole layer. For each model directory this times the engine on its test half
(as ``bench.run_all`` splits it) with splitting on and off, alternating rounds, under the stored
policy and at full depth (policy ``none``: only the last layer splits), and checks that both give
the same exit layers and labels. Models whose heads read every token (mean pooling, token tasks)
run whole either way; they are listed as a control.

    .venv/bin/python -m bench.split_layers --models models/ddi models/chemprot --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from bench.common import machine


def rounds(model, samples, policy, reps: int, batch_size: int) -> dict:
    from epee import EarlyExitEngine, EngineConfig

    rates: dict[bool, list[float]] = {True: [], False: []}
    outcome, stats = {}, {}
    EarlyExitEngine(model, EngineConfig(batch_size=batch_size)).run(samples[:64], policy)  # warm-up
    for _ in range(reps):
        for split in (True, False):
            engine = EarlyExitEngine(model, EngineConfig(batch_size=batch_size, split_layers=split))
            t0 = time.perf_counter()
            result = engine.run(samples, policy)
            rates[split].append(len(samples) / (time.perf_counter() - t0))
            outcome[split] = [(q.exit_layer, q.label, q.token_labels) for q in result.predictions]
            stats[split] = result.stats
    same = sum(a == b for a, b in zip(outcome[True], outcome[False]))
    return {"rates": rates, "same": same, "stats": stats}


def main(argv: list[str] | None = None) -> None:
    from bench.common import encode_examples, halves
    from bench.run_all import held_out
    from epee import ExitPolicy
    from epee.config import ExitPolicyConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["models/ddi", "models/chemprot", "models/pneumoniamnist",
                                                   "models/medical_abstracts"])
    p.add_argument("--reps", type=int, default=3, help="rounds, alternating split and whole layers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-test", type=int, default=500)
    args = p.parse_args(argv)
    print(f"{machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; engine batch {args.batch_size}\n")
    print("| model | policy | records | mean exit layer | layer calls in two steps | split records/s per round | "
          "whole records/s per round | split / whole (medians) | MACs split / whole | same exit and label |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_dir in args.models:
        bundle, examples = held_out(model_dir)
        samples = encode_examples(bundle, halves(examples)[1][: args.max_test])[0]
        model = bundle.model
        stored = ExitPolicy(model.config.policy, model.num_layers)
        full = ExitPolicy(ExitPolicyConfig(kind="none"), model.num_layers)
        for name, policy in (("stored", stored), ("none", full)):
            r = rounds(model, samples, policy, args.reps, args.batch_size)
            s, w = statistics.median(r["rates"][True]), statistics.median(r["rates"][False])
            macs = r["stats"][True].macs / r["stats"][False].macs
            print(f"| {model_dir} | {name} | {len(samples)} | {r['stats'][True].mean_exit_layer:.2f} | "
                  f"{r['stats'][True].two_step_calls}/{r['stats'][True].layer_calls} | {' '.join(f'{x:.1f}' for x in r['rates'][True])} | "
                  f"{' '.join(f'{x:.1f}' for x in r['rates'][False])} | {s / w:.2f}x | {macs:.3f} | "
                  f"{r['same']}/{len(samples)} |", flush=True)


if __name__ == "__main__":
    main()
