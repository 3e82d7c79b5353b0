"""What tokenising costs per record, whole notes against only the windows kept. Not a test.

``Prepare`` with ``--max_windows N`` (``bench.run_all`` runs with 1, the same 128 tokens the stock
handler sees) asks :meth:`TextPreprocessor.first_windows` for a note's first N windows, which
tokenises only as much of a long note as they need (where the tokenizer allows it, see
``epee.encoding.prefix_safe``); ``encode_windows`` tokenises the whole note. This times both, and
the truncating ``encode`` that training, calibration and evaluation use, on one corpus' held-out
texts, alternating over ``--reps`` rounds; it also checks that the windows are the same.

    .venv/bin/python -m bench.tokenise --corpus medical_abstracts
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.common import add_text_corpus_arguments, machine


def main(argv: list[str] | None = None) -> None:
    from bench.run_all import held_out
    from epee.encoding import prefix_safe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_corpus_arguments(p, default="medical_abstracts")
    p.add_argument("--max-windows", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    bundle, examples = held_out(os.path.join(args.models, args.corpus))
    pre = bundle.preprocessor
    if not hasattr(pre, "first_windows"):
        raise SystemExit(f"{args.corpus}'s model does not take text")
    n = args.max_windows
    ways = {
        "encode_windows (whole note), first N kept": lambda ex: pre.encode_windows(ex)[:n],
        f"first_windows(N={n})": lambda ex: pre.first_windows(ex, 0.25, n)[0],
        "encode (truncating)": lambda ex: [pre.encode(ex)],
    }
    ids = {name: [[w.sample.input_ids.tolist() for w in fn(ex)] for ex in examples] for name, fn in ways.items()}
    same = ids["encode_windows (whole note), first N kept"] == ids[f"first_windows(N={n})"]
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.reps):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            for ex in examples:
                fn(ex)
            times[name].append((time.perf_counter() - t0) / len(examples) * 1e6)
    chars = sum(len(ex.text or "") for ex in examples) / len(examples)
    print(f"{args.corpus}: {len(examples)} held-out records, mean {chars:.0f} characters; prefix-safe tokenizer: "
          f"{prefix_safe(pre.tokenizer)}; {machine()}; {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| tokenisation | us per record, per round | median |")
    print("|---|---|---|")
    for name, v in times.items():
        print(f"| {name} | {' '.join(f'{x:.0f}' for x in v)} | {statistics.median(v):.0f} |")
    print(f"\nfirst_windows gave the same windows as encode_windows: {same}")


if __name__ == "__main__":
    main()
