"""Offline calibration: the simulation predicts exactly what the engine does; sweep, frontier, choice."""

import csv
import math

import pytest
import torch

from epee import EarlyExitEngine, EngineConfig, ExitPolicy, ExitPolicyConfig, ScheduledExit
from epee.calibration import (
    THRESHOLD_GRID,
    LayerOutputs,
    SweepPoint,
    choose,
    choose_robust,
    collect_layer_outputs,
    default_thresholds,
    frontier,
    plot_frontier,
    render_table_markdown,
    simulate,
    sweep,
    write_sweep_table,
)
from epee.metrics import accuracy, task_scores
from epee.policies import normalised_entropy
from tests.conftest import make_samples, safe_threshold, tiny_model


def hand_outputs() -> LayerOutputs:
    """3 samples, 3 layers, 2 classes, probabilities picked so each policy's answer is known.

    sample 0: confident at layer 1 (entropy 0.08), then changes its mind;
    sample 1: unsure but keeps predicting class 0 at layers 1 and 2;
    sample 2: unsure and flips between layers 1 and 2.
    """
    layer1 = torch.tensor([[0.99, 0.01], [0.6, 0.4], [0.6, 0.4]])
    layer2 = torch.tensor([[0.2, 0.8], [0.55, 0.45], [0.4, 0.6]])
    layer3 = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.45, 0.55]])
    return LayerOutputs(probs=[layer1, layer2, layer3])


def policy(kind, tau=0.2, patience=1, min_exit_layer=1, layers=3):
    return ExitPolicy(
        ExitPolicyConfig(kind=kind, entropy_threshold=tau, patience=patience, min_exit_layer=min_exit_layer), layers
    )


class TestSimulateByHand:
    @pytest.mark.parametrize(
        "pol, exit_layers, predictions",
        [
            (policy("epee"), [1, 2, 3], [0, 0, 1]),
            (policy("entropy"), [1, 3, 3], [0, 1, 1]),
            (policy("patience"), [3, 2, 3], [0, 0, 1]),
            (policy("none"), [3, 3, 3], [0, 1, 1]),
            (policy("epee", min_exit_layer=2), [3, 2, 3], [0, 0, 1]),
            (ScheduledExit(torch.tensor([2, 1, 3]), 3), [2, 1, 3], [1, 0, 1]),
        ],
    )
    def test_exit_layers_and_predictions(self, pol, exit_layers, predictions):
        run = simulate(hand_outputs(), pol)
        assert run.exit_layers.tolist() == exit_layers
        assert run.predictions == predictions
        assert run.mean_exit_layer == pytest.approx(sum(exit_layers) / 3)

    def test_policy_depth_must_match(self):
        with pytest.raises(ValueError, match="policy is for 4 layers, outputs have 3"):
            simulate(hand_outputs(), policy("epee", layers=4))

    def test_token_predictions_cut_to_real_tokens(self):
        # (N=2, T=3, C=2); sample 1 has 2 real tokens, its token 1 not scored
        probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], [[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]]])
        mask = torch.tensor([[True, True, True], [True, False, False]])
        outputs = LayerOutputs(probs=[probs, probs], token_mask=mask, lengths=torch.tensor([3, 2]))
        run = simulate(outputs, policy("patience", layers=2))
        assert run.exit_layers.tolist() == [2, 2]
        assert run.predictions == [[0, 1, 0], [1, -1]]


class TestLayerOutputs:
    def test_layers_must_agree(self):
        with pytest.raises(ValueError, match="layer 2 probs have shape"):
            LayerOutputs(probs=[torch.ones(2, 3) / 3, torch.ones(3, 3) / 3])

    def test_token_mask_shape(self):
        with pytest.raises(ValueError, match="token_mask shape"):
            LayerOutputs(probs=[torch.ones(2, 4, 3) / 3], token_mask=torch.ones(2, 5, dtype=torch.bool))


