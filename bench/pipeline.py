"""Pipeline benchmark: our Beam pipeline (EPEE and full depth) vs Beam's stock RunInference.

Not a test; prints one JSON line. Same model weights, same notes, same machine, one run each:

* ``pipeline_epee``: ``pipelines.notes`` with the model directory's calibrated policy;
* ``pipeline_full``: the same pipeline with ``--exit_policy none``;
* ``beam_stock_full``: Beam's own ``RunInference`` with its stock ``PytorchModelHandlerKeyedTensor``
  running the same backbone + last exit head at full depth, inputs padded to the model's
  max_length (what that handler needs to stack a batch), predictions written to Parquet too;
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
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

from bench import machine, stock_pipeline


class StockFullDepthClassifier(nn.Module):
    """Backbone + last exit head as a plain nn.Module, the shape Beam's PyTorch handler loads."""

    def __init__(self, model_dir: str) -> None:
        super().__init__()
        from transformers import AutoConfig

        from epee.backbones import build_backbone

        self.backbone = build_backbone(AutoConfig.from_pretrained(model_dir, local_files_only=True))
        doc = json.loads((Path(model_dir) / "epee_config.json").read_text())
        self.head = nn.Linear(self.backbone.config.hidden_size, len(doc["model"]["label_names"]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return torch.softmax(self.head(out.pooler_output), dim=-1)


def stock_state_dict(model_dir: str, path: str) -> None:
    """Our weights under the stock module's names (backbone.*, head.* = the last exit head)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(model_dir) / "model.safetensors"))
    doc = json.loads((Path(model_dir) / "config.json").read_text())
    last = int(doc["num_hidden_layers"]) - 1
    out = {k: v for k, v in state.items() if k.startswith("backbone.")}
    out.update({k.replace(f"exit_heads.{last}.", "head."): v for k, v in state.items() if k.startswith(f"exit_heads.{last}.")})
    torch.save(out, path)  # Beam's stock handler loads a torch state dict; we made this file ourselves


def run_stock(notes_path: str, text_field: str, model_dir: str, output: str, batch_size: int) -> int:
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.io.parquetio import WriteToParquet
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerKeyedTensor

    from epee.modeldir import load_preprocessor

    state_path = os.path.join(tempfile.mkdtemp(), "stock.pth")
    stock_state_dict(model_dir, state_path)
    handler = PytorchModelHandlerKeyedTensor(state_dict_path=state_path, model_class=StockFullDepthClassifier,
                                             model_params={"model_dir": model_dir}, min_batch_size=1, max_batch_size=batch_size)

    class Tokenise(beam.DoFn):
        def setup(self):
            self.pre, _ = load_preprocessor(model_dir)
            self.max_len = self.pre.settings.max_length

        def process(self, line):
            row = json.loads(line)
            enc = self.pre.tokenizer(row[text_field], truncation=True, max_length=self.max_len, padding="max_length",
                                     return_tensors="pt")
            yield {"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0]}

    schema = pa.schema([("label", pa.int64()), ("score", pa.float64())])
    with stock_pipeline() as p:
        (p | beam.io.ReadFromText(notes_path) | beam.ParDo(Tokenise()) | RunInference(handler)
           | beam.Map(lambda r: {"label": int(r.inference.argmax()), "score": float(r.inference.max())})
           | WriteToParquet(f"{output}/stock", schema, file_name_suffix=".parquet", num_shards=1))
    return 0


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
        t0 = time.perf_counter()
        summaries[name] = run("notes", common + ["--output", str(work / name)] + extra)
        timings[name] = time.perf_counter() - t0
    if "beam_stock_full" in systems:
        t0 = time.perf_counter()
        run_stock(str(notes_path), "text", model, str(work / "stock"), args.batch_size)
        timings["beam_stock_full"] = time.perf_counter() - t0
    for name, full in (("engine_epee", False), ("engine_full", True)):
        if name not in systems:
            continue
        t0 = time.perf_counter()
        bare_engine(str(notes_path), "text", model, args.batch_size, args.engine_batch_size, full, args.max_windows)
        timings[name] = time.perf_counter() - t0
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
