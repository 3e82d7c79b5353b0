"""Engine benchmark: stock full-depth forward vs EPEE reference (batch 1) vs our batched engine.

Not a test: it prints one JSON line per configuration. Run from the repository root:

    .venv/bin/python -m bench.engine                       # default: 12 layers, hidden 768, T=128, B=32
    .venv/bin/python -m bench.engine --batch-sizes 8,32,128 --device cuda --dtype bfloat16
    .venv/bin/python -m bench.engine --policies scheduled --precision int8   # the engine in int8 (CPU)

Every system runs the same weights on the same inputs. Two exit regimes are measured:

* ``scheduled``: a scripted schedule (sample i exits at a given layer, spread evenly over 1..L and
  shuffled across samples) so the engine is measured alone, with a known ideal speedup;
* ``epee``: the real EPEE policy; as the weights are random, τ is set to a quantile of the
  entropies seen on a probe set so that exits spread over the layers.

ideal_speedup = L / mean exit layer; measured_speedup = engine samples/s / full-depth samples/s;
efficiency = measured / ideal. The target is efficiency >= 0.85 on the CPU at the default setting.
The ideal counts whole layers; the engine's two-step layers (``EngineConfig.split_layers``: an
exiting row pays its exit layer's keys and values and its [CLS] position, not the whole layer) can
take efficiency above 1. ``--whole-layers`` measures the regrouping alone, every layer whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import BertConfig

from bench.common import timed
from epee import (
    EarlyExitConfig,
    EarlyExitEngine,
    EarlyExitModel,
    EncodedSample,
    EngineConfig,
    ExitPolicy,
    ExitPolicyConfig,
    ScheduledExit,
    collate,
    exit_signal,
    run_reference,
)


def build_model(layers: int, hidden: int, heads: int, num_labels: int, seed: int) -> EarlyExitModel:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=512,
    )
    return EarlyExitModel.from_config(
        config, EarlyExitConfig(task="sequence", label_names=tuple(f"c{i}" for i in range(num_labels)))
    ).eval()


def make_samples(n: int, seq_len: int, min_len: int, vocab: int, seed: int) -> list[EncodedSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = seq_len if min_len >= seq_len else int(torch.randint(min_len, seq_len + 1, (1,), generator=g))
        ids = torch.randint(1000, vocab, (length,), generator=g)
        ids[0], ids[-1] = 101, 102  # [CLS] ... [SEP]
        out.append(EncodedSample(input_ids=ids))
    return out


def full_depth(model: EarlyExitModel, samples: list[EncodedSample], batch_size: int, device: torch.device) -> None:
    """The stock transformers forward at batch size B, then the last exit head."""
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start : start + batch_size], model.adapter.pad_token_id).to(device)
            pooled, _ = model.adapter.stock_forward(batch)
            torch.softmax(model.exit_heads[-1](pooled).float(), dim=-1).cpu()


def probe_threshold(model: EarlyExitModel, samples: list[EncodedSample], quantile: float, device) -> float:
    with torch.inference_mode():
        batch = collate(samples, model.adapter.pad_token_id).to(device)
        ents = torch.stack([exit_signal(lg).entropy for lg in model(batch).logits[:-1]])
    return float(torch.quantile(ents.flatten().float(), quantile))


def main(argv: list[str] | None = None) -> None:
    from epee.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--min-len", type=int, default=0, help="if set, lengths vary uniformly in [min-len, seq-len]")
    p.add_argument("--batch-sizes", default="32", help="comma-separated batch sizes")
    p.add_argument("--samples", type=int, default=0, help="samples per configuration (default 4 x batch, >= 128)")
    p.add_argument("--reference-samples", type=int, default=0, help="samples for the slow batch-1 reference (default: all)")
    p.add_argument("--policies", default="scheduled,epee")
    p.add_argument("--quantile", type=float, default=0.3, help="epee: τ at this quantile of probe entropies")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="the engine's EngineConfig.precision (int8: CPU only); the stock forward and the batch-1 "
                        "reference stay in --dtype, so measured_speedup then includes the precision's gain")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system; the best is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--whole-layers", action="store_true", help="EngineConfig(split_layers=False): every layer whole")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.layers, args.hidden, args.heads, 3, args.seed).to(device=device, dtype=dtype)
    L = model.num_layers
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()

    for bsz in [int(b) for b in args.batch_sizes.split(",")]:
        n = args.samples or max(128, 4 * bsz)
        samples = make_samples(n, args.seq_len, args.min_len or args.seq_len, 30000, args.seed + 1)
        n_ref = min(n, args.reference_samples or n)
        engine = EarlyExitEngine(model, EngineConfig(batch_size=bsz, device=str(device), precision=args.precision,
                                                     split_layers=not args.whole_layers))
        # warm up every path once (allocators, kernels, thread pools)
        full_depth(model, samples[:bsz], bsz, device)
        engine.run(samples[:bsz])
        run_reference(model, samples[:2], device=str(device))
        t_full = timed(lambda: full_depth(model, samples, bsz, device), args.repeats, device=device)

        for kind in args.policies.split(","):
            if kind == "scheduled":
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 2))
                schedule = 1 + perm % L  # every layer gets n/L samples, shuffled over the batches
                policy: ExitPolicy = ScheduledExit(schedule, L)
                extra = {}
            else:
                tau = probe_threshold(model, samples[: min(n, 64)], args.quantile, device)
                cfg = ExitPolicyConfig(kind=kind, entropy_threshold=min(max(tau, 0.0), 1.0), patience=args.patience)
                policy = ExitPolicy(cfg, L)
                extra = {"entropy_threshold": round(cfg.entropy_threshold, 6), "patience": cfg.patience}
            result = None

            def run_engine():
                nonlocal result
                result = engine.run(samples, policy)

            t_engine = timed(run_engine, args.repeats, device=device)
            t_ref = timed(lambda: run_reference(model, samples[:n_ref], policy, device=str(device)), args.repeats,
                          device=device)
            stats = result.stats
            ideal = stats.layer_speedup
            measured = t_full / t_engine
            line = {
                "config": f"L{L}-H{args.hidden}-T{args.seq_len}-B{bsz}",
                "device": device.type,
                "device_name": device_name,
                "dtype": args.dtype,
                "engine_precision": args.precision,
                "threads": torch.get_num_threads(),
                "policy": kind,
                **extra,
                "samples": n,
                "mean_exit_layer": round(stats.mean_exit_layer, 3),
                "ideal_speedup": round(ideal, 3),
                "full_depth_samples_per_s": round(n / t_full, 2),
                "reference_bs1_samples_per_s": round(n_ref / t_ref, 2),
                "engine_samples_per_s": round(n / t_engine, 2),
                "measured_speedup": round(measured, 3),
                "efficiency": round(measured / ideal, 3),
                "engine_vs_reference_bs1": round((n / t_engine) / (n_ref / t_ref), 2),
                "mean_batch_fill": round(stats.mean_batch_fill, 3),
                "layer_calls": stats.layer_calls,
                "two_step_calls": stats.two_step_calls,
                "exits_per_layer": stats.exits_per_layer,
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
