"""Calibration under shift: does the chosen exit setting keep its promise on records of another origin?

Not a test. Run from the repository root after `bench.real_models` has trained the models:

    .venv/bin/python -m bench.calibration_shift                 # every corpus, both directions
    .venv/bin/python -m bench.calibration_shift --only ddi --seeds 50

Each corpus gives two labelled sides of different origin, none of whose records the model trained on:

- ddi: the model's dev documents (20% of DDI train by document, seed 13) from DrugBank / from MedLine;
- chemprot: dev.jsonl / the fifth of train.jsonl's sentences held apart from training;
- phee: dev.jsonl / the fifth of train.jsonl's abstracts held apart from training;
- medical_abstracts: the two label-stratified halves (seeded) of dev.csv.

For each direction (calibrate on one side, test on the other) and each rule:

- ``bootstrap``: `epee calibrate` on the calibration side's labels (paired bootstrap, tolerance 1
  point at confidence 0.9), the setting applied to the test side;
- ``ltt-labelled``: `epee calibrate --rule ltt` on the calibration side's labels (risk: a correct
  full-depth answer lost, ε = the tolerance, δ = 1 - confidence), applied to the test side;
- ``ltt-unlabelled``: `epee calibrate --unlabeled` on the test side's own records, without labels
  (agreement with full depth ≥ 1 - ε at confidence 1 - δ): each seeded resample calibrates on a
  keyed half of the test side and is measured on the other half.

Reported: the score drop on the test side (full depth minus the setting, in points), the mean exit
layer there, whether the drop is within the tolerance and, for the label-free rule, the realised
disagreement with full depth and the share of resamples where it is at most ε. The model runs once
per side (every exit head, float32); the rules are simulated on those outputs with the library's own
functions (epee.policy_search, epee.workflows.score), which is what `epee calibrate` runs.

Writes ``docs/calibration_shift.json``, ``docs/figures/calibration_shift.png`` and the block between
the markers in ``docs/calibration.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from bench.real_models import DATA, SPLITS

BEGIN, END = "<!-- calibration_shift:begin -->", "<!-- calibration_shift:end -->"
RULES = ("bootstrap", "ltt-labelled", "ltt-unlabelled")


@dataclass
class Side:
    """One labelled set of records as the model sees them: encoded windows and every head's outputs."""

    name: str
    ids: list[str]
    encoded: object  # epee.workflows.data.EncodedSet
    outputs: object  # epee.layer_outputs.LayerOutputs, one row per window

    @property
    def records(self) -> int:
        return self.encoded.examples


def build_side(bundle, name: str, examples: list, batch_size: int) -> Side:
    from epee.calibration import collect_layer_outputs
    from epee.workflows.data import encode_windows
    from epee.workflows.score import _kept_examples

    encoded = encode_windows(bundle.preprocessor, examples, bundle.data_task)
    kept = _kept_examples(bundle.preprocessor, examples, bundle.data_task) if encoded.skipped else examples
    outputs = collect_layer_outputs(bundle.model, encoded.samples, batch_size=batch_size)
    return Side(name, [str(ex.id) for ex in kept], encoded, outputs)


def subset(side: Side, records: list[int], name: str) -> Side:
    """The side restricted to ``records`` (indices of encoded examples), windows and all."""
    from epee.layer_outputs import LayerOutputs
    from epee.workflows.data import EncodedSet

    new = {r: i for i, r in enumerate(records)}
    windows = [w for w, owner in enumerate(side.encoded.owners) if owner in new]
    index = torch.as_tensor(windows, dtype=torch.long)
    o = side.outputs
    outputs = LayerOutputs([p[index] for p in o.probs], None if o.token_mask is None else o.token_mask[index],
                           None if o.lengths is None else o.lengths[index])
    enc = side.encoded
    encoded = EncodedSet([enc.samples[w] for w in windows], [enc.targets[w] for w in windows],
                         [new[enc.owners[w]] for w in windows], len(records), 0)
    return Side(name, [side.ids[r] for r in records], encoded, outputs)


