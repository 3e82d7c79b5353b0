"""Learn then Test, fixed sequence (epee.ltt): exact binomial p-values, the stopping rule, and the
guarantee itself checked over many seeds on synthetic losses with a known risk curve."""

import math

import numpy as np
import pytest

from epee.ltt import PROCEDURE, _binomial_cdf_log_space, binomial_p_value, fixed_sequence_test

# per setting, safest first: the TRUE disagreement rate with full depth (a known agreement curve)
TRUE_RATES = np.array([0.0, 0.001, 0.003, 0.006, 0.01, 0.015, 0.02, 0.025, 0.03, 0.05, 0.1])
EPSILON, DELTA, N, SEEDS = 0.02, 0.1, 800, 400


def reference_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def draw(seed: int, rates=TRUE_RATES, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((len(rates), n)) < rates[:, None]).astype(np.int8)  # (S, n) losses


class TestBinomialPValue:
    @pytest.mark.parametrize("k, n, p", [(0, 10, 0.1), (3, 50, 0.02), (17, 200, 0.1), (40, 40, 0.5), (5, 300, 0.02)])
    def test_matches_the_reference_sum(self, k, n, p):
        assert binomial_p_value(k, n, p) == pytest.approx(reference_cdf(k, n, p), rel=1e-9, abs=1e-300)
        assert _binomial_cdf_log_space(k, n, p) == pytest.approx(reference_cdf(k, n, p), rel=1e-9, abs=1e-300)

    def test_no_losses_is_the_chance_of_none(self):
        assert binomial_p_value(0, 2000, 0.02) == pytest.approx(0.98**2000, rel=1e-9)

    @pytest.mark.parametrize("args, match", [((1, 0, 0.1), r"n \(0\)"), ((5, 4, 0.1), r"losses \(5\)"),
                                             ((1, 4, 0.0), r"epsilon \(0.0\)")])
    def test_refuses_bad_values(self, args, match):
        with pytest.raises(ValueError, match=match):
            binomial_p_value(*args)


class TestFixedSequence:
    def test_stops_at_the_first_non_rejection(self):
        # rows 0-1 clean, row 2 fails, row 3 clean again: row 3 is never tested, so never chosen
        losses = np.zeros((4, 300), dtype=np.int8)
        losses[2, :30] = 1
        res = fixed_sequence_test(losses, 0.02, 0.1, settings=["a", "b", "c", "d"])
        assert [t.setting for t in res.tests] == ["a", "b", "c"]
        assert [t.rejected for t in res.tests] == [True, True, False] and res.untested == 1
        assert res.chosen.setting == "b" and res.procedure == PROCEDURE and res.n == 300
        assert res.tests[2].risk == pytest.approx(0.1) and res.tests[2].p_value > 0.1

    def test_none_rejected_is_full_depth(self):
        res = fixed_sequence_test(np.zeros((3, 20), dtype=np.int8), 0.02, 0.1)  # 0.98**20 = 0.67 > δ
        assert res.chosen is None and res.chosen_label == "full depth" and len(res.tests) == 1
        assert res.to_dict()["chosen"] is None and res.to_dict()["settings_untested"] == 2

    def test_chooses_the_cheapest_rejected_not_the_last(self):
        losses = np.zeros((3, 500), dtype=np.int8)
        res = fixed_sequence_test(losses, 0.02, 0.1, settings=["x", "y", "z"], costs=[3.0, 1.5, 2.0])
        assert res.chosen.setting == "y" and all(t.rejected for t in res.tests)

    def test_refuses_non_binary_losses_and_bad_delta(self):
        with pytest.raises(ValueError, match="0/1"):
            fixed_sequence_test(np.full((1, 5), 2), 0.1, 0.1)
        with pytest.raises(ValueError, match=r"delta \(1.0\)"):
            fixed_sequence_test(np.zeros((1, 5)), 0.1, 1.0)


