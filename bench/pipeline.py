"""Pipeline benchmark: our Beam pipeline (EPEE and full depth) vs Beam's stock RunInference.

Not a test; prints one JSON line. Same model weights, same notes, same machine, one run each:

* ``pipeline_epee``: ``pipelines.notes`` with the model directory's calibrated policy;
* ``pipeline_full``: the same pipeline with ``--exit_policy none``;
* ``beam_stock_full``: Beam's own ``RunInference`` with its stock ``PytorchModelHandlerKeyedTensor``
  running the same model at full depth (:func:`bench.common.run_stock`, the baseline
  ``bench.run_all`` measures), inputs truncated and padded to the model's max_length (what that
  handler needs to stack a batch), predictions written to Parquet too;
* ``engine_epee`` / ``engine_full``: the bare engine on the same notes in a plain loop (read,
  tokenise, run), to measure the pipeline's overhead over it (target: under 30%).

    .venv/bin/python -m bench.pipeline                                  # sample model, generated notes
    .venv/bin/python -m bench.pipeline --model models/medical_abstracts \\
        --input ../shared/data/medical_abstracts/dev.csv --text-field medical_abstract
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from bench.common import clocked, machine, run_stock, seconds


def bare_engine(notes_path: str, text_field: str, model_dir: str, batch_size: int, engine_batch: int,
                full_depth: bool = False, max_windows: int = 0) -> dict:
    from epee.config import EngineConfig
    from epee.data import Example
    from epee.engine import EarlyExitEngine
    from epee.modeldir import load_model_dir

    from epee.config import ExitPolicyConfig
    from epee.policies import ExitPolicy

    bundle = load_model_dir(model_dir)
    policy = ExitPolicy(ExitPolicyConfig(kind="none"), bundle.model.num_layers) if full_depth else None
    engine = EarlyExitEngine(bundle.model, EngineConfig(batch_size=engine_batch), policy)
    rows = [json.loads(line) for line in open(notes_path)]
    layers = 0
    for start in range(0, len(rows), batch_size):
        samples = []
        for i, row in enumerate(rows[start : start + batch_size]):
            windows = bundle.preprocessor.encode_windows(Example(id=str(i), text=row[text_field]))
            samples += [e.sample for e in (windows[:max_windows] if max_windows else windows)]
        result = engine.run(samples)
        layers += result.stats.rows_computed
    return {"records": len(rows), "mean_exit_layer_per_window": layers / max(1, len(rows))}


SYSTEMS = ("pipeline_epee", "pipeline_full", "beam_stock_full", "engine_epee", "engine_full")
# ratio name -> (numerator timing, denominator timing, subtract): speedups are t_other / t_ours
RATIOS = {
    "epee_vs_beam_stock": ("beam_stock_full", "pipeline_epee", 0),
    "full_vs_beam_stock": ("beam_stock_full", "pipeline_full", 0),
    "epee_vs_full": ("pipeline_full", "pipeline_epee", 0),
    "pipeline_overhead_vs_engine": ("pipeline_epee", "engine_epee", 1),
    "pipeline_overhead_vs_engine_full_depth": ("pipeline_full", "engine_full", 1),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the sample notes model, trained if missing)")
    p.add_argument("--input", help="notes as JSONL or CSV (default: generated notes)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--notes", type=int, default=2000, help="generated notes when no --input")
    p.add_argument("--max-records", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="RunInference max batch size (all systems)")
    p.add_argument("--engine-batch-size", type=int, default=32)
    p.add_argument("--max-windows", type=int, default=0,
                   help="our pipeline and bare engine: first N windows per note (1 = truncate like the stock handler)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated subset of " + ",".join(SYSTEMS) + " (ratios need both sides)")
    args = p.parse_args(argv)
    systems = set(args.systems.split(","))
    unknown = systems - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems: {sorted(unknown)}")
    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="epee-bench-"))
    model = args.model
    if not model:
        from pipelines.sample_job import ensure_models

        model = str(ensure_models()[0])
    notes_path = work / "notes.jsonl"
    if args.input:
        from epee.data import read_records

        rows = [{"id": str(i), "text": r[args.text_field]} for i, r in enumerate(read_records(args.input))]
    else:
        from pipelines.sample_data import generate_notes

        rows = [{"id": n.note_id, "text": n.text} for n in generate_notes(args.notes, seed=11)]
    if args.max_records:
        rows = rows[: args.max_records]
    notes_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = len(rows)
    from pipelines.common import run

    common = ["--input", str(notes_path), "--model", model, "--id_field", "id", "--max_batch_size", str(args.batch_size),
              "--engine_batch_size", str(args.engine_batch_size), "--max_windows", str(args.max_windows)]
    timings, summaries = {}, {}
    for name, extra in (("pipeline_epee", []), ("pipeline_full", ["--exit_policy", "none"])):
        if name not in systems:
            continue
        timings[name], summaries[name] = clocked(lambda: run("notes", common + ["--output", str(work / name)] + extra))
    if "beam_stock_full" in systems:
        # bench.run_all's baseline: batches of exactly --batch-size records; timed from pipeline start
        timings["beam_stock_full"] = run_stock(str(notes_path), model, str(work / "stock"), args.batch_size, is_dicom=False)
    for name, full in (("engine_epee", False), ("engine_full", True)):
        if name not in systems:
            continue
        timings[name] = seconds(lambda: bare_engine(str(notes_path), "text", model, args.batch_size,
                                                    args.engine_batch_size, full, args.max_windows))
    rate = {k: round(n / v, 2) for k, v in timings.items()}
    ratios = {}
    for name, (a, b, minus_one) in RATIOS.items():
        if a in timings and b in timings:
            ratios[name] = round(timings[a] / timings[b] - minus_one, 3)
    epee = summaries.get("pipeline_epee", {})
    print(json.dumps({
        "model": model, "records": n, "max_windows": args.max_windows, "machine": machine(), "threads": torch.get_num_threads(),
        "records_per_s": rate,
        "mean_exit_layer_epee": epee.get("mean_exit_layer"), "num_layers": epee.get("num_layers"),
        **ratios,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }))


if __name__ == "__main__":
    main()
