"""Sparse backbones and soft prompts with early exit, on real data (MediSwift x EPEE). Not a test.

For medical_abstracts and DDI it starts from the dense MiniLM-L6 early-exit model that
``bench.real_models`` trained (trained first if missing) and, for sparsity 0, 0.5 and 0.75 (global
magnitude pruning), without and with 8 soft prompts, runs ``epee sparsify``: one epoch of sparse
training with the masks enforced (at 0: plain continued training, the control), saved; then one
epoch of dense fine-tuning with the masks released, saved. Every saved model is calibrated with
``epee calibrate`` (bootstrap rule, 1 point) and evaluated on the dev set at full depth and with
its calibrated EPEE policy: score, mean exit layer, and multiply-adds relative to the original
dense model at full depth (so soft prompts' extra tokens count against them).

Writes docs/sparsity.md, docs/sparsity.json and docs/figures/sparsity_<corpus>.png. With the
default sizes (1600 training examples per epoch, 400 dev records per corpus) a 2-core CPU needs
about an hour.

    .venv/bin/python -m bench.sparsity_real
    .venv/bin/python -m bench.sparsity_real --only ddi --max-train 600
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine

CORPORA = {  # name: (training examples per epoch, dev examples at most): the published table's sizes
    "medical_abstracts": (1600, 400),  # every training example
    "ddi": (1600, 400),
}
SPARSITIES = (0.0, 0.5, 0.75)
PROMPTS = (0, 8)


def measure(model: str, dev, baseline_macs: float) -> dict:
    from epee.workflows import CalibrationSpec, EvaluateSpec, calibrate, evaluate

    cal = calibrate(model, CalibrationSpec(data=dev)).record
    full = evaluate(model, EvaluateSpec(data=dev, policy="none")).summary
    ee = evaluate(model, EvaluateSpec(data=dev)).summary
    metric = cal["metric"]
    return {"metric": metric, "full_score": full[metric], "epee_score": ee[metric],
            "epee_setting": {k: cal["chosen"][k] for k in ("entropy_threshold", "patience")},
            "mean_exit_layer": ee["mean_exit_layer"], "layer_speedup": ee["layer_speedup"],
            "full_macs_rel": full["macs_per_record"] / baseline_macs, "epee_macs_rel": ee["macs_per_record"] / baseline_macs,
            "epee_saved_by_exit": ee["macs_saved_by_exit"], "epee_saved_by_sparsity": ee["macs_saved_by_sparsity"],
            "records": ee["records"]}


FROZEN = "prompt tuning, backbone frozen"
TEACHER = "dense teacher"


def run_corpus(name: str, models: Path, work: Path, max_train: int, max_dev: int, epochs: int, lr: float,
               sparsities=SPARSITIES, prompt_counts=PROMPTS, frozen_prompts: int = 0, gradual_steps: int = 0,
               teacher: float = 0.0) -> dict:
    src = str(models / name)
    from epee.workflows import DataSpec, EvaluateSpec, SparsifyJob, evaluate, sparsify

    dev = DataSpec(max_examples=max_dev)
    base = evaluate(src, EvaluateSpec(data=dev, policy="none")).summary
    baseline = base["macs_per_record"]
    metric = next(k for k in ("micro_f1_positive", "accuracy") if k in base)  # the primary metric: DDI reports accuracy too
    model_id = json.loads((Path(src) / "epee_config.json").read_text()).get("model_id")
    out = {"source": src, "baseline_model_id": model_id, "baseline_full_score": base.get(metric),
           "baseline_macs_per_record": baseline, "runs": []}

    def add_row(model_dir: Path, sparsity: float, prompts: int, stage: str, seconds: float) -> None:
        doc = json.loads((model_dir / "epee_config.json").read_text())
        row = {"sparsity_target": sparsity, "prompts": prompts, "stage": stage,
               "measured_sparsity": doc["sparsity"]["measured"], "train_seconds_both_stages": round(seconds, 1),
               **measure(str(model_dir), dev, baseline)}
        out["runs"].append(row)
        print(json.dumps({"corpus": name, **row}), flush=True)

    # gradual pruning and distillation from the dense model: their rows are told apart from plain
    # one-shot pruning by their stage names
    extra = {"gradual_steps": gradual_steps, "teacher_distill": teacher}
    notes = [f"gradual, {gradual_steps} steps"] if gradual_steps else []
    if teacher:
        notes.append(f"{TEACHER} {teacher:g}")
    suffix = f" ({', '.join(notes)})" if notes else ""
    for prompts in prompt_counts:
        for s in sparsities:
            tag = (f"s{int(100 * s)}_p{prompts}" + (f"_g{gradual_steps}" if gradual_steps else "")
                   + (f"_t{teacher:g}" if teacher else ""))
            sparse_dir, dense_dir = work / name / f"{tag}_sparse", work / name / f"{tag}_dense"
            t0 = time.time()
            sparsify(SparsifyJob(model=src, output=str(dense_dir), sparse_output=str(sparse_dir), sparsity=s,
                                 epochs=epochs, dense_epochs=epochs, num_prompts=prompts, max_train=max_train,
                                 max_dev=max_dev, lr=lr, progress=False, **extra))
            seconds = time.time() - t0
            for stage, d in (("sparse training", sparse_dir), ("dense fine-tuning", dense_dir)):
                add_row(d, s, prompts, stage + suffix, seconds)
    if frozen_prompts:  # soft prompts and exit heads learn, the (pruned) backbone stays as it is
        for s in sparsities:
            d = work / name / f"s{int(100 * s)}_p{frozen_prompts}_frozen"
            t0 = time.time()
            sparsify(SparsifyJob(model=src, output=str(d), sparsity=s, epochs=epochs, dense_epochs=0,
                                 num_prompts=frozen_prompts, freeze_backbone=True, max_train=max_train,
                                 max_dev=max_dev, progress=False))
            add_row(d, s, frozen_prompts, FROZEN, time.time() - t0)
    return out


def plot(name: str, data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.4))
    ax = fig.add_subplot()
    colours = {0.0: "tab:blue", 0.5: "tab:orange", 0.75: "tab:red"}
    for r in data["runs"]:
        marker = "^" if r["stage"] == FROZEN else "o" if r["stage"].startswith("sparse training") else "s"
        fill = colours[r["sparsity_target"]] if r["prompts"] == 0 else "white"
        edge = "black" if TEACHER in r["stage"] else colours[r["sparsity_target"]]
        ax.scatter([r["full_macs_rel"]], [100 * r["full_score"]], marker=marker, s=40, color=fill,
                   edgecolor=edge, linewidths=1.5)
        ax.scatter([r["epee_macs_rel"]], [100 * r["epee_score"]], marker=marker, s=70, color=fill,
                   edgecolor=edge, linewidths=1.5, alpha=0.8)
        ax.annotate("", xy=(r["epee_macs_rel"], 100 * r["epee_score"]), xytext=(r["full_macs_rel"], 100 * r["full_score"]),
                    arrowprops={"arrowstyle": "->", "color": colours[r["sparsity_target"]], "alpha": 0.4})
    ax.axhline(100 * data["baseline_full_score"], color="grey", ls="--", lw=1, label="original dense model, full depth")
    for s, c in colours.items():
        ax.scatter([], [], color=c, label=f"{int(100 * s)}% sparse")
    ax.scatter([], [], marker="o", color="grey", label="after sparse training")
    ax.scatter([], [], marker="s", color="grey", label="after dense fine-tuning")
    if any(r["stage"] == FROZEN for r in data["runs"]):
        ax.scatter([], [], marker="^", color="grey", label="prompts + heads only, backbone frozen")
    ax.scatter([], [], marker="o", color="white", edgecolor="grey", label="with soft prompts (hollow)")
    if any(TEACHER in r["stage"] for r in data["runs"]):
        ax.scatter([], [], marker="o", color="grey", edgecolor="black", linewidths=1.5, label="with a dense teacher (black edge)")
    ax.set_xscale("log")
    ax.set_xlabel("multiply-adds relative to the dense model at full depth (log); arrow: full depth -> EPEE")
    ax.set_ylabel(f"dev {data['runs'][0]['metric']} (x100)")
    ax.set_title(f"{name}: sparsity x soft prompts x early exit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run's rows (the options that change them; --only and paths left out)."""
    cmd = ".venv/bin/python -m bench.sparsity_real" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("max_train", "max_dev") if getattr(args, k))
    if args.epochs != 1:
        cmd += f" --epochs {args.epochs}"
    if args.lr != 8e-5:
        cmd += f" --lr {args.lr:g}"
    if list(args.sparsities) != list(SPARSITIES):
        cmd += " --sparsities " + " ".join(f"{s:g}" for s in args.sparsities)
    if list(args.prompts) != list(PROMPTS):
        cmd += " --prompts" + "".join(f" {n}" for n in args.prompts)
    if args.frozen_prompts:
        cmd += f" --frozen-prompts {args.frozen_prompts}"
    if args.gradual_steps:
        cmd += f" --gradual-steps {args.gradual_steps}"
    if args.teacher_distill:
        cmd += f" --teacher-distill {args.teacher_distill:g}"
    return cmd