class TestGuarantee:
    """Over SEEDS draws of the calibration sample: P[chosen setting's TRUE rate > ε] <= δ."""

    def picks(self):
        out = []
        for seed in range(SEEDS):
            res = fixed_sequence_test(draw(seed), EPSILON, DELTA)
            out.append(-1 if res.chosen is None else res.chosen.setting)
        return np.array(out)

    def test_family_wise_error_is_at_most_delta(self):
        picks = self.picks()
        violated = np.array([p >= 0 and TRUE_RATES[p] > EPSILON for p in picks])
        margin = 3 * math.sqrt(DELTA * (1 - DELTA) / SEEDS)  # three Monte-Carlo standard errors
        assert violated.mean() <= DELTA + margin

    def test_settings_far_below_epsilon_are_reached_most_of_the_time(self):
        picks = self.picks()
        # rate 0.006 (index 3) is far below ε: certified (and so at least as fast chosen) in most samples
        assert (picks >= 3).mean() >= 0.9
        assert (picks >= 0).all()  # with n = 800 full-depth-like settings (rate 0) always pass

    def test_the_naive_rule_would_not_keep_the_promise(self):
        """The check can fail: taking the fastest setting whose empirical rate is <= ε picks a
        setting with a true rate above ε far more often than δ."""
        violated = 0
        for seed in range(SEEDS):
            rates = draw(seed).mean(axis=1)
            ok = np.flatnonzero(rates <= EPSILON)
            violated += TRUE_RATES[ok.max()] > EPSILON
        assert violated / SEEDS > 2 * DELTA


def test_choose_ltt_tests_on_the_records_outside_the_learn_part():
    import torch

    from epee.layer_outputs import LayerOutputs, simulate
    from epee.policies import ExitPolicy
    from epee.policy_search import choose_ltt, sweep

    torch.manual_seed(0)
    outputs = LayerOutputs(probs=[torch.softmax(3 * torch.randn(300, 2), dim=-1) for _ in range(3)])
    points = sweep(outputs, lambda preds: 0.0, 3)
    learn = np.arange(300) < 100

    def early(exit_layers):  # the loss: exiting before the last layer
        return (exit_layers < 3).numpy().astype(np.int8)

    choice = choose_ltt(outputs, points, early, learn, epsilon=0.3, delta=0.1)
    assert (choice.learn_samples, choice.test_samples, choice.result.n) == (100, 200, 200)
    assert choice.result.tests[0].setting.kind == "none" and choice.result.tests[0].losses == 0
    assert choice.point.kind == "epee"  # certified: its test risk is its early-exit share on records 100..299
    run = simulate(outputs, ExitPolicy(choice.point.policy_config(), 3))
    assert choice.result.chosen.risk == pytest.approx(float((run.exit_layers[100:] < 3).float().mean()))
    assert choice.result.chosen.p_value <= 0.1 and choice.result.chosen.risk <= 0.3


def test_share_lower_bound_covers_the_true_share_with_the_stated_probability():
    """Clopper-Pearson is exact-conservative: over many seeds the bound exceeds the true share in
    at most δ of them (and is not trivially 0: it sits close below the observed share)."""
    from epee.ltt import share_lower_bound

    rng = np.random.default_rng(3)
    for p, n in ((0.15, 400), (0.02, 1500), (0.5, 60)):
        ks = rng.binomial(n, p, size=600)
        bounds = np.array([share_lower_bound(int(k), n, 0.05) for k in ks])
        assert np.mean(bounds > p) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 600)
        assert np.median(bounds) > 0.6 * p
    assert share_lower_bound(0, 10, 0.1) == 0.0
    assert share_lower_bound(10, 10, 0.1) == pytest.approx(0.1 ** (1 / 10), abs=1e-9)  # P[X >= 10] = p^10 = δ
    with pytest.raises(ValueError, match="delta"):
        share_lower_bound(1, 10, 1.5)


