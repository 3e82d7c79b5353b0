"""Metrics against hand-computed values."""

import numpy as np
import pytest
import torch

from epee.metrics import (
    accuracy,
    bio_spans,
    macro_f1,
    micro_f1_positive,
    primary_metric,
    span_f1,
    task_scores,
)


class TestAccuracy:
    def test_share_of_matches(self):
        assert accuracy([0, 1, 2, 1], [0, 1, 1, 1]) == pytest.approx(0.75)

    def test_accepts_arrays_and_tensors(self):
        assert accuracy(np.array([1, 0]), torch.tensor([1, 1])) == pytest.approx(0.5)

    def test_empty_is_zero(self):
        assert accuracy([], []) == 0.0

    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="gold has 2 labels but pred has 1"):
            accuracy([0, 1], [0])


class TestMacroF1:
    def test_mean_over_classes_present(self):
        # class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 1, fp 2, fn 0 -> 1/2; class 2: tp 0 -> 0;
        # class 3 occurs nowhere and is skipped
        assert macro_f1([0, 0, 1, 2], [0, 1, 1, 1], num_labels=4) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)

    def test_perfect(self):
        assert macro_f1([0, 1, 1], [0, 1, 1], num_labels=5) == pytest.approx(1.0)

    def test_class_only_predicted_counts(self):
        # class 0: tp 1, fn 1 -> 2/3; class 1 (predicted, never gold): 0
        assert macro_f1([0, 0], [0, 1], num_labels=2) == pytest.approx((2 / 3 + 0) / 2)

    def test_label_out_of_range(self):
        with pytest.raises(ValueError, match="pred label 3 outside"):
            macro_f1([0, 1], [0, 3], num_labels=3)


class TestMicroF1Positive:
    def test_ddi_style(self):
        # negative = 0; tp: sample 1 only; predicted positive: 1, 2, 4; gold positive: 1, 2, 3
        gold, pred = [0, 1, 2, 1, 0], [0, 1, 1, 0, 2]
        assert micro_f1_positive(gold, pred, negative_label=0) == pytest.approx(1 / 3)

    def test_precision_and_recall_differ(self):
        # tp 2; predicted positive 2; gold positive 4 -> P 1, R 1/2, F 2/3
        assert micro_f1_positive([1, 1, 2, 2, 0], [1, 1, 0, 0, 0], negative_label=0) == pytest.approx(2 / 3)

    def test_negatives_only_is_zero(self):
        assert micro_f1_positive([0, 0], [0, 0], negative_label=0) == 0.0
        assert micro_f1_positive([0, 0], [1, 0], negative_label=0) == 0.0

    def test_negative_need_not_be_zero(self):
        assert micro_f1_positive([2, 0, 1], [2, 0, 1], negative_label=2) == pytest.approx(1.0)


class TestBioSpans:
    def test_basic(self):
        tags = ["B-Effect", "I-Effect", "O", "B-Trigger.Adverse_event"]
        assert bio_spans(tags) == {("Effect", 0, 2), ("Trigger.Adverse_event", 3, 4)}

    def test_orphan_inside_starts_a_span(self):
        assert bio_spans(["O", "I-A", "I-A", "I-B"]) == {("A", 1, 3), ("B", 3, 4)}

    def test_begin_splits_same_type(self):
        assert bio_spans(["B-A", "B-A", "I-A"]) == {("A", 0, 1), ("A", 1, 3)}

    def test_none_neither_breaks_nor_extends(self):
        assert bio_spans(["B-A", None, "I-A", None, "O", "I-A"]) == {("A", 0, 3), ("A", 5, 6)}
        assert bio_spans(["B-A", None, None]) == {("A", 0, 1)}
        assert bio_spans([None, "B-A", None, "B-B"]) == {("A", 1, 2), ("B", 3, 4)}

    def test_type_with_dash(self):
        assert bio_spans(["B-Drug-Drug", "I-Drug-Drug"]) == {("Drug-Drug", 0, 2)}

    def test_empty_and_outside(self):
        assert bio_spans([]) == set()
        assert bio_spans(["O", None, "O"]) == set()

    @pytest.mark.parametrize("tag", ["Effect", "X-Effect", "B-", "B"])
    def test_malformed_tag(self, tag):
        with pytest.raises(ValueError, match="is not 'O'"):
            bio_spans(["O", tag])


