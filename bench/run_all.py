"""Every real corpus, every system, same weights, same held-out records: docs/benchmarks.md.

Not a test. For each corpus in ``../shared/data`` it takes the model directory that
``bench.real_models`` trains (trained here first if missing), splits the held-out (dev) set the
model records into two fixed halves, **calibrates on the first half** (entropy-only, patience-only
and EPEE, each the fastest setting whose drop stays within ``--tolerance`` points of full depth on
paired bootstrap resamples at ``--confidence``, the rule ``epee calibrate`` uses; the plain rule,
fastest within tolerance on the half itself, is measured too as ``epee_plain``) and measures on
the second half only:

* full depth, entropy, patience, EPEE: task score, mean exit layer, layer speedup (from the exit
  heads' outputs) and records/s of the batched engine running that policy (inputs pre-tokenised);
* ``beam_stock``: Beam's ``RunInference`` with its stock ``PytorchModelHandlerKeyedTensor`` running
  the same weights at full depth (inputs padded to the model's max length, as that handler needs),
  read from the same file, tokenised in a DoFn, predictions written to Parquet;
* ``reference_bs1``: the published EPEE/PABEE style, batch size 1, exit per sample, EPEE policy;
* ``pipeline_epee`` / ``pipeline_full``: our Beam pipeline end to end on the DirectRunner (read,
  tokenise, infer, write Parquet, manifest, report), with the half-1 EPEE setting or at full depth,
  on the same file (``--max_windows 1``: the same 128 tokens the stock handler sees). PneumoniaMNIST
  is also wrapped as DICOM files and sent through the DICOM pipeline. Each Beam system runs at its
  own RunInference batch: ours at the pipeline default (one engine window, 512), the stock handler
  at ``--stock-batch-size`` (64); ``pipeline_epee_at_stock_batch`` is our EPEE pipeline at 64 too.

``--precision bfloat16`` runs our engine, calibration and pipelines in bfloat16 (torch.autocast) and
adds ``beam_stock_bfloat16``: the stock handler with its ``inference_fn`` under the same autocast,
the bfloat16 run a Beam user could set up (``beam_stock`` stays float32, the reference too).
``--precision int8`` runs ours in int8 (``epee.kernels``) and adds ``beam_stock_int8``: the stock
handler's model after PyTorch's dynamic quantisation.

    .venv/bin/python -m bench.run_all                    # every corpus
    .venv/bin/python -m bench.run_all --only ddi --max-test 300
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

from bench.common import (
    CORPORA, DICOM_COPIES, encode_examples, halves, machine, repeat_inputs, run_stock, timed, write_inputs,
)

KINDS = ("none", "entropy", "patience", "epee", "epee_plain")


def dicom_decode_rate(input_glob: str, passes: int = 3) -> float:
    """Files/s of ``transforms.decode_worker.decode_bytes`` (what the decoder child runs per file) in
    this process, on the files already in memory: the best of ``passes`` passes."""
    from transforms.decode_worker import decode_bytes

    datas = [f.read_bytes() for f in sorted(Path(input_glob).parent.glob("*.dcm"))]

    def decode_all() -> None:
        for data in datas:
            decode_bytes(data, "middle", 1 << 30)

    return len(datas) / timed(decode_all, repeat=passes)


def dicom_profile(prof: dict) -> str:
    parts = []
    if "dicom_decode_records_per_s" in prof:
        parts.append(f"DICOM decoding alone (pydicom, one process) {prof['dicom_decode_records_per_s']:.0f} records/s")
    if "image_preprocess_records_per_s" in prof:
        parts.append(f"image preprocessing alone (decoded pixels to model input) "
                     f"{prof['image_preprocess_records_per_s']:.0f} records/s")
    elif "decode_records_per_s" in prof:  # results saved before the two were told apart: it measured preprocessing
        parts.append(f"image preprocessing alone (decoded pixels to model input) {prof['decode_records_per_s']:.0f} "
                     "records/s")
    return "; ".join(parts)


# -- one corpus ------------------------------------------------------------------------------------
def held_out(model_dir: str):
    from epee.workflows import dev_set

    bundle, examples, _ = dev_set(model_dir)
    return bundle, examples


def text_steady_inputs(model_dir: str, work: Path, max_test: int, repeat: int) -> tuple[str, int]:
    """A text corpus' test half (its first ``max_test`` records) written as JSON lines and repeated
    ``repeat`` times under ``work``: (input glob, records)."""
    bundle, examples = held_out(model_dir)
    input_glob, _ = write_inputs(bundle, halves(examples)[1][:max_test], work / "input")
    return repeat_inputs(input_glob, False, repeat, work / "steady")


def bench_corpus(name: str, model_dir: str, work: Path, max_test: int, tolerance: float, stock_batch_size: int,
                 steady_records: int = 0, confidence: float = 0.9, precision: str = "float32",
                 pipeline_batch_size: int = 0, decode_processes: int = 2, ort: bool = False) -> dict:
    from epee.calibration import choose, choose_robust, collect_layer_outputs, simulate, sweep
    from epee.workflows import score_function
    from epee.config import EngineConfig, ExitPolicyConfig
    from epee.engine import EarlyExitEngine
    from epee.policies import ExitPolicy
    from epee.reference import run_reference
    from pipelines.common import run as run_pipeline

    bundle, examples = held_out(model_dir)
    model = bundle.model
    calib, test = halves(examples)
    test = test[:max_test]
    metric, fn = score_function(bundle.data_task, model.config.label_names, model.config.negative_label)

    c_samples, c_gold, _ = encode_examples(bundle, calib)
    t0 = time.perf_counter()
    t_samples, t_gold, test = encode_examples(bundle, test)
    encode_per_s = len(test) / (time.perf_counter() - t0)
    L = model.num_layers
    c_outputs = collect_layer_outputs(model, c_samples, precision=precision)
    c_points = sweep(c_outputs, lambda p: fn(c_gold, p), L)
    c_full = next(p for p in c_points if p.kind == "none")
    chosen = {"none": ExitPolicyConfig(kind="none")}
    for kind in ("entropy", "patience", "epee"):  # the rule `epee calibrate` uses by default
        chosen[kind] = choose_robust(c_outputs, c_points, c_gold, fn, tolerance / 100, kind,
                                     confidence=confidence).point.policy_config()
    # the plain rule (fastest within tolerance on the calibration half), to show what it costs on new records
    chosen["epee_plain"] = choose(c_points, c_full.score, tolerance / 100, "epee").policy_config()
    t_outputs = collect_layer_outputs(model, t_samples, precision=precision)
    t_points = sweep(t_outputs, lambda p: fn(t_gold, p), L)
    result = {"name": name, "metric": metric, "num_layers": L, "calibration_records": len(c_samples),
              "test_records": len(t_samples), "policies": {}, "systems": {}, "sweep_test": [p.to_dict() for p in t_points]}
    engine = EarlyExitEngine(model, EngineConfig(batch_size=32, precision=precision))
    engine.run(t_samples[:64], ExitPolicy(chosen["none"], L))  # warm-up: first calls pay for allocator and kernels
    for kind, cfg in chosen.items():
        policy = ExitPolicy(cfg, L)
        sim = simulate(t_outputs, policy)
        t0 = time.perf_counter()
        run = engine.run(t_samples, policy)
        secs = time.perf_counter() - t0
        stats = run.stats
        if kind == "none":  # what the ONNX Runtime peer's labels are checked against (--ort)
            full_labels = [pr.label for pr in run.predictions]
        result["policies"][kind] = {"setting": cfg.to_dict(), "score": fn(t_gold, sim.predictions),
                                    "mean_exit_layer": sim.mean_exit_layer, "layer_speedup": L / sim.mean_exit_layer,
                                    "engine_records_per_s": len(t_samples) / secs}
        # where the engine's time goes: rows per layer call at each depth (batch fill) and padding
        fill = [r / (c * stats.batch_size) if c else 0.0 for r, c in zip(stats.rows_per_layer, stats.calls_per_layer)]
        result["policies"][kind]["engine_profile"] = {
            "batch_fill_per_layer": fill, "mean_batch_fill": stats.mean_batch_fill,
            "padding_fraction": stats.padding_fraction, "rows_per_layer": list(stats.rows_per_layer)}
    if t_samples[0].pixel_values is None:
        lengths = [int(s.input_ids.numel()) for s in t_samples]
        result["profile"] = {"tokenise_records_per_s": encode_per_s, "mean_tokens": sum(lengths) / len(lengths),
                             "stock_padded_tokens": bundle.preprocessor.settings.max_length}
    else:
        result["profile"] = {"image_preprocess_records_per_s": encode_per_s}
    n_ref = min(len(t_samples), 200)
    t0 = time.perf_counter()
    run_reference(model, t_samples[:n_ref], ExitPolicy(chosen["epee"], L))
    result["systems"]["reference_bs1"] = n_ref / (time.perf_counter() - t0)
    result["systems"]["engine_epee"] = result["policies"]["epee"]["engine_records_per_s"]
    result["systems"]["engine_full"] = result["policies"]["none"]["engine_records_per_s"]
    if ort and bundle.data_task == "sequence":  # the peer a CPU user would pick: ONNX Runtime (bench.onnx_peer)
        from bench.onnx_peer import ort_systems

        peer = ort_systems(model_dir, model, t_samples, t_gold, fn, full_labels, torch.get_num_threads())
        result["ort"] = peer
        for key, v in peer.items():
            result["systems"][key] = v["records_per_s"]

    input_glob, gold_index = write_inputs(bundle, test, work / name / "input")
    is_dicom = bundle.data_task == "image"
    if is_dicom:  # what bounds the DICOM pipelines: pydicom reading the files, in one process
        result["profile"]["dicom_decode_records_per_s"] = dicom_decode_rate(input_glob)
    n = len(gold_index)
    pipeline = CORPORA[name][0]
    # Beam's stock handler and the batch-size-1 reference stay float32. Each Beam system runs at its own
    # RunInference batching: ours at the pipeline's default (a fixed batch of one engine window) unless
    # --pipeline-batch-size, the stock handler at --stock-batch-size (it is no faster with larger batches)
    base = ["--model", model_dir, "--precision", precision]
    if pipeline_batch_size:
        base += ["--min_batch_size", str(pipeline_batch_size), "--max_batch_size", str(pipeline_batch_size)]
    if not is_dicom:
        base += ["--id_field", "id", "--max_windows", "1"]
    else:  # decoding, not the model, bounds this pipeline (docs/analyses.md, "Pipelined DICOM decoding")
        base += ["--decode_processes", str(decode_processes)]
        result["decode_processes"] = decode_processes
    epee = chosen["epee"]
    variants = {"pipeline_epee": ["--exit_policy", "epee", "--entropy_threshold", str(epee.entropy_threshold),
                                  "--patience", str(epee.patience)],
                "pipeline_full": ["--exit_policy", "none"]}
    from transforms.context import JobContext
    from transforms.handler import EarlyExitModelHandler

    our_batch = EarlyExitModelHandler(JobContext("bench", model_dir), max_batch_size=pipeline_batch_size or None).max_batch_size
    result["run_inference_batch"] = {"beam_stock": stock_batch_size, "pipelines": our_batch}
    if our_batch != stock_batch_size:  # what the batching alone is worth: our EPEE pipeline at the stock's batch
        variants["pipeline_epee_at_stock_batch"] = variants["pipeline_epee"] + [
            "--min_batch_size", str(stock_batch_size), "--max_batch_size", str(stock_batch_size)]
    for sysname, extra in variants.items():
        out = work / name / sysname
        t0 = time.perf_counter()
        summary = run_pipeline(pipeline, base + ["--input", input_glob, "--output", str(out)] + extra)
        result["systems"][sysname] = n / (time.perf_counter() - t0)
        if sysname == "pipeline_epee_at_stock_batch":
            continue
        result[f"{sysname}_summary"] = {k: summary.get(k) for k in ("records", "predictions", "dead_letters", "mean_exit_layer")}
        if bundle.data_task != "token":
            import pyarrow.parquet as pq

            from pipelines.outputs import output_files

            rows = [r for f in output_files(str(out), "predictions") for r in pq.read_table(f).to_pylist()]
            names = list(model.config.label_names)
            preds = {gold_index[r["record_id"]]: names.index(r["label"]) for r in rows}
            gold_list = [t_gold[i] for i in sorted(preds)]
            result[f"{sysname}_score"] = fn(gold_list, [preds[i] for i in sorted(preds)]) if preds else None
    # Beam's stock handler as its users run it (float32) and, for another --precision, in that one too
    stock_precisions = {"beam_stock": "float32"}
    if precision != "float32":
        stock_precisions[f"beam_stock_{precision}"] = precision

    def time_stock(glob: str, records: int, systems: dict, ratio_key: str) -> None:
        """Adds the stock systems' records/s to ``systems`` and our EPEE pipeline's ratios to them."""
        for sysname, prec in stock_precisions.items():
            secs = run_stock(glob, model_dir, str(work / name / f"{ratio_key}_{sysname}"), stock_batch_size, is_dicom,
                             prec)
            systems[sysname] = records / secs
        result[ratio_key] = systems["pipeline_epee"] / systems["beam_stock"]
        if len(stock_precisions) > 1:
            result[f"{ratio_key}_same_precision"] = systems["pipeline_epee"] / systems[f"beam_stock_{precision}"]

    time_stock(input_glob, n, result["systems"], "pipeline_epee_vs_beam_stock")
    if steady_records > 0:
        # Steady state: a run over a few hundred records is half start-up (Beam, model load,
        # Parquet, report, the DICOM decoder's child process); a nightly archive is not. The same
        # records K times (repeat_inputs), K the smallest (at least 2) that gives every corpus about
        # the same number of records, so start-up weighs alike in each section (with a fixed K,
        # medical abstracts' 200 gave 800).
        repeat = max(2, -(-steady_records // (n * (DICOM_COPIES if is_dicom else 1))))
        steady_glob, m = repeat_inputs(input_glob, is_dicom, repeat, work / name / "steady")
        steady = {}
        for sysname, extra in variants.items():
            t0 = time.perf_counter()
            run_pipeline(pipeline, base + ["--input", steady_glob, "--output", str(work / name / f"steady_{sysname}")] + extra)
            steady[sysname] = m / (time.perf_counter() - t0)
        time_stock(steady_glob, m, steady, "steady_pipeline_epee_vs_beam_stock")
        result["steady_records"] = m
        result["steady_systems"] = steady
    result["epee_score_drop_points"] = 100 * (result["policies"]["none"]["score"] - result["policies"]["epee"]["score"])
    result["epee_plain_score_drop_points"] = 100 * (result["policies"]["none"]["score"] - result["policies"]["epee_plain"]["score"])
    return result


# -- report ----------------------------------------------------------------------------------------
def plots(results: dict, figs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, r in results.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        ax = axes[0]
        for kind, colour in (("entropy", "tab:blue"), ("patience", "tab:green"), ("epee", "tab:red")):
            pts = sorted((p["mean_exit_layer"], 100 * p["score"]) for p in r["sweep_test"] if p["kind"] == kind)
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=6, alpha=0.35, color=colour)
            c = r["policies"][kind]
            ax.scatter([c["mean_exit_layer"]], [100 * c["score"]], s=70, color=colour, edgecolor="black", label=f"{kind} (calibrated)")
        full = r["policies"]["none"]
        ax.axhline(100 * full["score"], color="grey", ls="--", lw=1, label="full depth")
        ax.set_xlabel("mean exit layer (test half)")
        ax.set_ylabel(f"{r['metric']} x 100")
        ax.set_title(f"{name}: score vs mean exit layer")
        ax.legend(fontsize=7)
        ax = axes[1]
        systems = r["systems"]
        names = list(systems)
        ax.barh(names, [systems[k] for k in names], color="tab:purple")
        for i, k in enumerate(names):
            ax.text(systems[k], i, f" {systems[k]:.0f}", va="center", fontsize=8)
        ax.set_xlabel("records/s")
        ax.set_title("throughput per system")
        fig.tight_layout()
        fig.savefig(figs / f"bench_{name}.png", dpi=90)
        plt.close(fig)


def render(results: dict, meta: dict, path: Path) -> None:
    lines = ["# Benchmarks on the real corpora", "",
             f"Generated by `{meta['command']}` on {meta['date']}: {meta['machine']}, torch {meta['torch']}, "
             f"{meta['threads']} threads, no GPU. Every figure is measured on the second half of each corpus' "
             "held-out (dev) set; the entropy, patience and EPEE settings were calibrated on the first half "
             + (f"(fastest whose drop stays within {meta['tolerance']} point of full depth on 200 paired bootstrap "
                f"resamples at confidence {meta['confidence']}, the rule `epee calibrate` uses; `epee_plain` is the "
                "plain rule, fastest within tolerance on the half itself). " if meta.get("confidence") else
                f"(fastest within {meta['tolerance']} point of full depth there). ")
             + "Text pipelines read at most one "
             "128-token window per record (`--max_windows 1`), the same text the stock handler sees. Each Beam system "
             "runs at its own fixed RunInference batch (min = max; each section gives both): ours at the pipeline's "
             "default, one engine window, the most the engine regroups at once (or `--pipeline-batch-size`); Beam's "
             "stock handler at `--stock-batch-size`, default 64, since it is no faster with larger batches "
             "(`docs/analyses.md`); `pipeline_epee_at_stock_batch` is our EPEE pipeline at the stock's batch size. "
             "The engine columns run "
             "pre-tokenised inputs in-process with a warm-up first. Corpora can be re-measured alone (`--only`), "
             "so sections may come from different runs on different machines of the same kind, which differ in "
             "speed: each section says when and where it ran; compare records/s and ratios within a section.", ""]
    if meta.get("precision", "float32") == "int8":
        lines += ["Precision: our engine, calibration and pipelines ran in int8 (`--precision int8`: the transformer "
                  "layers' linear products in int8, weights per output channel, activations per token row; "
                  "embeddings, attention, exit heads and exit decisions in float32; `epee/kernels.py`). "
                  "`beam_stock` and the batch-size-1 reference ran in float32, as their users run them by default; "
                  "`beam_stock_int8` is Beam's stock handler on the same model after PyTorch's dynamic quantisation "
                  "(`torch.ao.quantization.quantize_dynamic`, every `nn.Linear` in qint8, activations per tensor).", ""]
    elif meta.get("precision", "float32") != "float32":
        lines += [f"Precision: our engine, calibration and pipelines ran in {meta['precision']} (`--precision "
                  f"{meta['precision']}`, torch.autocast; exit decisions in float32). `beam_stock` and the "
                  "batch-size-1 reference ran in float32, as their users run them by default; `beam_stock_"
                  f"{meta['precision']}` is Beam's stock handler with its `inference_fn` under the same autocast.", ""]
    for name, r in results.items():
        p, s = r["policies"], r["systems"]
        lines += [f"## {name}", "", CORPORA[name][1] + f"; test half: {r['test_records']} records, "
                  f"calibration half: {r['calibration_records']}.", ""]
        m = r.get("measured")  # corpora can be re-run alone (--only), on another machine of the same kind
        kernel = {"onednn": " Our engine's float32 linear layers ran through oneDNN (`--linear_kernel auto`, "
                            "`epee/kernels.py`); Beam's stock handler and the batch-size-1 reference through PyTorch's "
                            "default.",
                  "aten": " Every system's linear layers ran through PyTorch's default kernel."}
        lines += [f"Measured {m['date']} on {m['machine']}." + kernel.get(m.get("linear_kernel", ""), "") if m else
                  "Measured in an earlier run, before sections recorded their date and CPU model.", ""]
        b = r.get("run_inference_batch")
        lines += [f"RunInference batch (min = max): our pipelines {b['pipelines']}, Beam stock {b['beam_stock']}." if b else
                  "RunInference batch (min = max): 64 for both Beam systems (run before each system had its own).", ""]
        if "decode_processes" in r:
            lines += [f"Our DICOM pipelines decoded in {r['decode_processes']} child process(es) "
                      f"(`--decode_processes {r['decode_processes']}`), fed batches of files while the worker runs "
                      "the model; Beam stock decodes in its DoFn.", ""]
        lines += [f"| policy | setting | {r['metric']} | mean exit layer | layer speedup | engine records/s |",
                  "|---|---|---|---|---|---|"]
        for kind in KINDS:
            if kind not in p:  # results saved before the plain-rule row existed
                continue
            c = p[kind]
            st = c["setting"]
            tp = f"τ={st.get('entropy_threshold', 0):.3g}, P={st.get('patience')}"
            setting = {"none": "-", "entropy": f"τ={st.get('entropy_threshold', 0):.3g}", "patience": f"P={st.get('patience')}",
                       "epee": tp, "epee_plain": tp + " (plain rule)"}[kind]
            lines.append(f"| {kind} | {setting} | {c['score']:.4f} | {c['mean_exit_layer']:.2f} | {c['layer_speedup']:.2f}x | "
                         f"{c['engine_records_per_s']:.1f} |")
        lines += ["", "| system | records/s | vs Beam stock |", "|---|---|---|"]
        for k, v in s.items():
            lines.append(f"| {k} | {v:.1f} | {v / s['beam_stock']:.2f}x |")
        if "steady_systems" in r:
            st = r["steady_systems"]
            lines += ["", f"Steady state, the test half repeated to {r['steady_records']} records: "
                      + ", ".join(f"{k} {v:.1f} records/s ({v / st['beam_stock']:.2f}x Beam stock)" for k, v in st.items()) + "."]
        extra = []
        for k in ("pipeline_epee", "pipeline_full"):
            if f"{k}_score" in r and r[f"{k}_score"] is not None:
                extra.append(f"{k} {r['metric']} from its Parquet output: {r[f'{k}_score']:.4f}")
        if "ort" in r:
            extra += [f"{k} {r['metric']} {v['score']:.4f} (labels equal to our full depth: "
                      f"{100 * v['labels_equal_engine_fp32_full']:.1f}%)" for k, v in r["ort"].items()]
        if extra:
            lines += ["", "; ".join(extra) + "."]
        prof, ep = r.get("profile", {}), p["epee"].get("engine_profile")
        if prof and ep:
            cost = (f"tokenisation alone {prof['tokenise_records_per_s']:.0f} records/s; mean {prof['mean_tokens']:.0f} tokens "
                    f"per record (the stock handler pads every record to {prof['stock_padded_tokens']})"
                    if "tokenise_records_per_s" in prof else dicom_profile(prof))
            lines += ["", f"Profile: {cost}; EPEE engine batch fill per layer (rows per layer call / engine batch size): "
                      + " ".join(f"{x:.2f}" for x in ep["batch_fill_per_layer"])
                      + f"; padding {100 * ep['padding_fraction']:.0f}% of token slots."]
        plain = (f" (the plain rule's setting: {r['epee_plain_score_drop_points']:+.2f})"
                 if "epee_plain_score_drop_points" in r else "")
        lines += ["", f"EPEE vs full depth: {r['epee_score_drop_points']:+.2f} points lost (negative: EPEE scored higher){plain}; our EPEE pipeline "
                  f"{r['pipeline_epee_vs_beam_stock']:.2f}x Beam's stock RunInference"
                  + (f" in float32, {r['pipeline_epee_vs_beam_stock_same_precision']:.2f}x the stock handler in "
                     f"{meta['precision']}" if "pipeline_epee_vs_beam_stock_same_precision" in r else "")
                  + (f" (steady state: {r['steady_pipeline_epee_vs_beam_stock']:.2f}x"
                     + (f", {r['steady_pipeline_epee_vs_beam_stock_same_precision']:.2f}x"
                        if "steady_pipeline_epee_vs_beam_stock_same_precision" in r else "") + ")"
                     if "steady_pipeline_epee_vs_beam_stock" in r else "") + ".", "",
                  f"![{name}](figures/bench_{name}.png)", ""]
    if meta.get("precision", "float32") != "float32":  # a variant report beside the main one
        lines += ["Scaling and GPU figures: the float32 report, `docs/benchmarks.md`.", ""]
        path.write_text("\n".join(lines) + "\n")
        return
    if (path.parent / "bf16" / "benchmarks.md").is_file():
        lines += ["The same benchmarks with our engine and pipelines in bfloat16 (`--precision bfloat16`), against "
                  "Beam's stock handler in float32 and in bfloat16: [bf16/benchmarks.md](bf16/benchmarks.md).", ""]
    if (path.parent / "int8" / "benchmarks.md").is_file():
        lines += ["The same benchmarks with our engine and pipelines in int8 (`--precision int8`), against Beam's "
                  "stock handler in float32 and after PyTorch's dynamic quantisation: "
                  "[int8/benchmarks.md](int8/benchmarks.md).", ""]
    if (path.parent / "analyses.md").is_file():
        lines += ["Follow-up analyses of these figures (test-sample noise, a self-distillation experiment, memory "
                  "probes, bfloat16): [analyses.md](analyses.md).", ""]
    lines += scaling_section(path.parent / "scaling.json")
    if (path.parent / "peer.md").is_file():
        lines += ["ONNX Runtime as the peer (fp32 with its transformer optimiser, int8), continuous batching across "
                  "RunInference batches and short runs against Beam stock: [peer.md](peer.md).", ""]
    lines += ["## GPU", "", "Not measured: no GPU machine was lent to the session that produced these figures "
              "(`bench.engine --device cuda` and `bench.pipeline` are the commands to run on one).", ""]
    path.write_text("\n".join(lines) + "\n")


def _cores(machine: str) -> int:
    import re

    found = re.search(r"(\d+) cores", machine or "")
    return int(found.group(1)) if found else 1


def scaling_section(path: Path) -> list[str]:
    """The table ``bench.scaling`` records, if it has run."""
    if not path.is_file():
        return ["## Scaling", "", "Not run yet: `.venv/bin/python -m bench.scaling`.", ""]
    data = json.loads(path.read_text())
    lines = ["## Scaling: 1k, 10k, 100k notes", "",
             f"Generated by `{data['command']}` on {data['date']} ({data['machine']}). {data['what']}", "",
             "| notes | archive MB | mean words | runner | workers x threads | records/s | records/s per core | seconds | "
             "mean exit layer | peak RSS MiB (driver) | largest worker RSS MiB | measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cores = _cores(data["machine"])
    for r in data["rows"]:
        threads = r.get("torch_threads") or (cores if r["workers"] == 1 else max(1, cores // r["workers"]))
        per_core = r.get("records_per_s_per_core") or round(r["records_per_s"] / min(cores, r["workers"] * threads), 1)
        lines.append(f"| {r['notes']} | {r['bytes'] / 1e6:.1f} | {r['mean_words']} | {r.get('runner', 'direct')} | "
                     f"{r['workers']} x {threads} | {r['records_per_s']} | {per_core} | "
                     f"{r['seconds']} | {r['mean_exit_layer']:.2f} | {r['peak_rss_mib']:.0f} | {r['largest_child_rss_mib']:.0f} | "
                     f"{r.get('date', data['date'])} |")
    traced = [r for r in data["rows"] if r.get("rss_by_tenth")]
    if traced:  # bench.scaling samples RSS during each run (Linux): growth shows as a rising row
        lines += ["", "Resident memory through each run, the largest sample in each tenth of its wall time (MiB; "
                  "with 2 workers the largest worker, with 1 the driver, which runs the model):", "",
                  "| notes | runner | workers | 1st | 2nd | 3rd | 4th | 5th | 6th | 7th | 8th | 9th | 10th | measured |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in traced:
            col = 1 if r["workers"] > 1 or r.get("runner") == "dask" else 0  # Dask: the workers run the model
            lines.append(f"| {r['notes']} | {r.get('runner', 'direct')} | {r['workers']} | "
                         + " | ".join(str(t[col]) for t in r["rss_by_tenth"])
                         + f" | {r.get('measured', r.get('date', data['date']))} |")
    return lines + [""] + [f"{n}\n" for n in data.get("notes", [])]


def render_saved(docs: Path) -> None:
    """Re-render docs/benchmarks.md from docs/benchmarks.json (and scaling.json) without measuring."""
    results = json.loads((docs / "benchmarks.json").read_text()) if (docs / "benchmarks.json").is_file() else {}
    ordered = {k: results[k] for k in CORPORA if k in results}
    render(ordered, results.get("_meta") or run_meta(1.0), docs / "benchmarks.md")


def run_meta(tolerance: float, confidence: float | None = None, precision: str = "float32", docs: str = "docs",
             options: str = "") -> dict:
    return {"command": ".venv/bin/python -m bench.run_all" + (f" --precision {precision}" if precision != "float32" else "")
            + options + (f" --docs {docs}" if docs != "docs" else ""),
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "tolerance": tolerance, "confidence": confidence,
            "precision": precision}


def main(argv: list[str] | None = None) -> None:
    from epee.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=list(CORPORA))
    p.add_argument("--models", default="models")
    p.add_argument("--docs", default="docs")
    p.add_argument("--max-test", type=int, default=500, help="records in the measured half (at most)")
    p.add_argument("--tolerance", type=float, default=1.0, help="calibration tolerance in points")
    p.add_argument("--confidence", type=float, default=0.9, help="bootstrap confidence of the calibration rule")
    p.add_argument("--stock-batch-size", type=int, default=64,
                   help="RunInference batch size (min = max) of Beam's stock handler; it is no faster with larger "
                        "batches (docs/analyses.md)")
    p.add_argument("--pipeline-batch-size", type=int, default=0,
                   help="RunInference batch size (min = max) of our pipelines (0: the pipeline's default, one engine "
                        "window); when it differs from the stock's, our EPEE pipeline also runs at the stock's")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="our engine and pipelines (calibration too); adds Beam's stock handler in that precision "
                        "(beam_stock and the reference stay float32). Write it to another --docs (docs/bf16)")
    p.add_argument("--decode-processes", type=int, default=2,
                   help="decoder child processes of our DICOM pipelines (--decode_processes; the pipeline's own "
                        "default is 1)")
    p.add_argument("--steady-records", type=int, default=2000,
                   help="also time the Beam systems on the test half repeated to at least this many records "
                        "(steady state; 0: not)")
    p.add_argument("--ort", action="store_true",
                   help="also run ONNX Runtime fp32 (transformer optimiser) and int8 at full depth on the text "
                        "classification corpora (bench.onnx_peer; pip install -r requirements-bench.txt)")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)  # before the corpora run: each one's results are written as it ends
    raw_path = docs / "benchmarks.json"
    results = json.loads(raw_path.read_text()) if raw_path.is_file() else {}
    work = Path(tempfile.mkdtemp(prefix="epee-bench-all-"))
    for name in CORPORA:
        if args.only and name not in args.only:
            continue
        model_dir = Path(args.models) / name
        if not (model_dir / "epee_config.json").is_file():
            from bench import real_models

            real_models.main(["--only", name, "--models", args.models, "--docs", args.docs])
        t0 = time.time()
        results[name] = bench_corpus(name, str(model_dir), work, args.max_test, args.tolerance, args.stock_batch_size,
                                     args.steady_records, args.confidence, args.precision, args.pipeline_batch_size,
                                     args.decode_processes, args.ort)
        results[name]["seconds"] = round(time.time() - t0, 1)
        from epee.config import EngineConfig
        from epee.kernels import resolve_linear_kernel

        results[name]["measured"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                                     "linear_kernel": resolve_linear_kernel(EngineConfig().linear_kernel, "cpu",
                                                                            args.precision)}
        raw_path.write_text(json.dumps(results, indent=2, default=float))
        print(json.dumps({k: v for k, v in results[name].items() if k != "sweep_test"}, default=float))
    meta = run_meta(args.tolerance, args.confidence, args.precision, args.docs,
                    "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, default in
                            (("stock_batch_size", 64), ("pipeline_batch_size", 0), ("decode_processes", 2))
                            if getattr(args, k) != default))
    figs = docs / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    results["_meta"] = meta
    raw_path.write_text(json.dumps(results, indent=2, default=float))
    ordered = {k: results[k] for k in CORPORA if k in results}
    plots(ordered, figs)
    render(ordered, meta, docs / "benchmarks.md")


if __name__ == "__main__":
    main()
