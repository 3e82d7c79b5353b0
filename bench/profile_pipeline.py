"""Where our pipeline's time goes on one corpus: cProfile of one run. Not a test.

Runs our pipeline (stored EPEE policy, RunInference batch 512, ``--max_windows 1``) on the test
half that ``bench.run_all`` measures, repeated ``--repeat`` times, once to warm up and once under
cProfile; prints the functions that took the most time themselves and a few named costs (the
linear layers, attention, tokenising, pickling, the report). cProfile adds its own overhead to
Python calls, so the profiled run is slower than an unprofiled one (both are printed).

    .venv/bin/python -m bench.profile_pipeline --corpus medical_abstracts --repeat 10
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.common import add_text_corpus_arguments, machine

# (label, substring of pstats' function key, whether to take its cumulative time rather than its own)
NAMED = [("linear layers (oneDNN)", "mkldnn._linear_pointwise", False),
         ("linear layers (PyTorch)", "torch._C._nn.linear", False),
         ("attention (SDPA)", "scaled_dot_product_attention", False), ("tokenising (Rust)", "'encode_batch' of", False),
         ("layer norm", "torch.layer_norm", False), ("pickling samples", "_pickle.dumps", True),
         ("run report", "write_report", True)]


def main(argv: list[str] | None = None) -> None:
    from bench.common import CORPORA, time_our_pipeline
    from bench.run_all import text_steady_inputs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_corpus_arguments(p, default="medical_abstracts")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    model_dir = str(Path(args.models) / args.corpus)
    work = Path(tempfile.mkdtemp(prefix="epee-profile-"))
    glob, n = text_steady_inputs(model_dir, work, 500, args.repeat)

    def ours(out: Path) -> float:
        return time_our_pipeline(CORPORA[args.corpus][0], model_dir, glob, out, 512)

    plain = ours(work / "warm")
    profiler = cProfile.Profile()
    profiler.enable()
    profiled = ours(work / "profiled")
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"{args.corpus}: {n} records; {machine()}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"unprofiled (warm-up) run {plain:.1f} s ({n / plain:.1f} records/s); profiled run {profiled:.1f} s\n")
    rows = {}
    for (file, line, name), (_, _, tottime, cumtime, _) in stats.stats.items():
        rows[f"{file}:{line}({name})"] = (tottime, cumtime)
    print("| named cost | seconds | share of the profiled run |")
    print("|---|---|---|")
    for label, key, cumulative in NAMED:
        hits = [v for k, v in rows.items() if key in k]
        if hits:
            secs = max(c for _, c in hits) if cumulative else sum(t for t, _ in hits)
            print(f"| {label} | {secs:.2f} | {100 * secs / profiled:.1f}% |")
    print()
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