class Scorer:
    """The task's primary metric and full-depth agreement of a setting on a side, per record."""

    def __init__(self, bundle):
        from epee.workflows.data import model_task, score_function

        cfg = bundle.model.config
        self.label_names, self.negative = cfg.label_names, cfg.negative_label
        self.task = model_task(bundle.data_task)
        self.metric, self.fn = score_function(bundle.data_task, cfg.label_names, cfg.negative_label)

    def predictions(self, side: Side, exit_layers: torch.Tensor) -> list:
        from epee.policy_search import record_predictions

        return record_predictions(side.outputs, exit_layers, None if side.outputs.is_token else side.encoded.owners)

    def exit_layers(self, side: Side, policy) -> torch.Tensor:
        from epee.layer_outputs import _exit_layers, _trace
        from epee.policies import ExitPolicy

        if policy is None:  # full depth
            return torch.full((side.outputs.num_samples,), side.outputs.num_layers, dtype=torch.long)
        return _exit_layers(_trace(side.outputs), ExitPolicy(policy, side.outputs.num_layers))

    def measure(self, side: Side, policy) -> dict:
        """Score drop (points), mean exit layer (over windows) and disagreement with full depth."""
        from epee.policy_search import span_sets

        full = self.predictions(side, self.exit_layers(side, None))
        layers = self.exit_layers(side, policy)
        preds = self.predictions(side, layers)
        gold = side.encoded.gold
        if side.outputs.is_token:
            a, b = span_sets(preds, self.label_names), span_sets(full, self.label_names)
        else:
            a, b = preds, full
        full_score, score = float(self.fn(gold, full)), float(self.fn(gold, preds))
        differ = int(sum(x != y for x, y in zip(a, b)))
        out = {"full_score": full_score, "score": score, "drop_points": 100.0 * (full_score - score),
               "mean_exit_layer": float(layers.double().mean()),
               "disagreement": differ / len(a) if a else 0.0}
        if self.task == "relation" and self.negative in self.label_names:  # what the label-free rule certifies
            found = sum(f != self.label_names.index(self.negative) for f in full)
            out["disagreement_per_found_relation"] = differ / found if found else 0.0
        return out


def window_gold(side: Side) -> list:
    return [t.tolist() if hasattr(t, "tolist") else t for t in side.encoded.targets]


def labelled_rules(bundle, scorer: Scorer, cal: Side, spec) -> dict:
    """The stored policy each labelled rule chooses on ``cal`` (as `epee calibrate --rule ...`)."""
    from epee.calibration import sweep
    from epee.policy_search import choose_robust
    from epee.workflows.score import _ltt_labelled, _policy_of

    gold = window_gold(cal)
    points = sweep(cal.outputs, lambda preds: scorer.fn(gold, preds), cal.outputs.num_layers)
    tolerance = spec.tolerance / 100.0
    robust = choose_robust(cal.outputs, points, gold, scorer.fn, tolerance, kind="epee",
                           confidence=spec.confidence, resamples=spec.resamples)
    ltt, _ = _ltt_labelled(cal.outputs, points, cal.encoded, bundle, tolerance, round(1.0 - spec.confidence, 12), spec.seed)
    return {"bootstrap": _policy_of(robust.point, 1), "ltt-labelled": _policy_of(ltt.point, 1)}


