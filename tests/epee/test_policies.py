import math

import pytest
import torch

from epee import ExitPolicy, ExitPolicyConfig, ScheduledExit, exit_signal, normalised_entropy
from epee.policies import CONTINUE, ENTROPY, LAST_LAYER, PATIENCE, SCHEDULED, update_streak


class TestNormalisedEntropy:
    def test_uniform_is_one_and_one_hot_is_zero(self):
        probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
        assert torch.allclose(normalised_entropy(probs), torch.tensor([1.0, 0.0]), atol=1e-6)

    def test_two_classes(self):
        p = torch.tensor([[0.9, 0.1]])
        expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
        assert normalised_entropy(p).item() == pytest.approx(expected, rel=1e-6)


class TestExitSignal:
    def test_sequence(self):
        logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        sig = exit_signal(logits)
        assert sig.prediction.tolist() == [0, 0]
        assert sig.entropy[0] < 0.1 and sig.entropy[1] == pytest.approx(1.0, abs=1e-6)

    def test_token_entropy_is_max_over_scored_tokens(self):
        # row 0: token 0 confident, token 1 uniform but not scored -> low entropy
        logits = torch.tensor([[[9.0, 0.0], [0.0, 0.0]], [[9.0, 0.0], [0.0, 0.0]]])
        mask = torch.tensor([[True, False], [True, True]])
        sig = exit_signal(logits, mask)
        assert sig.entropy[0] < 0.01
        assert sig.entropy[1] == pytest.approx(1.0, abs=1e-6)
        assert sig.prediction.tolist() == [[0, -1], [0, 0]]


class TestUpdateStreak:
    def test_first_layer_starts_at_zero(self):
        assert update_streak(torch.tensor([1, 2]), None, torch.tensor([5, 5])).tolist() == [0, 0]

    def test_counts_unchanged_predictions(self):
        streak = update_streak(torch.tensor([1, 2, 0]), torch.tensor([1, 0, 0]), torch.tensor([2, 2, 0]))
        assert streak.tolist() == [3, 0, 1]

    def test_token_rows_need_every_tag_unchanged(self):
        now = torch.tensor([[1, 2, -1], [1, 2, 3]])
        before = torch.tensor([[1, 2, -1], [1, 0, 3]])
        assert update_streak(now, before, torch.tensor([0, 4])).tolist() == [1, 0]


def _signal(entropy):
    entropy = torch.tensor(entropy)
    n = entropy.shape[0]
    return type("S", (), {"entropy": entropy, "prediction": torch.zeros(n, dtype=torch.long), "probs": None})()


class TestExitPolicy:
    idx = torch.arange(3)

    def test_entropy(self):
        pol = ExitPolicy(ExitPolicyConfig(kind="entropy", entropy_threshold=0.3), num_layers=6)
        reasons = pol.decide(2, _signal([0.1, 0.5, 0.29]), torch.tensor([9, 9, 9]), self.idx)
        assert reasons.tolist() == [ENTROPY, CONTINUE, ENTROPY]

    def test_patience(self):
        pol = ExitPolicy(ExitPolicyConfig(kind="patience", patience=2), num_layers=6)
        reasons = pol.decide(3, _signal([0.0, 0.0, 0.0]), torch.tensor([1, 2, 3]), self.idx)
        assert reasons.tolist() == [CONTINUE, PATIENCE, PATIENCE]

    def test_epee_is_either_and_entropy_wins_ties(self):
        pol = ExitPolicy(ExitPolicyConfig(kind="epee", entropy_threshold=0.3, patience=2), num_layers=6)
        reasons = pol.decide(3, _signal([0.1, 0.9, 0.9]), torch.tensor([2, 2, 0]), self.idx)
        assert reasons.tolist() == [ENTROPY, PATIENCE, CONTINUE]

    def test_none_runs_to_last_layer(self):
        pol = ExitPolicy(ExitPolicyConfig(kind="none"), num_layers=4)
        assert pol.decide(3, _signal([0.0] * 3), torch.tensor([9] * 3), self.idx).tolist() == [0, 0, 0]
        assert pol.decide(4, _signal([0.9] * 3), torch.tensor([0] * 3), self.idx).tolist() == [LAST_LAYER] * 3

    def test_min_exit_layer(self):
        pol = ExitPolicy(ExitPolicyConfig(kind="epee", entropy_threshold=0.5, min_exit_layer=3), num_layers=6)
        assert pol.decide(2, _signal([0.0] * 3), torch.tensor([9] * 3), self.idx).tolist() == [0, 0, 0]
        assert pol.decide(3, _signal([0.0] * 3), torch.tensor([9] * 3), self.idx).tolist() == [ENTROPY] * 3

    def test_last_layer_beats_min_exit_layer(self):
        pol = ExitPolicy(ExitPolicyConfig(min_exit_layer=10), num_layers=4)
        assert pol.decide(4, _signal([0.9] * 3), torch.tensor([0] * 3), self.idx).tolist() == [LAST_LAYER] * 3


class TestScheduledExit:
    def test_follows_schedule_by_sample_index(self):
        pol = ScheduledExit(torch.tensor([1, 3, 2, 4]), num_layers=4)
        idx = torch.tensor([3, 1, 2])  # rows carry their original sample index
        assert pol.decide(2, _signal([1.0] * 3), torch.zeros(3), idx).tolist() == [0, 0, SCHEDULED]
        assert pol.decide(4, _signal([1.0] * 3), torch.zeros(3), idx).tolist() == [SCHEDULED] * 3

    def test_rejects_out_of_range(self):
        with pytest.raises(ValueError, match=r"\[1, 4\]"):
            ScheduledExit(torch.tensor([0, 5]), num_layers=4)