def sizes(args: argparse.Namespace) -> str:
    """The sizes a run trained and scored on; a default the corpora share is written as its number, so
    rows of a run with the defaults and of one naming them match."""
    def size(given: int | None, i: int):
        shared = {v[i] for v in CORPORA.values()}
        return given or (shared.pop() if len(shared) == 1 else "per corpus")

    return (f"training examples per epoch: {size(args.max_train, 0)}; dev records: {size(args.max_dev, 1)}"
            + (f"; {args.epochs} epochs per stage" if args.epochs != 1 else ""))


def row_run(row: dict, meta: dict | None) -> dict:
    """The run a row came from; rows written before rows recorded it carry the run recorded for the whole file."""
    return row.get("run") or {k: (meta or {}).get(k) for k in ("command", "date", "machine", "sizes")}


def whole_layer_note(runs: list[dict]) -> str:
    """What the MACs of runs recorded before two-step layers (``EngineConfig.split_layers``) mean today."""
    old = [str(i) for i, r in enumerate(runs, 1) if r.get("layers") != "two-step"]
    if not old:
        return ""
    return (f" Run{'s' if len(old) > 1 else ''} {', '.join(old)} counted MACs with every layer run whole, before "
            "two-step layers (docs/engine.md). For medical abstracts nothing changes: its mean-pooled heads read "
            "every token. On DDI the engine now runs a layer where records may exit at the two entity markers "
            "first, so an exiting record pays its exit layer's keys and values only, and at full depth the last "
            "layer is split too. Measured on the original DDI model (`bench.split_layers`), today's count is 0.672 "
            "of the whole-layer count under its stored policy and about 0.86 at full depth. So the DDI 'MACs EPEE' "
            "columns of those runs would read about a fifth lower relative to the original (0.672 / 0.86 = 0.78 "
            "for the original model; less where records exit later). The scores and mean exit layers are "
            "unchanged.")