class TestSpanF1:
    def test_micro_over_samples(self):
        a, b, c, d = ("A", 0, 1), ("A", 2, 4), ("B", 0, 3), ("B", 4, 5)
        scores = span_f1([{a, b}, {c}], [{a}, {c, d}])  # tp 2, 3 predicted, 3 gold
        assert scores == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})

    def test_boundaries_must_match_exactly(self):
        assert span_f1([{("A", 0, 2)}], [{("A", 0, 3)}])["f1"] == 0.0
        assert span_f1([{("A", 0, 2)}], [{("B", 0, 2)}])["f1"] == 0.0

    def test_no_spans_is_zero(self):
        assert span_f1([set()], [set()]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


class TestTaskScores:
    def test_sequence(self):
        scores = task_scores("sequence", [0, 1, 1, 0], [0, 1, 0, 0], ["neg", "pos"])
        # class 0: tp 2, fp 1 -> 4/5; class 1: tp 1, fn 1 -> 2/3
        assert scores == pytest.approx({"accuracy": 0.75, "macro_f1": (4 / 5 + 2 / 3) / 2})

    def test_relation_with_negative(self):
        names = ["negative", "effect", "mechanism"]
        scores = task_scores("relation", [0, 1, 2, 1, 0], [0, 1, 1, 0, 2], names, negative_label="negative")
        assert set(scores) == {"accuracy", "macro_f1", "micro_f1_positive"}
        assert scores["micro_f1_positive"] == pytest.approx(1 / 3)
        assert scores["accuracy"] == pytest.approx(2 / 5)

    def test_relation_without_negative(self):
        assert set(task_scores("relation", [0, 1], [0, 1], ["a", "b"])) == {"accuracy", "macro_f1"}
        assert set(task_scores("relation", [0, 1], [0, 1], ["a", "b"], negative_label="none")) == {
            "accuracy", "macro_f1"
        }

    def test_token(self):
        names = ["O", "B-E", "I-E"]
        # gold: one span E[1, 3); position 3 is not scored (-100) in gold and (-1) in pred;
        # pred: E[1, 3) and a spurious E[4, 5)
        scores = task_scores("token", [[0, 1, 2, -100, 0]], [[0, 1, 2, -1, 1]], names)
        assert scores == pytest.approx(
            {"span_f1": 2 / 3, "span_precision": 1 / 2, "span_recall": 1.0, "token_accuracy": 3 / 4}
        )

    def test_token_unscored_prediction_at_scored_gold_is_outside(self):
        scores = task_scores("token", [[1, 2]], [[1, -1]], ["O", "B-E", "I-E"])
        assert scores["span_f1"] == 0.0  # predicted E[0, 1) against gold E[0, 2)
        assert scores["token_accuracy"] == pytest.approx(1 / 2)

    def test_token_length_mismatch(self):
        with pytest.raises(ValueError, match="sample 0: gold has 2 tags but pred has 1"):
            task_scores("token", [[0, 1]], [[0]], ["O", "B-E"])

    def test_unknown_task(self):
        with pytest.raises(ValueError, match="task \\('ner'\\)"):
            task_scores("ner", [0], [0], ["a", "b"])


class TestPrimaryMetric:
    def test_per_task(self):
        assert primary_metric("sequence", None) == "accuracy"
        assert primary_metric("relation", "negative") == "micro_f1_positive"
        assert primary_metric("relation", None) == "macro_f1"
        assert primary_metric("token", None) == "span_f1"

    def test_primary_metric_is_among_task_scores(self):
        names = ["negative", "effect"]
        for task, neg in (("sequence", None), ("relation", "negative"), ("relation", None)):
            assert primary_metric(task, neg) in task_scores(task, [0, 1], [0, 1], names, neg)
        assert primary_metric("token", None) in task_scores("token", [[0]], [[0]], ["O", "B-E"])

    def test_unknown_task(self):
        with pytest.raises(ValueError, match="must be one of"):
            primary_metric("ner", None)


class TestCountedScore:
    """The per-record form of each primary metric gives task_scores' value on any multiset of records."""

    BIO = ["O", "B-A", "I-A", "B-B.x", "I-B.x"]

    def random_case(self, metric, rng, n=60):
        if metric == "span_f1":
            gold, pred = [], []
            for _ in range(n):
                t = int(rng.integers(1, 9))
                g = rng.integers(0, len(self.BIO), size=t)
                g[rng.random(t) < 0.2] = -1  # unscored positions
                p = rng.integers(0, len(self.BIO), size=t)
                p[rng.random(t) < 0.1] = -1
                gold.append(g.tolist()), pred.append(p.tolist())
            return "token", self.BIO, None, gold, pred
        names = ["neg", "a", "b", "c", "d"]
        gold = rng.integers(0, 5, size=n)
        pred = np.where(rng.random(n) < 0.6, gold, rng.integers(0, 4, size=n))  # class 4 never predicted
        task = "relation" if metric == "micro_f1_positive" else "sequence"
        return task, names, "neg" if metric == "micro_f1_positive" else None, gold.tolist(), pred.tolist()

    @pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "micro_f1_positive", "span_f1"])
    def test_equals_task_scores_on_resamples(self, metric):
        from epee.metrics import CountedScore

        rng = np.random.default_rng(7)
        for _ in range(20):
            task, names, negative, gold, pred = self.random_case(metric, rng)
            counted = CountedScore(task, metric, names, negative)
            rows = counted.counts(gold, pred)
            draws = [rng.integers(0, len(gold), size=len(gold)) for _ in range(15)]
            draws += [np.array([0]), np.array([], dtype=np.int64)]  # one record; none at all (undefined: 0.0)
            weights = np.stack([np.bincount(d, minlength=len(gold)) for d in draws]).astype(float)
            fast = counted.from_counts(weights @ rows)
            for d, value in zip(draws, fast):
                slow = task_scores(task, [gold[i] for i in d], [pred[i] for i in d], names, negative)[metric]
                assert value == pytest.approx(slow, abs=1e-12)

    def test_metric_without_a_counted_form_is_refused(self):
        from epee.metrics import CountedScore

        with pytest.raises(ValueError, match="no counted form"):
            CountedScore("token", "token_accuracy", self.BIO)
