"""Evaluation metrics for the three exit-head tasks, as the benchmarks EPEE reports on score them.

Pure functions over plain sequences (lists, NumPy arrays or CPU tensors of label ids): the
calibration sweep calls them hundreds of times on the same dev set, so nothing here touches a
model. Every score is a fraction in [0, 1], and a score that is undefined (no samples, no positive
relations, no spans) is 0.0 rather than NaN, so that a sweep can still rank its points.

- sequence classification: accuracy (the primary metric) and macro F1;
- relation classification: micro F1 over the positive classes, as the DDI 2013 shared task
  (Segura-Bedmar et al., SemEval-2013 task 9) reports it, plus accuracy and macro F1;
- token classification (event triggers and arguments in BIO tags): exact-match span F1, micro
  averaged over all samples, as conlleval and seqeval report it, plus token accuracy.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

TASK_METRICS = {
    "sequence": ("accuracy", "macro_f1"),
    "relation": ("accuracy", "macro_f1", "micro_f1_positive"),
    "token": ("span_f1", "span_precision", "span_recall", "token_accuracy"),
}

Span = tuple[str, int, int]  # (type, first token, one past the last token)


def _as_labels(gold: Sequence[int], pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(gold, dtype=np.int64).reshape(-1)
    p = np.asarray(pred, dtype=np.int64).reshape(-1)
    if g.shape != p.shape:
        raise ValueError(f"gold has {g.size} labels but pred has {p.size}")
    return g, p


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Share of samples whose predicted label equals the gold label (0.0 for no samples)."""
    g, p = _as_labels(gold, pred)
    return float((g == p).mean()) if g.size else 0.0