def render(results: dict, meta: dict, docs: Path) -> None:
    runs: list[dict] = []  # distinct runs behind the rows, in order of first appearance
    for data in results.values():
        for r in data["runs"]:
            if row_run(r, meta) not in runs:
                runs.append(row_run(r, meta))
    lines = ["# Sparse backbones, soft prompts and early exit on real data", "",
             f"Torch {meta['torch']}, no GPU. The rows come from {len(runs)} run{'s' if len(runs) > 1 else ''} (column 'run'):",
             ""]
    lines += [f"{i}. `{r['command']}` on {r['date']}: {r['machine']}; {r['sizes']}." for i, r in enumerate(runs, 1)]
    lines += ["",
             "Each row starts from the dense MiniLM-L6 early-exit model of `bench.real_models` and runs `epee sparsify`: "
             "global magnitude pruning to the target, one epoch of sparse training with the masks enforced (at 0%: plain "
             "continued training, the control), then one epoch of dense fine-tuning with the masks released (MediSwift's "
             "recipe); optionally 8 soft prompts trained with the unfrozen backbone. Every model is calibrated with "
             "`epee calibrate` (bootstrap rule, 1 point) on the dev set and scored on the same dev set, so the EPEE "
             "columns are dev-calibrated (optimistic for new data; docs/benchmarks.md measures on held-out halves). "
             "Multiply-adds (MACs) are per record, relative to the original dense model at full depth on the same "
             "records, counting a zero weight as free (hardware that exploits sparsity); soft prompts' extra tokens "
             "count against them."
             + (" Rows 'prompt tuning, backbone frozen' (`--frozen-prompts N`): the same pruning, then one stage "
                "training only N soft prompts and the exit heads (head learning rate) on the pruned, frozen backbone; "
                "no dense stage." if any(r["stage"] == FROZEN for d in results.values() for r in d["runs"]) else "")
             + (" Rows '(dense teacher β)' (`--teacher-distill β`): in both stages every exit head's loss is "
                "(1 - β) · its label loss + β · T² · KL to the original dense model's full-depth distribution "
                "softened by T = 2." if any(TEACHER in r["stage"] for d in results.values() for r in d["runs"]) else "")
             + whole_layer_note(runs),
             ""]
    for name, data in results.items():
        metric = data["runs"][0]["metric"] if data["runs"] else ""
        lines += [f"## {name}", ""]
        if data.get("baseline_note"):  # written by hand into sparsity.json, kept by re-rendering
            lines += [data["baseline_note"], ""]
        model = f" (`{data['baseline_model_id']}`)" if data.get("baseline_model_id") else ""
        lines += [f"Original dense model{model} at full depth: {metric} {data['baseline_full_score']:.4f}, "
                  f"{data['baseline_macs_per_record'] / 1e9:.2f} GMACs per record.", "",
                  f"| run | sparsity | prompts | stage | measured sparsity | {metric} full depth | MACs full depth | "
                  f"{metric} EPEE | mean exit layer | MACs EPEE | saved by exit / by sparsity |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["runs"]:
            lines.append(f"| {runs.index(row_run(r, meta)) + 1} | {int(100 * r['sparsity_target'])}% | {r['prompts']} | "
                         f"{r['stage']} | {r['measured_sparsity']:.3f} | "
                         f"{r['full_score']:.4f} | {r['full_macs_rel']:.3f} | {r['epee_score']:.4f} | "
                         f"{r['mean_exit_layer']:.2f} | {r['epee_macs_rel']:.3f} | "
                         f"{100 * r['epee_saved_by_exit']:.0f}% / {100 * r['epee_saved_by_sparsity']:.0f}% |")
        lines += ["", f"![{name}](figures/sparsity_{name}.png)", ""]
    speed = docs / "sparse_speed.json"
    lines += ["## What sparsity buys in time", ""]
    if speed.is_file():
        doc = json.loads(speed.read_text())
        for dev, block in doc.items():
            m = block["meta"]
            lines += [f"`{m['command']}` on {m['date']} ({m['machine']}{', ' + m['gpu'] if 'gpu' in m else ''}, "
                      f"torch {m['torch']}):", ""]
            lines += ["| measurement | weights / sparsity | kernel or batch | time | speedup vs dense |", "|---|---|---|---|---|"]
            for r in block["rows"]:
                if "ms" in r:
                    lines.append(f"| {r['what']} | {r['sparsity']:.2f} | {r['kernel']} | {r['ms']:.2f} ms | {r['speedup']:.2f}x |")
                else:
                    lines.append(f"| {r['what']} | {r['weights']} | batch {r['batch_size']} | "
                                 f"{r['records_per_s']:.1f} records/s | {r['speedup']:.2f}x |")
            lines.append("")
    else:
        lines += ["Not measured yet: `.venv/bin/python -m bench.sparse_speed`.", ""]
    if "cuda" not in (json.loads(speed.read_text()) if speed.is_file() else {}):
        lines += ["GPU (2:4 semi-structured kernels): not measured, no GPU machine was lent to the session that "
                  "produced these figures (`.venv/bin/python -m bench.sparse_speed --device cuda` on one).", ""]
    (docs / "sparsity.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=list(CORPORA))
    p.add_argument("--models", default="models")
    p.add_argument("--docs", default="docs")
    p.add_argument("--max-train", type=int, help="training examples per epoch (default per corpus)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of each stage")
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--max-dev", type=int, help="dev examples at most (default per corpus)")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--prompts", type=int, nargs="*", default=list(PROMPTS),
                   help="soft prompts trained with the backbone (empty: none of these runs)")
    p.add_argument("--frozen-prompts", type=int, default=0, metavar="N",
                   help="also, at each sparsity, train N soft prompts and the exit heads with the backbone frozen "
                        "(pruned, no dense stage)")
    p.add_argument("--gradual-steps", type=int, default=0, metavar="N",
                   help="prune gradually (cubic) over the first N steps of sparse training instead of at once")
    p.add_argument("--teacher-distill", type=float, default=0.0, metavar="BETA",
                   help="epee sparsify --teacher-distill: the pruned model also learns the dense model's "
                        "full-depth distribution, in both stages")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)  # before training: the results are written after each corpus
    raw = docs / "sparsity.json"
    results = json.loads(raw.read_text()) if raw.is_file() else {}
    if args.render_only and not results:
        raise SystemExit(f"--render-only: no results in {raw}; run without it first")
    meta = results.pop("_meta", None)
    if not args.render_only:
        run = {"command": command_line(args), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "sizes": sizes(args), "layers": "two-step"}  # MACs as the engine counts them since split_layers
        work = Path(tempfile.mkdtemp(prefix="epee-sparsity-"))
        for name, (n_train, n_dev) in CORPORA.items():
            if args.only and name not in args.only:
                continue
            if not (Path(args.models) / name / "epee_config.json").is_file():
                from bench import real_models

                real_models.main(["--only", name, "--models", args.models, "--docs", args.docs])
            fresh = run_corpus(name, Path(args.models), work, args.max_train or n_train, args.max_dev or n_dev,
                               args.epochs, args.lr, args.sparsities, args.prompts, args.frozen_prompts,
                               args.gradual_steps, args.teacher_distill)
            for r in fresh["runs"]:
                r["run"] = run
            # rows of earlier runs for other (sparsity, prompts, stage) settings are kept if they trained and
            # scored on as many examples; rows of other sizes are dropped, one table never mixes them
            key = lambda r: (r["sparsity_target"], r["prompts"], r["stage"])  # noqa: E731
            new = {key(r) for r in fresh["runs"]}
            kept = [r for r in results.get(name, {}).get("runs", []) if key(r) not in new]
            # ... and started from the same model (rows of older runs name none: a model retrained since
            # bench.real_models last trained it scores differently, so they are dropped too)
            earlier = results.get(name, {})
            same_model = earlier.get("baseline_model_id") == fresh["baseline_model_id"]
            same = [r for r in kept if row_run(r, meta).get("sizes") == run["sizes"] and same_model]
            if same_model and earlier.get("baseline_note"):
                fresh["baseline_note"] = earlier["baseline_note"]
            if len(same) < len(kept):
                print(f"{name}: dropped {len(kept) - len(same)} earlier rows trained or scored on other sizes "
                      "or started from another model")
            fresh["runs"] = same + fresh["runs"]
            results[name] = fresh
            raw.write_text(json.dumps({**results, "_meta": meta or {}}, indent=2) + "\n")
        meta = {**run, "torch": torch.__version__}
    raw.write_text(json.dumps({**results, "_meta": meta}, indent=2) + "\n")
    for name, data in results.items():
        if data.get("runs"):
            plot(name, data, docs / "figures" / f"sparsity_{name}.png")
    render({k: results[k] for k in CORPORA if k in results}, meta, docs)


if __name__ == "__main__":
    main()