class TestCollectLayerOutputs:
    def test_sequence_shapes_and_order(self):
        model = tiny_model("bert", "sequence")
        samples = make_samples("bert", "sequence", n=10)
        outputs = collect_layer_outputs(model, samples, batch_size=4)
        assert outputs.num_layers == model.num_layers and outputs.token_mask is None
        assert [tuple(p.shape) for p in outputs.probs] == [(10, 3)] * model.num_layers
        alone = collect_layer_outputs(model, samples[7:8], batch_size=1)  # input order kept
        for layer in range(model.num_layers):
            torch.testing.assert_close(outputs.probs[layer][7:8], alone.probs[layer], atol=1e-5, rtol=0)

    def test_token_padding_and_batch_independence(self):
        model = tiny_model("bert", "token")
        samples = make_samples("bert", "token", n=11)
        big = collect_layer_outputs(model, samples, batch_size=4)
        one = collect_layer_outputs(model, samples, batch_size=1)
        t = max(s.length for s in samples)
        assert tuple(big.probs[0].shape) == (11, t, 3)
        assert big.lengths.tolist() == [s.length for s in samples]
        for i, s in enumerate(samples):
            assert big.token_mask[i, : s.length].tolist() == s.token_mask.tolist()
            assert not big.token_mask[i, s.length :].any()
            # past a sample's end: uniform, whatever batch it was in
            torch.testing.assert_close(big.probs[-1][i, s.length :], torch.full((t - s.length, 3), 1 / 3))
        torch.testing.assert_close(big.token_mask, one.token_mask)
        for a, b in zip(big.probs, one.probs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    def test_no_samples(self):
        with pytest.raises(ValueError, match="no samples"):
            collect_layer_outputs(tiny_model("bert"), [])


ENGINE_CASES = [("bert", "sequence"), ("bert", "relation"), ("bert", "token"), ("gpt2", "token"), ("vit", "sequence")]


def engine_outputs(result):
    exit_layers = [p.exit_layer for p in result.predictions]
    labels = [p.label if p.token_labels is None else list(p.token_labels) for p in result.predictions]
    return exit_layers, labels


@pytest.mark.parametrize("family, task", ENGINE_CASES)
def test_simulate_agrees_with_engine(family, task):
    """The point of calibration: a setting chosen offline behaves the same in the engine."""
    model = tiny_model(family, task)
    samples = make_samples(family, task, n=24)
    tau = safe_threshold(model, samples)
    outputs = collect_layer_outputs(model, samples, batch_size=5)
    engine = EarlyExitEngine(model, EngineConfig(batch_size=3))
    policies = [
        policy("epee", tau, 1, layers=model.num_layers),
        policy("epee", tau, 2, min_exit_layer=2, layers=model.num_layers),
        policy("entropy", tau, layers=model.num_layers),
        policy("patience", patience=1, layers=model.num_layers),
        policy("none", layers=model.num_layers),
        ScheduledExit(torch.arange(24) % model.num_layers + 1, model.num_layers),
    ]
    for pol in policies:
        exit_layers, labels = engine_outputs(engine.run(samples, pol))
        run = simulate(outputs, pol)
        assert run.exit_layers.tolist() == exit_layers, pol.config
        assert run.predictions == labels, pol.config
    assert len(set(simulate(outputs, policies[0]).exit_layers.tolist())) > 1, "test needs varied exits"


def random_gold(task, outputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    if task != "token":
        return torch.randint(0, 3, (outputs.num_samples,), generator=g).tolist()
    return [torch.randint(0, 3, (int(k),), generator=g).tolist() for k in outputs.lengths]


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_sweep_points_match_simulation(task):
    model = tiny_model("bert", task)
    samples = make_samples("bert", task, n=20)
    outputs = collect_layer_outputs(model, samples, batch_size=8)
    gold = random_gold(task, outputs)
    names = ["O", "B-E", "I-E"]
    metric = "accuracy" if task == "sequence" else "span_f1"

    def score_fn(pred):
        return task_scores(task, gold, pred, names)[metric]

    num_layers = model.num_layers
    points = sweep(outputs, score_fn, num_layers, thresholds=[0.0, 0.3, 0.6], patiences=[1, 2])
    assert [p.kind for p in points] == ["none"] + ["entropy"] * 3 + ["patience"] * 2 + ["epee"] * 6
    full = points[0]
    last_layer = simulate(outputs, policy("none", layers=num_layers))
    assert full.mean_exit_layer == num_layers and full.layer_speedup == 1.0
    assert full.score == score_fn(last_layer.predictions)
    for p in points:
        run = simulate(outputs, ExitPolicy(p.policy_config(), num_layers))
        assert p.mean_exit_layer == pytest.approx(run.mean_exit_layer)
        assert p.layer_speedup == pytest.approx(num_layers / run.mean_exit_layer)
        assert p.score == score_fn(run.predictions)


def test_sweep_defaults():
    model = tiny_model("bert", "sequence")
    outputs = collect_layer_outputs(model, make_samples("bert", "sequence", n=16))
    gold = random_gold("sequence", outputs)
    points = sweep(outputs, lambda pred: accuracy(gold, pred), model.num_layers, min_exit_layer=2)
    thresholds = default_thresholds(outputs, min_exit_layer=2)
    L = model.num_layers
    assert len(points) == 1 + len(thresholds) + (L - 1) + len(thresholds) * (L - 1)
    assert sorted({p.patience for p in points if p.kind == "patience"}) == list(range(1, L))
    assert sorted({p.entropy_threshold for p in points if p.kind == "entropy"}) == thresholds
    assert all(p.min_exit_layer == 2 and p.mean_exit_layer >= 2 for p in points)


def test_sweep_layer_count_checked():
    with pytest.raises(ValueError, match="num_layers \\(4\\) does not match the 3"):
        sweep(hand_outputs(), lambda pred: 0.0, 4)


class TestDefaultThresholds:
    def test_grid_included_sorted_unique(self):
        values = default_thresholds(hand_outputs())
        assert set(THRESHOLD_GRID) <= set(values)
        assert values == sorted(set(values))
        assert values[0] == 0.0 and values[-1] == 1.0

    def test_entropies_clustered_near_zero_still_separated(self):
        # a confident model: every entropy below 1e-3, where the fixed grid has no point
        eps = torch.logspace(-9, -5, 40)
        probs = torch.stack([1 - eps, eps], dim=1)  # (40, 2)
        outputs = LayerOutputs(probs=[probs, probs.flip(0), probs])
        gold = [0] * 40

        points = sweep(outputs, lambda pred: accuracy(gold, pred), 3, patiences=[2])
        mean_exits = {p.mean_exit_layer for p in points if p.kind == "entropy"}
        assert len(mean_exits) > 10  # the fixed grid alone gives two: 1.0 and 3.0

    def test_threshold_sits_between_entropies(self):
        probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
        outputs = LayerOutputs(probs=[probs, probs])
        values = default_thresholds(outputs)
        observed = normalised_entropy(probs).double().tolist()
        for tau in values:
            assert all(abs(tau - e) > 1e-6 for e in observed)
        # a threshold just above each of the two smaller entropies
        assert any(observed[0] < tau < observed[1] for tau in values)
        assert any(observed[1] < tau < observed[2] for tau in values)


def pt(kind, tau, patience, score, mean, layers=4):
    return SweepPoint(kind, tau, patience, score, mean, layers / mean)


HAND_POINTS = [
    pt("none", None, None, 0.80, 4.0),
    pt("epee", 0.1, 1, 0.80, 3.0),
    pt("epee", 0.2, 1, 0.795, 2.0),
    pt("epee", 0.3, 1, 0.70, 1.5),
    pt("epee", 0.3, 2, 0.60, 1.8),  # dominated by (0.3, 1)
    pt("epee", 0.4, 1, 0.795, 2.0),  # same outcome as (0.2, 1)
    pt("epee", 0.25, 1, 0.78, 2.5),  # dominated by (0.2, 1)
    pt("entropy", 0.2, None, 0.79, 1.9),
    pt("entropy", 0.1, None, 0.79, 2.2),  # dominated: same score, slower
    pt("patience", None, 1, 0.75, 2.6),
]


class TestFrontier:
    def test_epee(self):
        assert frontier(HAND_POINTS, "epee") == [HAND_POINTS[3], HAND_POINTS[5], HAND_POINTS[1]]

    def test_other_kinds(self):
        assert frontier(HAND_POINTS, "entropy") == [HAND_POINTS[7]]
        assert frontier(HAND_POINTS, "none") == [HAND_POINTS[0]]
        assert frontier(HAND_POINTS, "unknown") == []


class TestChoose:
    def test_fastest_within_tolerance(self):
        # (0.2, 1) and (0.4, 1) tie at 2.0 layers and 0.795: the larger τ wins
        assert choose(HAND_POINTS, full_score=0.80, tolerance=0.01) == HAND_POINTS[5]

    def test_zero_tolerance(self):
        assert choose(HAND_POINTS, full_score=0.80, tolerance=0.0) == HAND_POINTS[1]

    def test_wide_tolerance(self):
        assert choose(HAND_POINTS, full_score=0.80, tolerance=0.10) == HAND_POINTS[3]

    def test_boundary_is_inclusive_despite_float_rounding(self):
        assert 0.53 - 0.05 > 0.48  # why choose() allows a hair of slack
        points = [pt("epee", 0.5, 1, 0.48, 1.0), pt("epee", 0.1, 1, 0.53, 3.0)]
        assert choose(points, full_score=0.53, tolerance=0.05) == points[0]
        assert choose(HAND_POINTS, full_score=0.80, tolerance=0.01, kind="entropy") == HAND_POINTS[7]

    def test_nothing_qualifies_takes_the_most_accurate(self):
        assert choose(HAND_POINTS, full_score=0.95, tolerance=0.01) == HAND_POINTS[1]

    def test_unknown_kind(self):
        with pytest.raises(ValueError, match="no sweep points of kind 'entropi'"):
            choose(HAND_POINTS, 0.8, 0.01, kind="entropi")

    def test_chosen_point_reproduces_as_config(self):
        config = HAND_POINTS[5].policy_config()
        assert (config.kind, config.entropy_threshold, config.patience) == ("epee", 0.4, 1)
        assert HAND_POINTS[7].policy_config().kind == "entropy"


def swap_outputs(n=200, swapped=20, agree=False):
    """Two layers, gold all 0. Full depth (layer 2) is right on 3/4 of the records. Layer 1 is
    confident everywhere; with ``agree`` it predicts as layer 2 does, otherwise it breaks
    ``swapped`` right records and fixes ``swapped`` wrong ones: the same dev accuracy, by luck."""
    right = n * 3 // 4
    full = torch.tensor([0] * right + [1] * (n - right))
    early = full.clone()
    if not agree:
        early[:swapped] = 1
        early[right : right + swapped] = 0
    layer1 = torch.where(early.unsqueeze(1) == 0, torch.tensor([0.999, 0.001]), torch.tensor([0.001, 0.999]))
    layer2 = torch.where(full.unsqueeze(1) == 0, torch.tensor([0.7, 0.3]), torch.tensor([0.3, 0.7]))
    return LayerOutputs(probs=[layer1, layer2]), [0] * n


class TestChooseRobust:
    def test_lucky_early_setting_rejected(self):
        outputs, gold = swap_outputs()
        points = sweep(outputs, lambda pred: accuracy(gold, pred), 2)
        full = next(p for p in points if p.kind == "none")
        plain = choose(points, full.score, 0.01)
        assert plain.score == full.score and plain.mean_exit_layer == 1.0  # the plain rule takes the lucky one
        robust = choose_robust(outputs, points, gold, accuracy, 0.01, confidence=0.9, resamples=300)
        assert robust.point.mean_exit_layer == 2.0  # 40 changed predictions are too many to trust
        assert robust.drop_quantile <= 0.01
        assert robust.candidates_tested >= 2

    def test_faithful_early_setting_kept(self):
        outputs, gold = swap_outputs(agree=True)
        points = sweep(outputs, lambda pred: accuracy(gold, pred), 2)
        robust = choose_robust(outputs, points, gold, accuracy, 0.01)
        assert robust.point.mean_exit_layer == 1.0
        assert robust.drop_quantile == 0.0 and robust.mean_drop == 0.0
        assert robust.candidates_tested == 1

    def test_few_swaps_within_a_loose_tolerance_kept(self):
        outputs, gold = swap_outputs(swapped=2)
        points = sweep(outputs, lambda pred: accuracy(gold, pred), 2)
        robust = choose_robust(outputs, points, gold, accuracy, 0.05)
        assert robust.point.mean_exit_layer == 1.0 and 0.0 < robust.drop_quantile <= 0.05

    def test_same_seed_same_choice(self):
        outputs, gold = swap_outputs(swapped=6)
        points = sweep(outputs, lambda pred: accuracy(gold, pred), 2)
        a = choose_robust(outputs, points, gold, accuracy, 0.02, seed=3)
        b = choose_robust(outputs, points, gold, accuracy, 0.02, seed=3)
        assert a == b

    @pytest.mark.parametrize("kwargs, match", [
        ({"confidence": 1.0}, "confidence"), ({"confidence": 0.0}, "confidence"), ({"resamples": 0}, "resamples"),
    ])
    def test_arguments_checked(self, kwargs, match):
        outputs, gold = swap_outputs()
        points = sweep(outputs, lambda pred: accuracy(gold, pred), 2)
        with pytest.raises(ValueError, match=match):
            choose_robust(outputs, points, gold, accuracy, 0.01, **kwargs)

    def test_gold_length_checked(self):
        outputs, gold = swap_outputs()
        points = sweep(outputs, lambda pred: accuracy(gold, pred), 2)
        with pytest.raises(ValueError, match="gold has 3 entries"):
            choose_robust(outputs, points, gold[:3], accuracy, 0.01)


class TestReports:
    def test_csv_has_every_point(self, tmp_path):
        path = tmp_path / "sub" / "sweep.csv"
        write_sweep_table(HAND_POINTS, path)
        rows = list(csv.DictReader(path.open()))
        assert len(rows) == len(HAND_POINTS)
        assert rows[0]["kind"] == "none" and rows[0]["entropy_threshold"] == "" and rows[0]["patience"] == ""
        assert float(rows[2]["score"]) == 0.795 and int(rows[2]["patience"]) == 1
        assert math.isclose(float(rows[3]["layer_speedup"]), 4 / 1.5)

    def test_markdown_marks_the_choice(self):
        chosen = HAND_POINTS[5]
        table = render_table_markdown(HAND_POINTS, chosen)
        lines = table.strip().splitlines()
        assert len(lines) == 2 + 1 + 1 + 3 + 1  # header, none, patience, epee, entropy frontier rows
        marked = [line for line in lines if "**chosen**" in line]
        assert len(marked) == 1 and marked[0].startswith("| epee | 0.4 | 1 | 0.7950 | 2.000 |")

    def test_markdown_off_frontier_choice_listed(self):
        table = render_table_markdown(HAND_POINTS, HAND_POINTS[4])
        assert "**chosen** (off the frontier)" in table

    def test_plot_writes_png(self, tmp_path):
        pytest.importorskip("matplotlib")
        path = tmp_path / "frontier.png"
        plot_frontier(HAND_POINTS, HAND_POINTS[5], path, title="tiny model, dev accuracy")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_layer_outputs_in_bfloat16_are_float32_probabilities_close_to_float32():
    model = tiny_model("bert", "sequence")
    samples = make_samples("bert", "sequence", n=10)
    a = collect_layer_outputs(model, samples, batch_size=4)
    b = collect_layer_outputs(model, samples, batch_size=4, precision="bfloat16")
    for pa, pb in zip(a.probs, b.probs):
        assert pb.dtype == torch.float32 and not torch.equal(pa, pb)  # it did run in a lower precision
        torch.testing.assert_close(pb, pa, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="precision"):
        collect_layer_outputs(model, samples, precision="half")


@pytest.mark.parametrize("data_task, labels, negative", [
    ("sequence", ("a", "b", "c"), None), ("relation", ("none", "x", "y"), "none"), ("relation", ("x", "y", "z"), None),
])
def test_robust_choice_from_counts_equals_rescoring_every_resample(data_task, labels, negative):
    """score_function's counted form resamples by weighting records; the choice and its drop
    statistics are those of rescoring every resample with the plain function."""
    from epee.workflows.data import score_function

    g = torch.Generator().manual_seed(5)
    n, layers = 120, 4
    probs = [torch.softmax(torch.randn(n, 3, generator=g) * (1 + k), dim=1) for k in range(layers)]
    outputs = LayerOutputs(probs=probs)
    gold = torch.randint(0, 3, (n,), generator=g).tolist()
    _, fn = score_function(data_task, labels, negative)
    assert hasattr(fn, "counts")
    points = sweep(outputs, lambda pred: fn(gold, pred), layers)

    def plain(gold_, pred_):
        return fn(gold_, pred_)

    for tolerance in (0.0, 0.02, 0.08):
        fast = choose_robust(outputs, points, gold, fn, tolerance, resamples=100, seed=2)
        slow = choose_robust(outputs, points, gold, plain, tolerance, resamples=100, seed=2)
        assert fast.point == slow.point and fast.candidates_tested == slow.candidates_tested
        assert fast.drop_quantile == pytest.approx(slow.drop_quantile, abs=1e-12)
        assert fast.mean_drop == pytest.approx(slow.mean_drop, abs=1e-12)
