"""Continuous batching in the pipeline (``--regroup bundle``, the default) against Beam's
RunInference batches (``--regroup batch``), and short runs against Beam's stock PyTorch handler.

For each run size (the corpus' dev records repeated with new ids up to that size): records/s of
the notes pipeline at full depth and with its stored EPEE policy in both regroup modes, the batch
fill per layer of each (rows per layer call over the engine batch, from the run's counters), and
Beam's stock handler at full depth (``--stock-batch-size``, 64: its best) on the same records.

    .venv/bin/python -m bench.regroup --model models/medical_abstracts --sizes 200 500 2000

A run's wall time includes everything a nightly job pays: Beam start-up, model load, Parquet
commit, manifest and report. ``--repeats`` runs each system that many times (median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def inputs(examples, size: int, work: Path) -> str:
    """``size`` records from ``examples`` (repeated with new ids) as JSON lines."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"notes_{size}.jsonl"
    with open(path, "w") as f:
        for i in range(size):
            f.write(json.dumps({"id": f"r{i:06d}", "text": examples[i % len(examples)].text}) + "\n")
    return str(path)


def ours(model_dir: str, glob: str, out: Path, regroup: str, policy: list[str]) -> tuple[float, dict]:
    from pipelines.common import run

    t0 = time.perf_counter()
    summary = run("notes", ["--model", model_dir, "--input", glob, "--output", str(out), "--id_field", "id",
                            "--max_windows", "1", "--regroup", regroup, *policy])
    return time.perf_counter() - t0, summary


def main(argv: list[str] | None = None) -> None:
    from bench.common import machine, run_stock, write_result
    from epee.workflows import dev_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 500, 2000])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--stock-batch-size", type=int, default=64)
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args(argv)
    result = {"model": args.model, "machine": machine(), "sizes": {}}
    _, examples, _ = dev_set(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size in args.sizes:
            glob = inputs(examples, size, work / "in")
            row: dict = {}
            systems = {f"{kind}_{mode}": (mode, pol) for kind, pol in (("full", ["--exit_policy", "none"]), ("epee", []))
                       for mode in ("batch", "bundle")}
            for name, (mode, pol) in systems.items():
                times, summary = [], {}
                for k in range(args.repeats):
                    secs, summary = ours(args.model, glob, work / f"out_{size}_{name}_{k}", mode, pol)
                    times.append(secs)
                row[name] = {"records_per_s": size / statistics.median(times),
                             "batch_fill_per_layer": summary.get("batch_fill_per_layer"),
                             "mean_exit_layer": summary.get("mean_exit_layer"),
                             "predictions": summary.get("predictions")}
                print(f"{size} {name}: {row[name]['records_per_s']:.1f} records/s, fill "
                      f"{row[name]['batch_fill_per_layer']}", file=sys.stderr, flush=True)
            times = [run_stock(glob, args.model, str(work / f"stock_{size}_{k}"), args.stock_batch_size, False)
                     for k in range(args.repeats)]
            row["beam_stock_full"] = {"records_per_s": size / statistics.median(times)}
            print(f"{size} beam_stock_full: {row['beam_stock_full']['records_per_s']:.1f} records/s", file=sys.stderr,
                  flush=True)
            result["sizes"][str(size)] = row
    write_result(result, args.json)


if __name__ == "__main__":
    main()
