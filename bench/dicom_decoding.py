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

``--workers N`` runs our systems on the DirectRunner in ``multi_threading`` mode with N workers:
N bundle-processing threads in one process; reading DoFn instances in several of them share one
decoder pool (``transforms.decode_worker.SharedDecoders``). Each run's peak number of live child processes (the
decoders, and any other program the run starts for a moment) and
their peak summed resident memory are sampled from ``/proc`` every 20 ms and printed beside its
speed (children that have not yet exec'd a program of their own are left out).

    .venv/bin/python -m bench.dicom_decoding --files 8640 --rounds 3
    .venv/bin/python -m bench.dicom_decoding --files 8640 --rounds 3 --workers 2
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
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.common import machine
from bench.scaling import _descendants, _rss_mib

SYSTEMS = {"ours, 1 decoder process": ["--decode_processes", "1"],
           "ours, 2 decoder processes": ["--decode_processes", "2"],
           "ours, decoding in the worker (--decode_timeout 0)": ["--decode_timeout", "0"],
           "beam_stock": None}


def records(out: Path) -> int:
    """Predictions and dead letters a run wrote (Beam stock writes predictions only)."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in out.rglob("*.parquet")
               if f.name.startswith(("predictions-", "dead_letters-", "stock")))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class ChildSampler:
    """Peak count and peak summed resident memory of this process' children while it runs."""

    def __init__(self, every_s: float = 0.02):
        self.every_s, self.peak_children, self.peak_rss_mib = every_s, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        own = _cmdline(os.getpid())
        while not self._stop.is_set():
            # a child between fork and exec (or a zombie) still shows this process' command line (or
            # none) and counts this process' shared pages as its own: not a decoder, left out
            kids = [k for k in _descendants(os.getpid()) if _cmdline(k) not in (b"", own)]
            self.peak_children = max(self.peak_children, len(kids))
            self.peak_rss_mib = max(self.peak_rss_mib, sum(_rss_mib(k) or 0.0 for k in kids))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "ChildSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> None:
    from bench.common import halves, run_stock, time_our_pipeline, write_inputs
    from bench.run_all import held_out

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/pneumoniamnist")
    p.add_argument("--files", type=int, default=8640, help="DICOM files per run (copies of the test half)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--source", help="a folder of DICOM files to copy instead of PneumoniaMNIST's test half")
    p.add_argument("--workers", type=int, default=0,
                   help="run our systems on the DirectRunner in multi_threading mode with this many workers")
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
    threads = (["--direct_running_mode", "multi_threading", "--direct_num_workers", str(args.workers)]
               if args.workers else [])
    children: dict[str, list[tuple[int, float]]] = {name: [] for name in systems}

    def once(name: str, extra: list[str] | None, tag: str) -> float:
        out = work / "out" / f"run{next(runs)}"
        with ChildSampler() as sampler:
            if extra is None:
                secs = run_stock(pattern, args.model, str(out), 64, True)
            else:
                secs = time_our_pipeline("dicom", args.model, pattern, out, 512, *extra, *threads)
        children[name].append((sampler.peak_children, sampler.peak_rss_mib))
        got = records(out)
        if got != args.files:
            raise SystemExit(f"{name} ({tag}): {got} predictions and dead letters for {args.files} files")
        shutil.rmtree(out)
        return args.files / secs

    print(f"{args.files} DICOM files, copies of {what}; {machine()}; "
          f"{'multi_threading DirectRunner, ' + str(args.workers) + ' workers (ours); ' if args.workers else ''}"
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for name, extra in systems.items():
        once(name, extra, "warm-up")
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, extra in systems.items():
            rates[name].append(once(name, extra, f"round {r + 1}"))
        print(f"round {r + 1}: " + ", ".join(f"{name} {rates[name][-1]:.1f}" for name in systems), flush=True)
    base = "beam_stock" if "beam_stock" in rates else next(iter(rates))
    print(f"\n| system | records/s (median) | rounds | vs {base} | peak child processes | "
          f"peak children's memory (MiB) |\n|---|---|---|---|---|---|")
    for name, rs in rates.items():
        kids = children[name][1:]  # the timed rounds, not the warm-up
        print(f"| {name} | {statistics.median(rs):.1f} | {' / '.join(f'{x:.0f}' for x in rs)} | "
              f"{statistics.median(rs) / statistics.median(rates[base]):.2f}x | {max(k for k, _ in kids)} | "
              f"{max(m for _, m in kids):.0f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
