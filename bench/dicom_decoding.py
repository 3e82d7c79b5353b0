"""The DICOM pipeline's decoding: pipelined child processes against in-process decoding and Beam's
stock RunInference. Not a test.

Writes PneumoniaMNIST's test half (as ``bench.run_all`` splits it) as DICOM files, copies them to
``--files`` files, and times, in alternating rounds after one warm-up run each, our DICOM pipeline
(stored EPEE policy, RunInference batch 512) with 1 and 2 decoder processes (``--decode_processes``)
and with decoding in the worker itself (``--decode_timeout 0``: no protection against a hanging
decoder), and Beam's stock ``RunInference`` at full depth, which decodes in its DoFn as a Beam user
would write it. Prints records/s per system and round, the median, and the ratio to Beam stock;
checks that every system gave one prediction per file.

``--source DIR`` takes the files of DIR instead (e.g. ``../shared/data/dicom``: real CT, MR and
X-ray files in compressed transfer syntaxes, some of them non-image objects that become dead
letters). Beam stock is left out there: it has no dead-letter path and stops at the first bad
file. Every run must then give one prediction or dead letter per file.

    .venv/bin/python -m bench.dicom_decoding --files 8640 --rounds 3
    .venv/bin/python -m bench.dicom_decoding --source ../shared/data/dicom --files 660 --rounds 3
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench import machine

SYSTEMS = {"ours, 1 decoder process": ["--decode_processes", "1"],
           "ours, 2 decoder processes": ["--decode_processes", "2"],
           "ours, decoding in the worker (--decode_timeout 0)": ["--decode_timeout", "0"],
           "beam_stock": None}


def records(out: Path) -> int:
    """Predictions and dead letters a run wrote (Beam stock writes predictions only)."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in out.rglob("*.parquet")
               if f.name.startswith(("predictions-", "dead_letters-", "stock")))


def main(argv: list[str] | None = None) -> None:
    from bench.run_all import halves, held_out, run_stock, time_our_pipeline, write_inputs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/pneumoniamnist")
    p.add_argument("--files", type=int, default=8640, help="DICOM files per run (copies of the test half)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--source", help="a folder of DICOM files to copy instead of PneumoniaMNIST's test half")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="epee-dicom-decoding-"))
    if args.source:
        files = sorted(f for f in Path(args.source).rglob("*") if f.is_file())
        systems = {k: v for k, v in SYSTEMS.items() if v is not None}
        what = f"{len(files)} distinct files of {args.source}"
    else:
        bundle, examples = held_out(args.model)
        glob, _ = write_inputs(bundle, halves(examples)[1], work / "half")
        files = sorted(Path(glob).parent.glob("*.dcm"))
        systems = SYSTEMS
        what = f"{len(files)} distinct PneumoniaMNIST images (28 x 28, 8 bit)"
    (work / "in").mkdir()
    for k in range(args.files):
        shutil.copyfile(files[k % len(files)], work / "in" / f"{k:06d}.dcm")
    pattern = str(work / "in" / "*.dcm")

    runs = itertools.count()

    def once(name: str, extra: list[str] | None, tag: str) -> float:
        out = work / "out" / f"run{next(runs)}"
        if extra is None:
            secs = run_stock(pattern, args.model, str(out), 64, True)
        else:
            secs = time_our_pipeline("dicom", args.model, pattern, out, 512, *extra)
        got = records(out)
        if got != args.files:
            raise SystemExit(f"{name} ({tag}): {got} predictions and dead letters for {args.files} files")
        shutil.rmtree(out)
        return args.files / secs

    print(f"{args.files} DICOM files, copies of {what}; {machine()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for name, extra in systems.items():
        once(name, extra, "warm-up")
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, extra in systems.items():
            rates[name].append(once(name, extra, f"round {r + 1}"))
        print(f"round {r + 1}: " + ", ".join(f"{name} {rates[name][-1]:.1f}" for name in systems), flush=True)
    base = "beam_stock" if "beam_stock" in rates else next(iter(rates))
    print(f"\n| system | records/s (median) | rounds | vs {base} |\n|---|---|---|---|")
    for name, rs in rates.items():
        print(f"| {name} | {statistics.median(rs):.1f} | {' / '.join(f'{x:.0f}' for x in rs)} | "
              f"{statistics.median(rs) / statistics.median(rates[base]):.2f}x |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