def keyed_half(side: Side, seed: int, cap: int) -> tuple[list[int], list[int]]:
    """A keyed half of the side's records (at most ``cap``) to calibrate on, and the rest."""
    from epee.workflows.data import record_key

    order = sorted(range(side.records), key=lambda r: record_key(side.ids[r], seed))
    n = min(cap, side.records // 2)
    return sorted(order[:n]), sorted(order[n:])


def unlabelled_rule(scorer: Scorer, test: Side, spec, seeds: int) -> dict:
    from epee.workflows.score import _policy_of, unlabeled_ltt

    runs = []
    for s in range(seeds):
        seed = spec.seed + s
        cal_idx, eval_idx = keyed_half(test, seed, spec.sample)
        cal, held = subset(test, cal_idx, "calibrate"), subset(test, eval_idx, "measure")
        choice, _, _ = unlabeled_ltt(cal.outputs, cal.encoded, cal.ids, scorer.label_names, spec.epsilon, spec.delta,
                                     seed, negative_label=scorer.negative)
        policy = _policy_of(choice.point, 1)
        m = scorer.measure(held, None if policy.kind == "none" else policy)
        runs.append({"seed": seed, "calibration_records": len(cal_idx), "measured_records": len(eval_idx),
                     "policy": {"kind": policy.kind, "entropy_threshold": policy.entropy_threshold,
                                "patience": policy.patience}, **m})
    dis = np.array([r.get("disagreement_per_found_relation", r["disagreement"]) for r in runs])
    drops = np.array([r["drop_points"] for r in runs])
    per = "relation found at full depth" if "disagreement_per_found_relation" in runs[0] else "record"
    return {"resamples": runs, "epsilon": spec.epsilon, "delta": spec.delta, "disagreement_per": per,
            "share_disagreement_within_epsilon": float(np.mean(dis <= spec.epsilon + 1e-12)),
            "mean_disagreement": float(dis.mean()), "mean_drop_points": float(drops.mean()),
            "worst_drop_points": float(drops.max()),
            "share_drop_within_tolerance": float(np.mean(drops <= spec.tolerance + 1e-9)),
            "mean_exit_layer": float(np.mean([r["mean_exit_layer"] for r in runs]))}


def stratified_halves(examples: list, seed: int) -> tuple[list, list]:
    from epee.workflows.data import record_key

    a, b = [], []
    by_label: dict = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    for label in sorted(by_label, key=str):
        for i, ex in enumerate(sorted(by_label[label], key=lambda e: record_key(str(e.id), seed))):
            (a if i % 2 == 0 else b).append(ex)
    return a, b


def corpus_sides(name: str, model_dir: str, seed: int):
    """(bundle, side A examples, side B examples, (name A, name B))."""
    from epee.workflows.data import DataSpec, dev_set, load

    bundle, dev, _ = dev_set(model_dir, DataSpec())
    fields = DataSpec().fields.resolve(bundle.sections.get("training", {}).get("data", {}).get("fields"))
    negative = bundle.model.config.negative_label
    if name == "ddi":
        a = [ex for ex in dev if "DrugBank" in str(ex.group)]
        b = [ex for ex in dev if "MedLine" in str(ex.group)]
        return bundle, a, b, ("DrugBank", "MedLine")
    if name in ("chemprot", "phee"):
        held = load(str(SPLITS / name / "held_apart.jsonl"), bundle.data_task, fields, negative)
        return bundle, dev, held, ("dev", "train held apart")
    if name == "medical_abstracts":
        a, b = stratified_halves(dev, seed)
        return bundle, a, b, ("dev half A", "dev half B")
    raise ValueError(f"no shift split for {name!r}")


CORPORA = ("ddi", "chemprot", "phee", "medical_abstracts")


def run_corpus(name: str, model_dir: str, spec, seeds: int, batch_size: int) -> dict:
    t0 = time.time()
    bundle, a_ex, b_ex, (a_name, b_name) = corpus_sides(name, model_dir, spec.seed)
    sides = {a_name: build_side(bundle, a_name, a_ex, batch_size), b_name: build_side(bundle, b_name, b_ex, batch_size)}
    scorer = Scorer(bundle)
    directions = []
    for cal_name, test_name in ((a_name, b_name), (b_name, a_name)):
        cal, test = sides[cal_name], sides[test_name]
        rules = {}
        for rule, policy in labelled_rules(bundle, scorer, cal, spec).items():
            m = scorer.measure(test, None if policy.kind == "none" else policy)
            rules[rule] = {"policy": {"kind": policy.kind, "entropy_threshold": policy.entropy_threshold,
                                      "patience": policy.patience},
                           "calibration_side": scorer.measure(cal, None if policy.kind == "none" else policy),
                           **m, "within_tolerance": m["drop_points"] <= spec.tolerance + 1e-9}
        rules["ltt-unlabelled"] = unlabelled_rule(scorer, test, spec, seeds)
        directions.append({"calibrate_on": cal_name, "test_on": test_name, "calibration_records": cal.records,
                           "test_records": test.records, "rules": rules})
    return {"metric": scorer.metric, "directions": directions, "seconds": round(time.time() - t0, 1)}


def targets(direction: dict, spec) -> dict:
    u = direction["rules"]["ltt-unlabelled"]
    boot = direction["rules"]["bootstrap"]
    return {"disagreement_guarantee": u["share_disagreement_within_epsilon"] >= 1 - spec.delta,
            "drop_within_tolerance": u["share_drop_within_tolerance"] >= 1 - spec.delta,
            "depth_within_bootstrap_plus_half": u["mean_exit_layer"] <= boot["mean_exit_layer"] + 0.5}


def power_rows(epsilon: float, delta: float, sizes=(75, 150, 300, 500, 1000, 1500, 3000, 6000),
               rates=(0.005, 0.01, 0.015)) -> list[str]:
    """What fixed-sequence LTT can certify with n tested records: the most disagreeing records a
    certified setting may show (its p-value P[Binom(n, ε) <= k] <= δ), and the chance that a
    setting of true rate r is certified (P[Binom(n, r) <= k_max]). Exact, no simulation."""
    from epee.ltt import binomial_cdf

    rows = ["| records tested | most disagreeing records certifiable | as a rate | "
            + " | ".join(f"P(certified) at true rate {r:g}" for r in rates) + " |",
            "|---|---|---|" + "---|" * len(rates)]
    for n in sizes:
        k = -1
        while k + 1 <= n and binomial_cdf(k + 1, n, epsilon) <= delta:
            k += 1
        chances = [binomial_cdf(k, n, r) if k >= 0 else 0.0 for r in rates]
        rows.append(f"| {n} | {'none' if k < 0 else k} | {'-' if k < 0 else f'{k / n:.4f}'} | "
                    + " | ".join(f"{c:.2f}" for c in chances) + " |")
    return rows


def render(results: dict, spec, seeds: int) -> str:
    lines = [BEGIN, "", "## Calibration under shift (generated by `bench.calibration_shift`)", "",
             f"Generated by `.venv/bin/python -m bench.calibration_shift --seeds {seeds}` on the models of "
             "`bench.real_models` (docs/training.md); raw figures in `docs/calibration_shift.json`. "
             f"Tolerance {spec.tolerance:g} point at confidence {spec.confidence:g} for the labelled rules; "
             f"ε = {spec.epsilon:g}, δ = {spec.delta:g} for the label-free rule, which calibrates on a keyed half "
             f"of the test side's own records (at most {spec.sample}) and is measured on the other half, over "
             f"{seeds} seeded resamples. Drop: full depth minus the setting on the test side, in points of the "
             "corpus's metric (negative: the setting scored higher). The labelled rules' settings are applied "
             "to the whole test side.", "",
             "| corpus (metric) | calibrate on → test on | rule | drop (points) | mean exit layer | within 1 point | "
             "disagreement with full depth | label-free targets |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for d in r["directions"]:
            t = targets(d, spec)
            for rule in RULES:
                x = d["rules"][rule]
                head = f"{name} ({r['metric']})" if rule == "bootstrap" else ""
                where = f"{d['calibrate_on']} ({d['calibration_records']}) → {d['test_on']} ({d['test_records']})" \
                    if rule == "bootstrap" else ""
                if rule == "ltt-unlabelled":
                    drop = f"{x['mean_drop_points']:+.2f} mean, {x['worst_drop_points']:+.2f} worst"
                    within = f"{100 * x['share_drop_within_tolerance']:.0f}% of resamples"
                    per = " of relations found" if x.get("disagreement_per", "record") != "record" else ""
                    dis = (f"{100 * x['mean_disagreement']:.2f}%{per} mean; ≤ ε in "
                           f"{100 * x['share_disagreement_within_epsilon']:.0f}%")
                    tgt = ", ".join(f"{k.replace('_', ' ')} {'yes' if v else 'NO'}" for k, v in t.items())
                else:
                    drop = f"{x['drop_points']:+.2f}"
                    within = "yes" if x["within_tolerance"] else "NO"
                    dis = f"{100 * x['disagreement']:.2f}%"
                    tgt = ""
                lines.append(f"| {head} | {where} | {rule} | {drop} | {x['mean_exit_layer']:.2f} | {within} | {dis} | {tgt} |")
    lines += ["", "![calibration under shift](figures/calibration_shift.png)", "",
              f"What a finite-sample guarantee costs in depth (ε = {spec.epsilon:g}, δ = {spec.delta:g}; "
              "`bench.calibration_shift.power_rows`, exact binomial): a certified setting's observed "
              "disagreement must sit well below ε when few records are tested, so on small test sides "
              "the label-free rule keeps settings much more faithful, and deeper, than the ones the "
              "bootstrap rule picks. The default `--sample 2000` tests 1,500 records.", "",
              *power_rows(spec.epsilon, spec.delta), "", END]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    markers = {"bootstrap": "o", "ltt-labelled": "s", "ltt-unlabelled": "^"}
    for ax, (name, r) in zip(axes[0], results.items()):
        for d, colour in zip(r["directions"], ("tab:blue", "tab:orange")):
            for rule in RULES:
                x = d["rules"][rule]
                drop = x["mean_drop_points"] if rule == "ltt-unlabelled" else x["drop_points"]
                ax.scatter(x["mean_exit_layer"], drop, marker=markers[rule], color=colour,
                           label=f"{rule}: {d['calibrate_on']}→{d['test_on']}")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("mean exit layer on the test side")
        ax.set_ylabel("drop on the test side (points)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(results: dict, spec, seeds: int, docs: Path) -> None:
    (docs / "calibration_shift.json").write_text(json.dumps(results, indent=2, default=float))
    plot(results, docs / "figures" / "calibration_shift.png")
    md = docs / "calibration.md"
    text = md.read_text() if md.is_file() else "# Calibration\n"
    block = render(results, spec, seeds)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md.write_text(text)


def main(argv: list[str] | None = None) -> None:
    from epee.workflows import CalibrationSpec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=CORPORA)
    p.add_argument("--models", default="models")
    p.add_argument("--docs", default="docs")
    p.add_argument("--seeds", type=int, default=20, help="seeded resamples of the label-free rule")
    p.add_argument("--epsilon", type=float, default=CalibrationSpec.epsilon)
    p.add_argument("--delta", type=float, default=CalibrationSpec.delta)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not DATA.is_dir():
        raise SystemExit(f"shared data not found at {DATA}; set EPEE_SHARED_DATA")
    spec = CalibrationSpec(epsilon=args.epsilon, delta=args.delta)
    docs = Path(args.docs)
    path = docs / "calibration_shift.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in CORPORA:
        if args.only and name not in args.only:
            continue
        model_dir = Path(args.models) / name
        if not (model_dir / "epee_config.json").is_file():
            print(f"{name}: no model at {model_dir} (run bench.real_models --only {name} first); skipped")
            continue
        results[name] = run_corpus(name, str(model_dir), spec, args.seeds, args.batch_size)
        for d in results[name]["directions"]:
            print(name, d["calibrate_on"], "->", d["test_on"], json.dumps(
                {rule: {k: round(v, 4) for k, v in d["rules"][rule].items() if isinstance(v, float)} for rule in RULES}))
            print("  label-free targets:", targets(d, spec), flush=True)
        write_docs({k: results[k] for k in CORPORA if k in results}, spec, args.seeds, docs)  # kept corpus by corpus


if __name__ == "__main__":
    main()
