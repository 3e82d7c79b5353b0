"""ONNX Runtime as the peer a performance-minded CPU user would pick: our model at full depth
(backbone + last exit head) exported to ONNX, run by ORT with graph optimisation ALL after the
``onnxruntime.transformers`` BERT optimiser (fp32), and the same graph quantised by
``onnxruntime.quantization.quantize_dynamic`` (int8), beside our engine in float32 and int8 (and
bfloat16 on CPUs that compute it natively: avx512_bf16 or AMX), full depth and EPEE, on the same records: records/s (median of ``--repeats``), the task score, and
whether ORT's labels equal our full-depth engine's.

    .venv/bin/pip install -e '.[bench]'      # onnxruntime, onnx, onnxscript: benchmark extras only
    .venv/bin/python -m bench.onnx_peer --model models/medical_abstracts --records 400 --repeats 5

ORT is fed as a user who cares about throughput would feed it: records sorted by length and
batched (``--batch-size``), each batch padded to its longest record (dynamic axes), so it pads no
more than our engine does. ``--per-layer`` also times one transformer layer in ORT against the same
layer in PyTorch at the engine's batch shapes (issue 35 item 3: an ORT backend only if it is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from bench.common import StockFullDepth, machine, timed, write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class _Export(nn.Module):
    """StockFullDepth with positional tensor inputs (what ``torch.onnx.export`` traces)."""

    def __init__(self, full: StockFullDepth, with_types: bool) -> None:
        super().__init__()
        self.full, self.with_types = full, with_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_types:
            kw["token_type_ids"] = token_type_ids
        return self.full(**kw)


def export(model_dir: str, work: Path, with_types: bool) -> Path:
    """The full-depth model as ONNX (opset 17, batch and sequence dynamic)."""
    full = StockFullDepth(model_dir).eval()
    module = _Export(full, with_types).eval()
    ids = torch.ones(2, 16, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row: transformers skips the mask for an all-ones one, and the trace would keep that
    args = (ids, mask) + ((torch.zeros_like(ids),) if with_types else ())
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["probs"] = {0: "batch"}
    path = work / "full.onnx"
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["probs"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    return path


def optimise(path: Path, num_heads: int, hidden: int) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden, opt_level=1)
    out = path.with_name("full_opt.onnx")
    opt.save_model_to_file(str(out))
    return out


def quantise(path: Path) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name("full_opt_int8.onnx")
    # the optimiser's fused nodes (com.microsoft domain) defeat shape inference: their outputs are float
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_batches(samples, batch_size: int, with_types: bool, pad_id: int):
    """Length-sorted batches padded to their longest (``epee.inputs.collate``): (positions, feeds)."""
    from epee.inputs import collate

    order = sorted(range(len(samples)), key=lambda i: int(samples[i].input_ids.numel()))
    out = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([samples[i] for i in chunk], pad_token_id=pad_id)
        feeds = {"input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy()}
        if with_types:
            feeds["token_type_ids"] = batch.token_type_ids.numpy()
        out.append((chunk, feeds))
    return out


def run_ort(sess, batches, n: int):
    import numpy as np

    probs = [None] * n
    for chunk, feeds in batches:
        p = sess.run(["probs"], feeds)[0]
        for r, i in enumerate(chunk):
            probs[i] = p[r]
    return np.stack(probs)


def median_rate(fn, n: int, repeats: int, what: str = "", warmup: int = 1) -> float:
    """Records/s of ``fn`` over ``n`` records, the median of ``repeats`` timed calls after
    ``warmup`` untimed ones (0 where the caller has just run it)."""
    rate = n / timed(fn, repeat=repeats, warmup=warmup, reduce="median")
    if what:
        print(f"{what}: {rate:.1f} records/s", file=sys.stderr, flush=True)
    return rate


def per_layer(adapter, work: Path, threads: int, batch_size: int, seq: int, repeats: int) -> dict:
    """One transformer layer (the first) in PyTorch against ONNX Runtime at the engine's batch
    shape: (batch_size, seq) rows, hidden states in, hidden states out."""
    import numpy as np

    x = torch.randn(batch_size, seq, adapter.hidden_size)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    mask[: batch_size // 2, seq // 2 :] = 0  # some padded rows, as the engine's batches have

    class One(nn.Module):
        """Layer 1 as the engine runs it: the adapter's mask, then its layer."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = adapter.model  # its weights are this module's parameters, not traced constants

        def forward(self, h, m):
            return adapter.layer(0, h, adapter.attention_bias(h, m))

    one = One().eval().requires_grad_(False)
    path = work / "layer.onnx"
    with torch.no_grad():
        torch.onnx.export(one, (x, mask), str(path), input_names=["h", "m"], output_names=["out"],
                          dynamic_axes={"h": {0: "b", 1: "t"}, "m": {0: "b", 1: "t"}, "out": {0: "b", 1: "t"}},
                          opset_version=17, dynamo=False)
    sess = session(path, threads)
    feeds = {"h": x.numpy(), "m": mask.numpy()}
    with torch.no_grad():
        ref = one(x, mask).numpy()
        t_torch = median_rate(lambda: one(x, mask), 1, repeats)
    got = sess.run(["out"], feeds)[0]
    t_ort = median_rate(lambda: sess.run(["out"], feeds), 1, repeats)
    return {"batch": batch_size, "sequence": seq, "torch_calls_per_s": t_torch, "ort_calls_per_s": t_ort,
            "ort_over_torch": t_ort / t_torch, "max_abs_diff": float(np.abs(ref - got).max())}


