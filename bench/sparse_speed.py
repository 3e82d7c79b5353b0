"""What weight sparsity buys in time, measured, not assumed. Not a test; prints JSON lines and
writes docs/sparse_speed.json (read by bench.sparsity_real's report).

CPU (default):
* one feed-forward matrix of MiniLM-L6 (384 -> 1536) over 64 x 128 tokens: dense kernel vs
  PyTorch's CSR sparse kernel (``torch.sparse.mm``) at 50-99% unstructured sparsity;
* the whole engine at full depth on a MiniLM-sized model with 0 / 75% sparse weights: the same
  dense kernels run, so the zeros cost as much as any other value.

CUDA (``--device cuda``, on a GPU with sparse tensor cores): a 12-layer BERT-base-sized model in
float16 at full depth, dense vs its 2:4-pruned copy converted to PyTorch semi-structured sparse
tensors (``epee.sparsity.convert_semi_structured``), batch sizes 8 to 256.

    .venv/bin/python -m bench.sparse_speed
    .venv/bin/python -m bench.sparse_speed --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.common import machine, timed


def median_seconds(fn, repeat: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup`` (GPU work waited for)."""
    return timed(fn, repeat, warmup, reduce="median", device="cuda" if torch.cuda.is_available() else None)


def cpu_matrix(sparsities=(0.5, 0.75, 0.9, 0.95, 0.99)) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(64 * 128, 384)
    w = torch.randn(1536, 384)
    dense_s = median_seconds(lambda: torch.nn.functional.linear(x, w))
    rows = [{"what": "384x1536 linear, 8192 tokens", "sparsity": 0.0, "kernel": "dense", "ms": 1e3 * dense_s, "speedup": 1.0}]
    xt = x.t().contiguous()
    for s in sparsities:
        ws = w.clone()
        ws[torch.rand_like(ws) < s] = 0
        d = median_seconds(lambda: torch.nn.functional.linear(x, ws))
        csr = ws.to_sparse_csr()
        c = median_seconds(lambda: torch.sparse.mm(csr, xt))
        rows.append({"what": "384x1536 linear, 8192 tokens", "sparsity": s, "kernel": "dense", "ms": 1e3 * d, "speedup": dense_s / d})
        rows.append({"what": "384x1536 linear, 8192 tokens", "sparsity": s, "kernel": "csr", "ms": 1e3 * c, "speedup": dense_s / c})
    return rows


def engine_rows(device: str, hidden: int, layers: int, heads: int, inter: int, batch_sizes, sparse_kind: str,
                dtype=torch.float32, n: int = 512, length: int = 128) -> list[dict]:
    from transformers import BertConfig

    from epee import EarlyExitEngine, EngineConfig, ExitPolicyConfig
    from epee.config import EarlyExitConfig
    from epee.inputs import EncodedSample
    from epee.modeling import EarlyExitModel
    from epee.policies import ExitPolicy
    from epee.sparsity import apply_masks, convert_semi_structured, magnitude_masks, prunable_weights

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                     vocab_size=30522, max_position_embeddings=512)
    samples = [EncodedSample(input_ids=torch.randint(1000, 30000, (length,))) for _ in range(n)]
    rows = []
    for variant in ("dense", sparse_kind):
        model = EarlyExitModel.from_config(cfg, EarlyExitConfig(task="sequence", label_names=("a", "b"))).eval()
        note = ""
        if variant != "dense":
            pattern, s = ("2:4", 0.5) if variant == "2:4" else ("unstructured", float(variant))
            apply_masks(model, magnitude_masks(prunable_weights(model), s, "layer", pattern))
        model.to(device, dtype)
        if variant == "2:4":
            note = json.dumps(convert_semi_structured(model))
        policy = ExitPolicy(ExitPolicyConfig(kind="none"), layers)
        for bs in batch_sizes:
            engine = EarlyExitEngine(model, EngineConfig(batch_size=bs, device=device))
            secs = median_seconds(lambda: engine.run(samples, policy), repeat=3, warmup=1)
            rows.append({"what": f"engine, {layers} layers, hidden {hidden}, {n} x {length} tokens, {device} {str(dtype)[6:]}",
                         "weights": variant, "batch_size": bs, "records_per_s": n / secs, "note": note})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["batch_size"]: r["records_per_s"] for r in rows if r["weights"] == "dense"}
    for r in rows:
        r["speedup"] = r["records_per_s"] / base[r["batch_size"]]
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--docs", default="docs")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = {"command": f".venv/bin/python -m bench.sparse_speed --device {args.device}", "date": time.strftime("%Y-%m-%d"),
            "machine": machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    if args.device == "cpu":
        rows = cpu_matrix()
        for r in rows:
            print(json.dumps(r), flush=True)
        rows += engine_rows("cpu", 384, 6, 12, 1536, [64], "0.75", n=256)
    else:
        meta["gpu"] = torch.cuda.get_device_name(0)
        rows = engine_rows(args.device, 768, 12, 12, 3072, [8, 16, 32, 64, 128, 256], "2:4", dtype=torch.float16, n=2048)
    path = Path(args.docs) / "sparse_speed.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[args.device.split(":")[0]] = {"meta": meta, "rows": rows}
    path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
