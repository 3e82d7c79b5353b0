"""Scaling: throughput and peak memory of the notes pipeline for 1k, 10k and 100k notes, with 1
and 2 workers, on the DirectRunner (``--runner direct``: 2 workers = multi_processing) or on a
real Dask cluster (``--runner dask``: a scheduler and W single-threaded worker processes started
by scripts/dask_cluster.sh for each W, each worker running the model with cores/W PyTorch
threads). Not a test; prints one JSON line per run and a table.

Notes are generated (``pipelines.sample_data``) with a realistic, long-tailed length: each note
joins a log-normal number of generated sentences (median 6, 1% above about 60), so some notes
span several 128-token windows. They are written as 20 JSONL files, as a nightly archive would
be. Each run is a fresh process; memory is its peak RSS (and, with 2 worker processes, the largest
worker's). The archive is never held in memory: JSONL is streamed per file, and the sorted Parquet
shards are written by an external merge sort (runs of at most 20,000 rows spilled to temporary
files, then merged), so no step holds more than one run of prediction rows.

Peaks alone cannot tell growth from a run's spread, so on Linux each run's resident memory is also
sampled every ``--sample-seconds`` from ``/proc`` (the driver and every process below it) and
reported per tenth of the run (``rss_by_tenth``: the driver's and the largest worker's largest
sample in each tenth of the wall time). A streaming job's curve rises while the model loads and then
stays level; one that holds the archive keeps climbing to the end.

    .venv/bin/python -m bench.scaling                       # 1k, 10k, 100k x 1, 2 workers
    .venv/bin/python -m bench.scaling --sizes 1000 10000
    .venv/bin/python -m bench.scaling --runner dask --workers 1 2

``records_per_s_per_core`` divides by the cores a run can use (workers x PyTorch threads, at most
the machine's): on 2 cores, two workers with one thread each cannot beat one worker using both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine

CHILD = r"""
import json, resource, sys, time
from pipelines.common import run
t0 = time.perf_counter()
s = run("notes", sys.argv[1:])
print(json.dumps({"seconds": time.perf_counter() - t0, "records": s["records"], "predictions": s["predictions"],
                  "dead_letters": s["dead_letters"], "mean_exit_layer": s["mean_exit_layer"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "largest_child_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def _rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A process's resident size now (``VmRSS``) or its peak so far (``VmHWM``), MiB."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def sample_rss(proc: subprocess.Popen, every: float, roots: tuple[int, ...] = (),
               peaks: dict[int, float] | None = None) -> list[tuple[float, float, float]]:
    """(seconds since start, driver MiB, largest worker MiB) every ``every`` s until ``proc`` ends.
    Workers: the processes below ``proc`` and below each of ``roots`` (a Dask worker's nanny);
    ``peaks`` collects each worker process's largest sample."""
    samples, t0 = [], time.perf_counter()
    while proc.poll() is None:
        driver = _rss_mib(proc.pid)
        pids = _descendants(proc.pid) + [c for r in roots for c in _descendants(r)]
        workers = {pid: m for pid in pids if (m := _rss_mib(pid)) is not None}
        if peaks is not None:
            for pid, m in workers.items():
                peaks[pid] = max(peaks.get(pid, 0.0), m)
        if driver is not None:
            samples.append((time.perf_counter() - t0, driver, max(workers.values(), default=0.0)))
        time.sleep(every)
    return samples


@contextlib.contextmanager
def dask_cluster(workers: int):
    """A scheduler and ``workers`` single-threaded worker processes (scripts/dask_cluster.sh);
    yields (address, the workers' nanny pids)."""
    root = Path(__file__).resolve().parent.parent
    directory = Path(tempfile.mkdtemp(prefix="epee-scaling-dask-"))
    env = {**os.environ, "EPEE_DASK_DIR": str(directory)}
    address = subprocess.run([str(root / "scripts" / "dask_cluster.sh"), "start", str(workers)], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
    try:
        yield address, tuple(int(p.read_text()) for p in sorted(directory.glob("worker-*.pid")))
    finally:
        subprocess.run([str(root / "scripts" / "dask_cluster.sh"), "stop"], env=env, check=False)


def by_tenth(samples: list[tuple[float, float, float]]) -> list[list[float]]:
    """[driver MiB, largest worker MiB] per tenth of the run: the largest sample in each tenth."""
    if not samples:
        return []
    end = samples[-1][0] or 1.0
    tenths: list[list[float]] = [[0.0, 0.0] for _ in range(10)]
    for t, driver, worker in samples:
        k = min(int(10 * t / end), 9)
        tenths[k] = [max(tenths[k][0], driver), max(tenths[k][1], worker)]
    return [[round(d), round(w)] for d, w in tenths]


def write_archive(n: int, d: Path, files: int = 20, seed: int = 5) -> dict:
    from pipelines.sample_data import generate_notes

    d.mkdir(parents=True)
    rng = random.Random(seed)
    pool = [note.text for note in generate_notes(5000, seed=seed)]
    handles = [open(d / f"part-{i:03d}.jsonl", "w") for i in range(files)]
    words = 0
    for i in range(n):
        k = max(1, int(rng.lognormvariate(1.8, 0.9)))
        text = " ".join(rng.choice(pool) for _ in range(k))
        words += len(text.split())
        handles[i % files].write(json.dumps({"id": f"n{i}", "text": text}) + "\n")
    for h in handles:
        h.close()
    return {"notes": n, "mean_words": round(words / n, 1), "bytes": sum(p.stat().st_size for p in d.iterdir())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runner", choices=["direct", "dask"], default="direct",
                   help="direct: the DirectRunner (2+ workers: multi_processing); dask: a local Dask cluster of "
                        "that many single-threaded worker processes, --torch_threads cores/W each")
    p.add_argument("--model", help="model directory (default: the sample notes model)")
    p.add_argument("--sample-seconds", type=float, default=2.0, help="RSS sampling period (Linux /proc)")
    p.add_argument("--docs", default="docs", help="writes scaling.json there and re-renders benchmarks.md")
    p.add_argument("--pipeline-arg", action="append", default=[], metavar="ARG",
                   help="extra notes-pipeline argument, repeatable (e.g. --pipeline-arg=--heap_trim_seconds=0); "
                        "recorded in each row: write experiments to another --docs")
    args = p.parse_args(argv)
    from pipelines.sample_job import ensure_models

    model = str(Path(args.model or ensure_models()[0]).resolve())
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="epee-scaling-"))
    rows = []
    for n in args.sizes:
        archive = write_archive(n, work / f"in_{n}")
        for w in args.workers:
            threads = max(1, cores // w)
            if args.runner == "dask":
                cluster = dask_cluster(w)
                address, roots = cluster.__enter__()
                mode = ["--runner", "DaskRunner", "--dask_client_address", address, "--torch_threads", str(threads)]
            else:
                cluster, roots = None, ()
                mode = ["--direct_num_workers", str(w), "--direct_running_mode", "multi_processing"] if w > 1 else []
                threads = threads if w > 1 else cores  # one in-process worker: PyTorch takes every core
            argv_ = ["--input", str(work / f"in_{n}" / "*.jsonl"), "--model", model, "--id_field", "id",
                     "--output", str(work / f"out_{n}_{w}_{args.runner}"), *mode, *args.pipeline_arg]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            peaks: dict[int, float] = {}
            try:
                with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
                    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv_], stdout=out, stderr=err, text=True,
                                            env=env, cwd=Path(__file__).resolve().parent.parent)
                    samples = sample_rss(proc, args.sample_seconds, roots, peaks) if os.path.isdir("/proc/self") else []
                    proc.wait()
                    out.seek(0)
                    err.seek(0)
                    stdout, stderr = out.read(), err.read()
            finally:
                if cluster is not None:
                    cluster.__exit__(None, None, None)
            if proc.returncode:
                raise SystemExit(stderr[-3000:])
            r = json.loads(stdout.strip().splitlines()[-1])
            used = min(cores, w * threads)
            row = {**archive, "runner": args.runner, "workers": w, "torch_threads": threads,
                   "records_per_s": round(n / r["seconds"], 1), "records_per_s_per_core": round(n / r["seconds"] / used, 1),
                   **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}}
            if args.runner == "dask":  # the driver only reads file names and commits: the workers hold the job
                worker_peaks = sorted((m for pid, m in peaks.items() if pid not in roots), reverse=True)[:w]
                row["worker_peak_rss_mib"] = [round(m) for m in worker_peaks]
                row["largest_child_rss_mib"] = round(max(worker_peaks, default=0.0), 1)
            if samples:
                row["rss_by_tenth"] = by_tenth(samples)
            if args.pipeline_arg:
                row["pipeline_args"] = " ".join(args.pipeline_arg)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| notes | runner | workers | records/s | per core | seconds | mean exit layer | peak RSS MiB (driver) | largest worker RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['notes']} | {r['runner']} | {r['workers']} | {r['records_per_s']} | {r['records_per_s_per_core']} | "
              f"{r['seconds']} | {r['mean_exit_layer']:.2f} | {r['peak_rss_mib']:.0f} | {r['largest_child_rss_mib']:.0f} |")
    print(f"\nmachine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    # rows of earlier runs for other (notes, workers) settings are kept, each with its own date
    today = time.strftime("%Y-%m-%d")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    for r in rows:
        r.setdefault("date", today)
        r["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if commit:
            r["commit"] = commit  # the code it ran: defaults (batch size, kernels) change between commits
    before = json.loads((docs / "scaling.json").read_text()) if (docs / "scaling.json").is_file() else {}
    previous = before.get("rows", [])
    def key(r):
        return r["notes"], r.get("runner", "direct"), r["workers"]

    fresh = {key(r) for r in rows}
    rows = sorted([r for r in previous if key(r) not in fresh] + rows, key=key)
    (docs / "scaling.json").write_text(json.dumps({
        "command": ".venv/bin/python -m bench.scaling [--runner direct|dask] [--sizes N ...] [--workers W ...]",
        "date": today, "machine": machine(),
        "what": ("Generated notes with log-normal lengths (a few notes span several 128-token windows) in 20 "
                 "JSONL files; the sample notes model (pretrained MiniLM-L6, exit heads fitted as probes on generated notes) with its calibrated EPEE policy; one fresh "
                 "process per run; direct: 2 workers = DirectRunner multi_processing; dask: our DaskRunner on a local "
                 "cluster (scheduler + W single-threaded worker processes, --torch_threads cores/W). Peak RSS is the "
                 "driver's and the largest worker process's (Dask: sampled from the cluster's worker processes)."),
        "rows": rows, "notes": before.get("notes", [])}, indent=2))
    from bench.run_all import render_saved

    render_saved(docs)


if __name__ == "__main__":
    main()