def test_label_free_rule_bounds_disagreement_per_relation_found_not_per_pair():
    """DDI-like: 10% of pairs are relations at full depth and layer 1, confident everywhere, flips
    30% of them to negative. That is 3% of all pairs (inside ε = 0.05 per pair) but 30% of the
    relations found: the per-pair rule exits at layer 1; with the negative label the rule tests ε
    as a share of relations found and stays at full depth."""
    from types import SimpleNamespace

    import torch

    from epee.layer_outputs import LayerOutputs
    from epee.workflows.score import unlabeled_ltt

    n = 4000
    rng = np.random.default_rng(0)
    positive = rng.random(n) < 0.10
    flipped = positive & (rng.random(n) < 0.30)
    last = np.where(positive, 1, 0)
    first = np.where(flipped, 0, last)
    probs = [torch.tensor(np.eye(2)[labels] * 0.98 + 0.01, dtype=torch.float32) for labels in (first, last)]
    outputs = LayerOutputs(probs=probs)
    encoded = SimpleNamespace(owners=list(range(n)))
    ids = [f"pair-{i}" for i in range(n)]
    names = ("negative", "effect")
    per_pair, _, risk = unlabeled_ltt(outputs, encoded, ids, names, 0.05, 0.1, seed=1)
    assert risk["per"] == "record" and per_pair.point.mean_exit_layer == 1.0
    per_relation, _, risk = unlabeled_ltt(outputs, encoded, ids, names, 0.05, 0.1, seed=1, negative_label="negative")
    assert risk["per"] == "relation found at full depth" and per_relation.point.kind == "none"
    assert 0.0 < risk["positive_share_lower_bound"] < risk["positive_share"] < 0.12
    assert risk["tested_at_epsilon"] == pytest.approx(0.05 * risk["positive_share_lower_bound"])
    assert risk["tested_at_delta"] == pytest.approx(0.05)
    # rare flips (1% of relations) are certified at layer 1 by the per-relation rule too
    rare = positive & (rng.random(n) < 0.01)
    outputs = LayerOutputs(probs=[torch.tensor(np.eye(2)[np.where(rare, 0, last)] * 0.98 + 0.01, dtype=torch.float32),
                                  probs[1]])
    certified, _, _ = unlabeled_ltt(outputs, encoded, ids, names, 0.05, 0.1, seed=1, negative_label="negative")
    assert certified.point.mean_exit_layer == 1.0


def test_labelled_rule_for_relations_bounds_the_micro_f1_loss_not_a_per_pair_rate():
    """Gold: 10% relations, right at full depth; layer 1 loses 30% of them (3% of pairs, inside
    ε = 0.05 per pair, but 9 points of micro-F1 and more): the labelled LTT rule stays at full
    depth for a relation model with a negative class, and exits at layer 1 without one."""
    from types import SimpleNamespace

    import torch

    from epee.layer_outputs import LayerOutputs
    from epee.policy_search import sweep
    from epee.workflows.score import _ltt_labelled

    n = 4000
    rng = np.random.default_rng(2)
    gold = np.where(rng.random(n) < 0.10, 1, 0)
    first = np.where((gold == 1) & (rng.random(n) < 0.30), 0, gold)
    outputs = LayerOutputs(probs=[torch.tensor(np.eye(2)[labels] * 0.98 + 0.01, dtype=torch.float32)
                                  for labels in (first, gold)])
    encoded = SimpleNamespace(owners=list(range(n)), gold=gold.tolist(), examples=n)
    points = sweep(outputs, lambda preds: 0.0, 2)

    def bundle(negative):
        return SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(label_names=("negative", "effect"),
                                                                            negative_label=negative)))

    per_pair, risk = _ltt_labelled(outputs, points, encoded, bundle(None), 0.05, 0.1, seed=0)
    assert risk["per"] == "record" and per_pair.point.mean_exit_layer == 1.0
    per_relation, risk = _ltt_labelled(outputs, points, encoded, bundle("negative"), 0.05, 0.1, seed=0)
    assert risk["per"] == "gold relation" and per_relation.point.kind == "none"
    assert risk["tested_at_epsilon"] == pytest.approx(0.025 * risk["positive_share_lower_bound"])