PRECISION_KEYS = {"float32": "fp32", "int8": "int8", "bfloat16": "bf16"}  # engine_<key>_<full|epee>


def ort_systems(model_dir: str, model, samples, gold, score, full_labels, threads: int, batch_size: int = 32,
                repeats: int = 5, full_probs=None) -> dict:
    """ORT fp32 (optimised) and int8 at full depth on pre-encoded ``samples``: per system its
    records/s (median of ``repeats``), task score (``score(gold, labels)``) and the share of labels
    equal to ``full_labels`` (our engine at full depth). Used by ``bench.run_all --ort`` too."""
    import numpy as np

    n, systems = len(samples), {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with_types = samples[0].token_type_ids is not None
        raw = export(model_dir, work, with_types)
        opt = optimise(raw, int(model.adapter.config.num_attention_heads), model.adapter.hidden_size)
        q = quantise(opt)
        batches = ort_batches(samples, batch_size, with_types, model.adapter.pad_token_id)
        for key, path in (("ort_fp32_full", opt), ("ort_int8_full", q)):
            sess = session(path, threads)
            probs = run_ort(sess, batches, n)
            labels = [int(i) for i in probs.argmax(-1)]
            rate = median_rate(lambda: run_ort(sess, batches, n), n, repeats, key, warmup=0)  # just run
            systems[key] = {"records_per_s": rate, "score": score(gold, labels), "mean_exit_layer": float(model.num_layers),
                            "labels_equal_engine_fp32_full": sum(a == b for a, b in zip(labels, full_labels)) / n}
            if key == "ort_fp32_full" and full_probs is not None and full_probs.shape[-1] == probs.shape[-1]:
                systems[key]["max_abs_prob_diff"] = float(np.abs(full_probs - probs).max())
    return systems


def measure(model_dir: str, records: int, repeats: int, batch_size: int, threads: int, layer_check: bool,
            int8_records: int = 48) -> dict:
    import numpy as np

    from bench.common import encode_examples
    from epee.config import EngineConfig, ExitPolicyConfig
    from epee.engine import EarlyExitEngine
    from epee.policies import ExitPolicy
    from epee.workflows import dev_set, score_function

    torch.set_num_threads(threads)
    bundle, examples, _ = dev_set(model_dir)
    model = bundle.model.eval()
    if bundle.data_task != "sequence":
        raise SystemExit(f"bench.onnx_peer exports sequence classifiers only (this model: {bundle.data_task})")
    samples, gold, _ = encode_examples(bundle, examples[:records])
    n = len(samples)
    metric, fn = score_function(bundle.data_task, model.config.label_names, model.config.negative_label)
    L = model.num_layers
    stored = model.config.policy  # the policy `epee calibrate` stored
    result = {"model": model_dir, "records": n, "metric": metric, "threads": threads, "repeats": repeats,
              "ort_batch_size": batch_size, "machine": machine(), "systems": {}}
    systems = result["systems"]
    full_labels = None
    from epee.engine import cpu_has_int8_dot_product, cpu_has_native_bf16

    fast_int8 = cpu_has_int8_dot_product() is not False
    result["cpu_int8_dot_product"] = fast_int8
    result["cpu_native_bf16"] = cpu_has_native_bf16()
    # bfloat16 only where the CPU computes it natively (avx512_bf16, AMX): emulated, it is slower than float32
    precisions = ("float32", "int8") + (("bfloat16",) if result["cpu_native_bf16"] else ())
    for precision in precisions:
        engine = EarlyExitEngine(model, EngineConfig(precision=precision))
        # without VNNI/AMX torch._int_mm is ~30x slower than float32: time int8 on a slice only
        m = n if precision == "float32" or fast_int8 else min(n, int8_records)
        for kind, cfg in (("full", ExitPolicyConfig(kind="none")), ("epee", stored)):
            policy = ExitPolicy(cfg, L)
            res = engine.run(samples, policy) if m == n else None
            part = samples[:m]
            rate = median_rate(lambda: engine.run(part, policy), m, repeats if m == n else 1, f"engine {precision} {kind}",
                               warmup=0 if res is not None else 1)  # the labelled run warmed it up
            key = f"engine_{PRECISION_KEYS[precision]}_{kind}"
            if res is None:
                systems[key] = {"records_per_s": rate, "timed_records": m, "score": None, "mean_exit_layer": None}
                continue
            labels = [p.label for p in res.predictions]
            systems[key] = {"records_per_s": rate, "score": fn(gold, labels),
                            "mean_exit_layer": sum(p.exit_layer for p in res.predictions) / n}
            if key == "engine_fp32_full":
                full_labels = labels
                full_probs = np.stack([np.asarray(p.probs) for p in res.predictions])
    systems.update(ort_systems(model_dir, model, samples, gold, fn, full_labels, threads, batch_size, repeats,
                               full_probs=full_probs))
    if layer_check:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                result["per_layer"] = per_layer(model.adapter, Path(tmp), threads, 32, 128, repeats * 4)
            except Exception as exc:  # noqa: BLE001 - the full-depth figures stand without it
                result["per_layer"] = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
    base = systems["ort_fp32_full"]["records_per_s"]
    base8 = systems["ort_int8_full"]["records_per_s"]
    result["ratios"] = {"engine_fp32_epee_over_ort_fp32": systems["engine_fp32_epee"]["records_per_s"] / base,
                        "engine_fp32_full_over_ort_fp32": systems["engine_fp32_full"]["records_per_s"] / base,
                        "engine_int8_epee_over_ort_int8": systems["engine_int8_epee"]["records_per_s"] / base8,
                        "engine_int8_full_over_ort_int8": systems["engine_int8_full"]["records_per_s"] / base8}
    if "engine_bf16_epee" in systems:
        result["ratios"]["engine_bf16_epee_over_ort_fp32"] = systems["engine_bf16_epee"]["records_per_s"] / base
        result["ratios"]["engine_bf16_full_over_ort_fp32"] = systems["engine_bf16_full"]["records_per_s"] / base
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model directory whose recipe names its dev set")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32, help="ORT batch (length-sorted, padded to its longest)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--per-layer", action="store_true", help="also time one layer in ORT against PyTorch")
    ap.add_argument("--int8-records", type=int, default=48,
                    help="on a CPU without int8 dot products (no VNNI/AMX), time our int8 engine on this many records")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args(argv)
    result = measure(args.model, args.records, args.repeats, args.batch_size, args.threads, args.per_layer,
                     args.int8_records)
    write_result(result, args.json)


if __name__ == "__main__":
    main()