def macro_f1(gold: Sequence[int], pred: Sequence[int], num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in gold or pred.

    Classes absent from both are skipped: a dev set without any sample of a rare class should not
    pull every setting's score down by the same constant (it would also make the score depend on
    how many labels the head happens to have).
    """
    g, p = _as_labels(gold, pred)
    for name, values in (("gold", g), ("pred", p)):
        bad = values[(values < 0) | (values >= num_labels)]
        if bad.size:
            raise ValueError(f"{name} label {int(bad[0])} outside [0, {num_labels})")
    present = np.union1d(g, p)
    if present.size == 0:
        return 0.0
    scores = []
    for c in present:
        tp = int(np.sum((g == c) & (p == c)))
        fp = int(np.sum((g != c) & (p == c)))
        fn = int(np.sum((g == c) & (p != c)))
        scores.append(2 * tp / (2 * tp + fp + fn))  # = harmonic mean of precision and recall
    return float(np.mean(scores))


def micro_f1_positive(gold: Sequence[int], pred: Sequence[int], negative_label: int) -> float:
    """Micro F1 over every class but ``negative_label`` (the DDI 2013 relation score).

    A true positive is a pair whose predicted type equals its gold type and is not the negative
    class; precision divides by the pairs predicted positive, recall by the pairs gold-positive.
    Predicting the wrong positive type is therefore both a false positive and a false negative.
    Returns 0.0 when precision or recall is undefined.
    """
    g, p = _as_labels(gold, pred)
    tp = int(np.sum((g == p) & (g != negative_label)))
    predicted = int(np.sum(p != negative_label))
    actual = int(np.sum(g != negative_label))
    if predicted == 0 or actual == 0:
        return 0.0
    return 2 * tp / (predicted + actual)  # = 2PR / (P + R) with P = tp/predicted, R = tp/actual


def bio_spans(tags: Sequence[str | None]) -> set[Span]:
    """Decode BIO tags into ``(type, start, end_exclusive)`` token spans.

    Lenient like conlleval: an ``I-X`` that does not continue an open ``X`` span starts a new
    one rather than being dropped. ``None`` marks a position that is not scored (a sub-word
    continuation, say): it neither ends nor extends a span, so a span's end is one past its last
    scored token. Types may contain dots and dashes (``B-Trigger.Adverse_event``); only the first
    dash separates the prefix.
    """
    spans: set[Span] = set()
    kind: str | None = None
    start = end = 0
    for i, tag in enumerate(tags):
        if tag is None:
            continue
        if tag == "O":
            if kind is not None:
                spans.add((kind, start, end))
            kind = None
            continue
        prefix, dash, typ = tag.partition("-")
        if prefix not in ("B", "I") or not dash or not typ:
            raise ValueError(f"tag {tag!r} at position {i} is not 'O', 'B-<type>' or 'I-<type>'")
        if prefix == "I" and kind == typ:
            end = i + 1
            continue
        if kind is not None:
            spans.add((kind, start, end))
        kind, start, end = typ, i, i + 1
    if kind is not None:
        spans.add((kind, start, end))
    return spans


def span_f1(gold_spans: Sequence[set[Span]], pred_spans: Sequence[set[Span]]) -> dict[str, float]:
    """Exact-match span precision, recall and F1, micro-averaged over all samples' spans.

    A predicted span counts only if its type, start and end all match a gold span of the same
    sample. Undefined values (no predicted or no gold spans) are 0.0.
    """
    if len(gold_spans) != len(pred_spans):
        raise ValueError(f"gold has {len(gold_spans)} samples but pred has {len(pred_spans)}")
    tp = sum(len(g & p) for g, p in zip(gold_spans, pred_spans))
    num_pred = sum(len(p) for p in pred_spans)
    num_gold = sum(len(g) for g in gold_spans)
    precision = tp / num_pred if num_pred else 0.0
    recall = tp / num_gold if num_gold else 0.0
    f1 = 2 * tp / (num_pred + num_gold) if tp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


_OUTSIDE = -2  # a scored position the model left unscored: read as "O" (see _scored_pair)


def _scored_pair(g_ids: Sequence[int], p_ids: Sequence[int], label_names: Sequence[str], n: int):
    """(gold ids, prediction ids) of one sample over the same positions, the prediction made
    comparable: -1 where gold is not scored; where gold is scored but the model left the position
    unscored (-1), "O" (no entity predicted there, and a wrong token unless gold is "O")."""
    g = np.asarray(g_ids, dtype=np.int64).reshape(-1)
    p = np.asarray(p_ids, dtype=np.int64).reshape(-1)
    if g.shape != p.shape:
        raise ValueError(f"sample {n}: gold has {g.size} tags but pred has {p.size}")
    outside = label_names.index("O") if "O" in label_names else _OUTSIDE
    return g, np.where(g < 0, -1, np.where(p < 0, outside, p))


def id_spans(ids: Sequence[int], label_names: Sequence[str]) -> frozenset[Span]:
    """:func:`bio_spans` of tag ids (below 0: not scored, :data:`_OUTSIDE`: "O"), memoised on the
    ids: a sweep over hundreds of settings meets each record's few distinct predictions (one per
    exit layer at most) again and again."""
    return _id_spans(tuple(np.asarray(ids, dtype=np.int64).reshape(-1).tolist()), tuple(label_names))


@functools.lru_cache(maxsize=1 << 17)
def _id_spans(ids: tuple[int, ...], label_names: tuple[str, ...]) -> frozenset[Span]:
    return frozenset(bio_spans([("O" if i == _OUTSIDE else None) if i < 0 else _tag(i, label_names) for i in ids]))


def _tag(i: int, label_names: Sequence[str]) -> str:
    if i >= len(label_names):
        raise ValueError(f"tag id {i} outside the {len(label_names)} label names")
    return label_names[i]


def _token_scores(
    gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]], label_names: Sequence[str]
) -> dict[str, float]:
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} samples but pred has {len(pred)}")
    gold_spans, pred_spans = [], []
    correct = scored = 0
    for n, (g_ids, p_ids) in enumerate(zip(gold, pred)):
        g, p = _scored_pair(g_ids, p_ids, label_names, n)
        gold_spans.append(id_spans(g, label_names))
        pred_spans.append(id_spans(p, label_names))
        scored += int((g >= 0).sum())
        correct += int(((g >= 0) & (g == p)).sum())
    spans = span_f1(gold_spans, pred_spans)
    return {
        "span_f1": spans["f1"],
        "span_precision": spans["precision"],
        "span_recall": spans["recall"],
        "token_accuracy": correct / scored if scored else 0.0,
    }


def task_scores(
    task: str,
    gold: Sequence,
    pred: Sequence,
    label_names: Sequence[str],
    negative_label: str | None = None,
) -> dict[str, float]:
    """All metrics of ``task`` in one dict (keys as in :data:`TASK_METRICS`).

    ``sequence`` and ``relation``: gold and pred are one label id per sample. ``relation`` adds
    ``micro_f1_positive`` when ``negative_label`` names one of ``label_names``. ``token``: gold and
    pred are one sequence of tag ids per sample, over the same tokens; ids below 0 (-100 or -1)
    are positions that are not scored, and ``label_names`` turns ids into BIO tags.
    """
    if task == "token":
        return _token_scores(gold, pred, label_names)
    if task not in ("sequence", "relation"):
        raise ValueError(f"task ({task!r}) must be one of {tuple(TASK_METRICS)}")
    scores = {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred, len(label_names))}
    if task == "relation" and negative_label is not None:
        if negative_label not in label_names:
            # primary_metric would still name micro_f1_positive; say why it is missing
            logger.warning("negative label %r is not among the label names; no micro_f1_positive", negative_label)
            return scores
        scores["micro_f1_positive"] = micro_f1_positive(gold, pred, list(label_names).index(negative_label))
    return scores


class CountedScore:
    """A primary metric as a sum over records: ``counts(gold, pred)`` gives each record's
    sufficient statistics (an (N, k) array), ``from_counts(totals)`` the score of any multiset of
    records from the sum of their rows (``totals``: (..., k), so a whole bootstrap is one matrix
    product). ``from_counts(counts(gold, pred).sum(0))`` equals :func:`task_scores`' value.

    Every metric here is such a sum: accuracy (correct, 1); micro F1 over the positive classes
    (true positives, predicted positives, gold positives); macro F1 over the classes present
    (per class: true positives, gold count, predicted count; 2tp + fp + fn = gold + predicted);
    span F1 (matched spans, predicted spans, gold spans).
    """

    def __init__(self, task: str, metric: str, label_names: Sequence[str], negative_label: str | None = None):
        if metric not in TASK_METRICS.get(task, ()) or metric in ("span_precision", "span_recall", "token_accuracy"):
            raise ValueError(f"no counted form of {metric!r} for task {task!r}")
        self.task, self.metric, self.label_names = task, metric, list(label_names)
        self.negative = self.label_names.index(negative_label) if metric == "micro_f1_positive" else None

    def counts(self, gold: Sequence, pred: Sequence) -> np.ndarray:
        if self.task == "token":
            return self._span_counts(gold, pred)
        g, p = _as_labels(gold, pred)
        c = len(self.label_names)
        for name, values in (("gold", g), ("pred", p)):
            bad = values[(values < 0) | (values >= c)]
            if bad.size:
                raise ValueError(f"{name} label {int(bad[0])} outside [0, {c})")
        if self.metric == "accuracy":
            return np.stack([(g == p), np.ones_like(g, dtype=bool)], axis=1).astype(np.float64)
        if self.metric == "micro_f1_positive":
            pos_g, pos_p = g != self.negative, p != self.negative
            return np.stack([(g == p) & pos_g, pos_p, pos_g], axis=1).astype(np.float64)
        eye = np.eye(c, dtype=np.float64)  # macro_f1
        return np.concatenate([eye[g] * (g == p)[:, None], eye[g], eye[p]], axis=1)

    def _span_counts(self, gold: Sequence, pred: Sequence) -> np.ndarray:
        if len(gold) != len(pred):
            raise ValueError(f"gold has {len(gold)} samples but pred has {len(pred)}")
        rows = np.zeros((len(gold), 3), dtype=np.float64)
        for n, (g_ids, p_ids) in enumerate(zip(gold, pred)):
            g, p = _scored_pair(g_ids, p_ids, self.label_names, n)
            g_spans, p_spans = id_spans(g, self.label_names), id_spans(p, self.label_names)
            rows[n] = (len(g_spans & p_spans), len(p_spans), len(g_spans))
        return rows

    def from_counts(self, totals: np.ndarray) -> np.ndarray | float:
        t = np.asarray(totals, dtype=np.float64)
        if self.metric == "accuracy":
            out = _ratio(t[..., 0], t[..., 1])
        elif self.metric == "macro_f1":
            c = len(self.label_names)
            tp, gold, pred = t[..., :c], t[..., c : 2 * c], t[..., 2 * c :]
            present = (gold + pred) > 0
            f1 = _ratio(2 * tp, gold + pred)
            out = _ratio(np.where(present, f1, 0.0).sum(-1), present.sum(-1))
        else:  # micro_f1_positive, span_f1: 2 tp / (predicted + gold), 0 when tp is 0
            tp, predicted, gold = t[..., 0], t[..., 1], t[..., 2]
            out = np.where(tp > 0, _ratio(2 * tp, predicted + gold), 0.0)
            if self.metric == "micro_f1_positive":  # undefined precision or recall is 0 (micro_f1_positive)
                out = np.where((predicted > 0) & (gold > 0), out, 0.0)
        return float(out) if np.ndim(out) == 0 else out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def primary_metric(task: str, negative_label: str | None) -> str:
    """The one score a task's calibration and reports rank by.

    Relation extraction with a negative ("no relation") class is scored as DDI 2013 does, on the
    positive classes only: accuracy there mostly counts the easy negatives.
    """
    if task == "sequence":
        return "accuracy"
    if task == "relation":
        return "micro_f1_positive" if negative_label is not None else "macro_f1"
    if task == "token":
        return "span_f1"
    raise ValueError(f"task ({task!r}) must be one of {tuple(TASK_METRICS)}")
