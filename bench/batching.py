"""What the RunInference batch size is worth to each Beam system, on one real corpus. Not a test.

The engine regroups the samples still running only inside one engine call, and our handler makes
one call per RunInference batch: a small batch leaves half-empty layer calls after the first
exits. Beam's stock handler runs every record through every layer, so its batch size only changes
the size of its matrix products. This script times both on the same input, the test half that
``bench.run_all`` measures on, repeated ``--repeat`` times (steady state), for each batch size
(min = max), alternating the sizes within each of ``--reps`` rounds so drifts in the machine's
speed spread over all of them. Our pipeline runs with the exit policy calibrated and stored in the
model directory (what a user gets). It prints one row per system and batch size: records/s in
each round, and their median.

    .venv/bin/python -m bench.batching --corpus ddi
    .venv/bin/python -m bench.batching --corpus medical_abstracts --ours 64 512 --stock 64 --reps 3
    .venv/bin/python -m bench.batching --corpus medical_abstracts --ours 512 --stock 64 --linear-kernels aten onednn
    .venv/bin/python -m bench.batching --corpus medical_abstracts --ours 512 --stock 64 --precisions float32 int8
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.common import add_text_corpus_arguments, machine


def main(argv: list[str] | None = None) -> None:
    from bench.common import CORPORA, run_stock, time_our_pipeline
    from bench.run_all import text_steady_inputs
    from epee.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_corpus_arguments(p, default="ddi")
    p.add_argument("--max-test", type=int, default=500, help="records of the test half (at most), as in run_all")
    p.add_argument("--repeat", type=int, default=4, help="the test half this many times over")
    p.add_argument("--ours", type=int, nargs="+", default=[64, 256, 512], help="our pipeline's batch sizes")
    p.add_argument("--stock", type=int, nargs="+", default=[32, 64, 256, 512], help="the stock handler's batch sizes")
    p.add_argument("--reps", type=int, default=2, help="rounds over every batch size")
    p.add_argument("--linear-kernels", nargs="+", default=["auto"], choices=["auto", "aten", "onednn"],
                   help="our pipeline with each of these --linear_kernel values (epee/kernels.py)")
    p.add_argument("--precisions", nargs="+", default=["float32"], choices=PRECISIONS,
                   help="our pipeline in each of these --precision values (the stock handler stays float32)")
    args = p.parse_args(argv)
    import logging

    import torch

    logging.basicConfig(level=logging.ERROR)
    model_dir = str(Path(args.models) / args.corpus)
    if not (Path(model_dir) / "epee_config.json").is_file():
        raise SystemExit(f"no model in {model_dir}: .venv/bin/python -m bench.real_models --only {args.corpus}")
    work = Path(tempfile.mkdtemp(prefix="epee-batching-"))
    glob, n = text_steady_inputs(model_dir, work, args.max_test, args.repeat)
    pipeline = CORPORA[args.corpus][0]

    def ours(b: int, out: Path, kernel: str = "auto", precision: str = "float32") -> float:
        return n / time_our_pipeline(pipeline, model_dir, glob, out, b, "--linear_kernel", kernel,
                                     "--precision", precision)

    def stock(b: int, out: Path) -> float:
        return n / run_stock(glob, model_dir, str(out), b, False)

    ours(64, work / "warm-ours")  # the first run in a process pays for imports and allocator growth
    stock(64, work / "warm-stock")
    rates: dict[tuple[str, int], list[float]] = {}
    systems = [(f"our pipeline (stored EPEE policy, --linear_kernel {k}"
                + (f", --precision {prec})" if prec != "float32" else ")"),
                functools.partial(ours, kernel=k, precision=prec), args.ours)
               for k in args.linear_kernels for prec in args.precisions] + [("Beam stock (full depth)", stock, args.stock)]
    for r in range(args.reps):
        for i, (system, fn, sizes) in enumerate(systems):
            for b in sizes:
                rates.setdefault((system, b), []).append(fn(b, work / f"{r}-{i}-{b}"))
    print(f"\n{args.corpus}: test half x {args.repeat} = {n} records; {machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}\n")
    base = rates[("Beam stock (full depth)", args.stock[0])]
    print(f"| system | RunInference batch (min = max) | records/s per round | median | vs Beam stock at {args.stock[0]}, "
          "per round (same round) |")
    print("|---|---|---|---|---|")
    for (system, b), v in rates.items():
        print(f"| {system} | {b} | {' '.join(f'{x:.1f}' for x in v)} | {statistics.median(v):.1f} | "
              f"{' '.join(f'{x / y:.2f}x' for x, y in zip(v, base))} |")


if __name__ == "__main__":
    main()
