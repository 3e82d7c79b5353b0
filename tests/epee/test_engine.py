"""The batched engine: same answers as one-at-a-time, whatever the batch; exited rows leave."""

import math
import random

import pytest
import torch

from epee import EarlyExitEngine, EngineConfig, ExitPolicyConfig, ScheduledExit, run_reference
from tests.conftest import FAMILY_TASKS, make_samples, safe_threshold, tiny_model


def epee_model(family, task, samples=None, quantile=0.5, patience=2, seed=0):
    """A tiny model with an EPEE policy whose threshold sits in a wide gap of its entropies."""
    model = tiny_model(family, task, seed=seed)
    samples = samples or make_samples(family, task)
    tau = safe_threshold(model, samples, quantile)
    model.config = type(model.config)(
        task=task, label_names=model.config.label_names,
        policy=ExitPolicyConfig(kind="epee", entropy_threshold=tau, patience=patience),
    )
    return model


def assert_same_predictions(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert (a.exit_layer, a.exit_reason, a.label) == (b.exit_layer, b.exit_reason, b.label), f"sample {i}"
        assert a.token_labels == b.token_labels, f"sample {i}"
        torch.testing.assert_close(torch.from_numpy(a.probs), torch.from_numpy(b.probs), atol=1e-5, rtol=0)
        assert a.entropy == pytest.approx(b.entropy, abs=1e-5)


@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_engine_matches_batch_size_one_reference(family, task):
    samples = make_samples(family, task, n=24)
    model = epee_model(family, task, samples)
    reference = run_reference(model, samples)
    assert len({p.exit_layer for p in reference}) > 1, "test needs samples exiting at different layers"
    for bsz in (1, 3, 8, 32):
        result = EarlyExitEngine(model, EngineConfig(batch_size=bsz)).run(samples)
        assert_same_predictions(result.predictions, reference)


@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_prediction_independent_of_batch_composition(family, task):
    """A sample's result must not depend on its companions, their lengths or the order."""
    probe = make_samples(family, task, n=6, seed=7, min_len=4, max_len=8)
    model = epee_model(family, task, probe + make_samples(family, task, n=18, seed=8))
    alone = [EarlyExitEngine(model, EngineConfig(batch_size=1)).run([s]).predictions[0] for s in probe]
    rng = random.Random(0)
    for trial, bsz in enumerate((2, 5, 16)):
        # long companions force padding around the probes in every batch
        others = make_samples(family, task, n=20, seed=100 + trial, min_len=15, max_len=40)
        mixed = probe + others
        order = list(range(len(mixed)))
        rng.shuffle(order)
        shuffled = [mixed[i] for i in order]
        for sort in (True, False):
            result = EarlyExitEngine(model, EngineConfig(batch_size=bsz, sort_by_length=sort)).run(shuffled)
            got = [result.predictions[order.index(i)] for i in range(len(probe))]
            assert_same_predictions(got, alone)


@pytest.mark.parametrize("family, task", [("bert", "sequence"), ("bert", "relation"), ("albert", "relation"),
                                          ("gpt2", "relation"), ("gpt2", "token"), ("vit", "sequence")])
@pytest.mark.parametrize("split", [True, False])
def test_exited_rows_are_never_computed(family, task, split, monkeypatch):
    """Count the rows that really enter each layer, not the engine's own counters. With two-step
    layers (heads that read [CLS], GPT-2's last token or the entity markers), a row's exit layer
    computes its keys and values and its head's positions; only rows that go on get the rest."""
    samples = make_samples(family, task, n=30)
    model = epee_model(family, task, samples)
    entered, whole = [0] * model.num_layers, [0] * model.num_layers
    adapter = model.adapter
    real = {name: getattr(adapter, name) for name in ("layer", "layer_keys", "layer_rest")}

    def spy(name):
        def counted(i, hidden, *args):
            if name in ("layer", "layer_keys"):
                entered[i] += hidden.shape[0]
            if name in ("layer", "layer_rest"):
                whole[i] += hidden.shape[0]
            return real[name](i, hidden, *args)
        return counted

    for name in real:
        monkeypatch.setattr(adapter, name, spy(name))
    result = EarlyExitEngine(model, EngineConfig(batch_size=4, split_layers=split)).run(samples)
    exits = [p.exit_layer for p in result.predictions]
    expected = [sum(1 for e in exits if e > i) for i in range(model.num_layers)]
    assert entered == expected
    assert result.stats.rows_per_layer == expected
    assert sum(entered) == sum(exits) < len(samples) * model.num_layers
    two_step = split and task != "token"
    going_on = [sum(1 for e in exits if e > i + 1) for i in range(model.num_layers)]
    assert whole == (going_on if two_step else expected)
    assert (result.stats.two_step_calls == result.stats.layer_calls) is two_step
    if two_step:
        assert whole[-1] == 0 and sum(whole) == sum(exits) - len(samples)


def test_regrouping_keeps_deep_batches_full():
    """Survivors from different incoming batches are merged, so every layer call but the last
    at each depth is full, even when each incoming batch loses rows at different layers."""
    layers, bsz, n = 4, 8, 64
    model = tiny_model("bert", "sequence", layers=layers)
    samples = make_samples("bert", "sequence", n=n)
    schedule = torch.tensor([1 + (i * 7) % layers for i in range(n)])  # exits spread evenly
    result = EarlyExitEngine(model, EngineConfig(batch_size=bsz)).run(samples, ScheduledExit(schedule, layers))
    assert [p.exit_layer for p in result.predictions] == schedule.tolist()
    assert all(p.exit_reason == "scheduled" for p in result.predictions)
    stats = result.stats
    for i in range(layers):
        survivors = int((schedule > i).sum())
        assert stats.rows_per_layer[i] == survivors
        assert stats.calls_per_layer[i] == math.ceil(survivors / bsz)
    assert stats.exits_per_layer == [int((schedule == i + 1).sum()) for i in range(layers)]
    assert stats.mean_batch_fill == pytest.approx(1.0)
    assert stats.mean_exit_layer == pytest.approx(float(schedule.float().mean()))
    assert stats.layer_speedup == pytest.approx(layers / float(schedule.float().mean()))


def test_without_regrouping_batches_would_shrink():
    """The same schedule one micro-batch at a time (window = batch) leaves partial batches."""
    layers, bsz, n = 4, 8, 64
    model = tiny_model("bert", "sequence", layers=layers)
    samples = make_samples("bert", "sequence", n=n)
    schedule = torch.tensor([1 + (i * 7) % layers for i in range(n)])
    narrow = EarlyExitEngine(model, EngineConfig(batch_size=bsz, window_size=bsz, sort_by_length=False))
    wide = EarlyExitEngine(model, EngineConfig(batch_size=bsz, sort_by_length=False))
    fill_narrow = narrow.run(samples, ScheduledExit(schedule, layers)).stats.mean_batch_fill
    fill_wide = wide.run(samples, ScheduledExit(schedule, layers)).stats.mean_batch_fill
    assert fill_wide == pytest.approx(1.0) and fill_narrow < 0.8


def test_length_grouping_reduces_padding():
    model = tiny_model("bert", "sequence", layers=2)
    samples = make_samples("bert", "sequence", n=64, min_len=2, max_len=60)
    sorted_stats = EarlyExitEngine(model, EngineConfig(batch_size=8)).run(samples).stats
    unsorted_stats = EarlyExitEngine(model, EngineConfig(batch_size=8, sort_by_length=False)).run(samples).stats
    assert sorted_stats.real_tokens == unsorted_stats.real_tokens
    assert sorted_stats.padding_fraction < 0.5 * unsorted_stats.padding_fraction


def test_windows_do_not_change_results():
    samples = make_samples("albert", "relation", n=40)
    model = epee_model("albert", "relation", samples)
    whole = EarlyExitEngine(model, EngineConfig(batch_size=4)).run(samples)
    windowed = EarlyExitEngine(model, EngineConfig(batch_size=4, window_size=8)).run(samples)
    assert_same_predictions(windowed.predictions, whole.predictions)
    assert windowed.stats.rows_computed == whole.stats.rows_computed


@pytest.mark.parametrize("kind", ["entropy", "patience", "epee"])
def test_each_policy_exits_as_its_rule_says(kind):
    samples = make_samples("bert", "sequence", n=30)
    model = tiny_model("bert", "sequence", layers=4)
    tau = safe_threshold(model, samples)
    model.config = type(model.config)(
        task="sequence", label_names=model.config.label_names,
        policy=ExitPolicyConfig(kind=kind, entropy_threshold=tau, patience=1),
    )
    preds = EarlyExitEngine(model, EngineConfig(batch_size=8)).run(samples).predictions
    reasons = {p.exit_reason for p in preds}
    allowed = {"entropy": {"entropy", "last_layer"}, "patience": {"patience", "last_layer"},
               "epee": {"entropy", "patience", "last_layer"}}[kind]
    assert reasons <= allowed and reasons - {"last_layer"}
    for p in preds:
        if p.exit_reason == "entropy":
            assert p.entropy < tau
        if p.exit_reason == "patience":
            assert p.exit_layer >= 2  # the counter needs a previous layer


def test_min_exit_layer_respected():
    samples = make_samples("gpt2", "sequence", n=20)
    model = tiny_model("gpt2", "sequence", layers=4)
    model.config = type(model.config)(
        task="sequence", label_names=model.config.label_names,
        policy=ExitPolicyConfig(kind="entropy", entropy_threshold=1.0, min_exit_layer=3),
    )
    preds = EarlyExitEngine(model).run(samples).predictions
    assert {p.exit_layer for p in preds} == {3}


def test_token_predictions_cover_each_real_token():
    samples = make_samples("bert", "token", n=10)
    model = epee_model("bert", "token", samples)
    for s, p in zip(samples, EarlyExitEngine(model, EngineConfig(batch_size=3)).run(samples).predictions):
        assert p.label is None and len(p.token_labels) == s.length and p.probs.shape == (s.length, 3)
        scored = s.token_mask.tolist()
        assert all((tag == -1) != ok for tag, ok in zip(p.token_labels, scored))


def test_stats_merge_adds_up():
    samples = make_samples("bert", "sequence", n=20)
    model = epee_model("bert", "sequence", samples)
    engine = EarlyExitEngine(model, EngineConfig(batch_size=4))
    a, b = engine.run(samples[:10]).stats, engine.run(samples[10:]).stats
    whole = engine.run(samples).stats
    a.merge(b)
    assert a.samples == 20 and a.rows_computed == whole.rows_computed
    assert a.exits_per_layer == whole.exits_per_layer


def test_empty_input():
    model = tiny_model("bert")
    result = EarlyExitEngine(model).run([])
    assert result.predictions == [] and result.stats.rows_computed == 0 and result.stats.mean_batch_fill == 0.0


def _linear_output_dtypes(model, run):
    """The dtypes the backbone's linear layers produced while ``run()`` ran."""
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_bfloat16_runs_the_layers_in_bfloat16_and_decides_in_float32(family, task):
    """--precision bfloat16: matrix products run in bfloat16 (that is where the CPU time goes), while
    probabilities and entropies come back in float32 and stay close to the float32 run."""
    samples = make_samples(family, task, n=16)
    model = epee_model(family, task, samples)
    fp32 = EarlyExitEngine(model, EngineConfig(batch_size=4))
    bf16 = EarlyExitEngine(model, EngineConfig(batch_size=4, precision="bfloat16"))
    assert _linear_output_dtypes(model, lambda: fp32.run(samples)) == {torch.float32}
    assert torch.bfloat16 in _linear_output_dtypes(model, lambda: bf16.run(samples))
    a, b = fp32.run(samples).predictions, bf16.run(samples).predictions
    assert all(p is not None for p in b)
    assert all(p.probs.dtype == a[0].probs.dtype for p in b) and isinstance(b[0].entropy, float)
    same_probs = sum(x.exit_layer == y.exit_layer and float(abs(x.probs - y.probs).max()) < 0.1 for x, y in zip(a, b))
    assert same_probs >= len(a) - 2  # bfloat16 keeps 8 bits of mantissa: a sample near τ may exit elsewhere



@pytest.mark.parametrize("family, task", [("bert", "sequence"), ("bert", "relation"), ("albert", "sequence"),
                                          ("albert", "relation"), ("gpt2", "sequence"), ("gpt2", "relation"),
                                          ("vit", "sequence")])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_two_step_layers_give_whole_layer_results(family, task, attention):
    """A layer run at the head's positions first and for the rows going on second gives the same
    probabilities, exits and reasons as the whole layer, with either attention implementation,
    across padding and regrouping (batch 5 over 40 samples of 3-20 tokens, unsorted so that
    batches mix lengths)."""
    samples = make_samples(family, task, n=40)
    model = epee_model(family, task, samples)
    model.backbone.config._attn_implementation = attention
    whole = EarlyExitEngine(model, EngineConfig(batch_size=5, split_layers=False, sort_by_length=False)).run(samples)
    split = EarlyExitEngine(model, EngineConfig(batch_size=5, sort_by_length=False)).run(samples)
    assert whole.stats.two_step_calls == 0 and split.stats.two_step_calls == split.stats.layer_calls
    assert_same_predictions(split.predictions, whole.predictions)
    exits = {p.exit_layer for p in split.predictions}
    assert len(exits) >= 2  # rows left at several depths, so rows went on after a two-step call
    assert split.stats.rows_per_layer == whole.stats.rows_per_layer
    assert split.stats.macs < whole.stats.macs and split.stats.dense_full_macs == whole.stats.dense_full_macs


def test_two_step_layers_only_where_rows_may_exit():
    """Policy none splits the last layer alone; min_exit_layer keeps earlier layers whole."""
    samples = make_samples("bert", "sequence", n=20)
    full = tiny_model("bert", "sequence", layers=4)  # policy none
    result = EarlyExitEngine(full, EngineConfig(batch_size=8)).run(samples)
    assert result.stats.two_step_calls == result.stats.calls_per_layer[-1] == 3
    late = tiny_model("bert", "sequence", layers=4, policy=ExitPolicyConfig(kind="patience", patience=1, min_exit_layer=3))
    result = EarlyExitEngine(late, EngineConfig(batch_size=8)).run(samples)
    assert result.stats.two_step_calls == sum(result.stats.calls_per_layer[2:])


@pytest.mark.parametrize("family, task, pooling", [("bert", "sequence", "mean"), ("bert", "token", "default"),
                                                   ("albert", "sequence", "default"), ("gpt2", "sequence", "default")])
def test_layers_run_whole_where_heads_read_every_token_or_family_cannot_split(family, task, pooling):
    """Mean pooling and token tasks read every token; ALBERT groups of more than one layer (here
    inner_group_num=2) and GPT-2 with eager attention's reordered upcast run whole."""
    samples = make_samples(family, task, n=12)
    model = tiny_model(family, task, pooling=pooling, policy=ExitPolicyConfig(kind="patience", patience=1))
    if family == "albert":
        torch.manual_seed(0)
        config = model.backbone.config
        config.inner_group_num = 2
        model = type(model).from_config(config, model.config)
    if family == "gpt2":
        model.backbone.config._attn_implementation = "eager"
        for block in model.backbone.h:
            block.attn.reorder_and_upcast_attn = True
    result = EarlyExitEngine(model, EngineConfig(batch_size=4)).run(samples)
    assert result.stats.two_step_calls == 0
    assert_same_predictions(result.predictions, run_reference(model, samples))


def test_hooked_layer_runs_whole():
    """A forward hook on any part of a layer must see that part called: that layer is not split."""
    samples = make_samples("bert", "sequence", n=12)
    model = tiny_model("bert", "sequence", layers=3)
    calls = []
    model.backbone.encoder.layer[2].attention.self.register_forward_hook(lambda *a: calls.append(1))
    result = EarlyExitEngine(model, EngineConfig(batch_size=4)).run(samples)
    assert result.stats.two_step_calls == 0 and len(calls) == result.stats.calls_per_layer[2] == 3
    assert_same_predictions(result.predictions, run_reference(model, samples))


@pytest.mark.parametrize("task", ["sequence", "relation"])
def test_gpt2_two_step_layers_without_padding(task):
    """Equal lengths leave SDPA no mask (it would align P queries with the first P keys): the
    queries at the head's positions must still see only the keys up to themselves."""
    samples = make_samples("gpt2", task, n=24, min_len=12, max_len=12)
    model = epee_model("gpt2", task, samples)
    assert model.adapter.attention_bias(torch.zeros(2, 12, 32), torch.ones(2, 12, dtype=torch.long)) is None
    whole = EarlyExitEngine(model, EngineConfig(batch_size=8, split_layers=False)).run(samples)
    split = EarlyExitEngine(model, EngineConfig(batch_size=8)).run(samples)
    assert split.stats.two_step_calls == split.stats.layer_calls > 0
    assert_same_predictions(split.predictions, whole.predictions)
    assert_same_predictions(split.predictions, run_reference(model, samples))


@pytest.mark.parametrize("family, task", FAMILY_TASKS)
@pytest.mark.parametrize("split", [False, True])
def test_audited_samples_ride_on_to_the_last_layer_without_changing_their_prediction(family, task, split):
    """An audited sample is emitted where it exits, then carried on with the rows still running:
    its last-layer prediction equals a full-depth run's, and the extra rows computed are exactly
    the layers the audited samples skipped (not a second run from layer 1)."""
    samples = make_samples(family, task, n=24)
    model = epee_model(family, task, samples)
    cfg = EngineConfig(batch_size=5, split_layers=split)
    plain = EarlyExitEngine(model, cfg).run(samples)
    flags = [i % 3 != 1 for i in range(len(samples))]
    audited = EarlyExitEngine(model, cfg).run(samples, audit=flags)
    assert_same_predictions(audited.predictions, plain.predictions)
    assert audited.stats.exits_per_layer == plain.stats.exits_per_layer and audited.stats.macs == plain.stats.macs
    full = EarlyExitEngine(model, cfg).run(samples, policy=ScheduledExit(torch.full((len(samples),), model.num_layers),
                                                                         model.num_layers)).predictions
    early = [i for i, p in enumerate(plain.predictions) if flags[i] and p.exit_layer < model.num_layers]
    assert early, "test needs audited samples that exit early"
    for i, ref in enumerate(audited.audit):
        if i not in early:
            assert ref is None
            continue
        assert (ref.exit_layer, ref.label, ref.token_labels) == (full[i].exit_layer, full[i].label, full[i].token_labels)
        torch.testing.assert_close(torch.from_numpy(ref.probs), torch.from_numpy(full[i].probs), atol=1e-5, rtol=0)
        assert ref.macs == full[i].macs
    skipped = sum(model.num_layers - plain.predictions[i].exit_layer for i in early)
    assert audited.stats.rows_computed - plain.stats.rows_computed == skipped
    with pytest.raises(ValueError, match="flags"):
        EarlyExitEngine(model, cfg).run(samples, audit=flags[:-1])


def _stream_all(engine, samples, chunks, audit=None, policy=None):
    """Submit ``samples`` in chunks of the given sizes, advancing after each; flush at the end.
    The predictions and audit references in input order, and the stream."""
    stream = engine.stream(policy)
    got, refs, pos = {}, {}, 0
    for size in chunks:
        part = samples[pos:pos + size]
        flags = None if audit is None else audit[pos:pos + size]
        stream.submit(part, audit=flags)
        pos += len(part)
        for f in stream.advance():
            got[f.ticket], refs[f.ticket] = f.prediction, f.audit
        assert all(w < engine.config.batch_size for w in stream.waiting_rows), "advance leaves only part batches"
    assert pos == len(samples)
    for f in stream.flush():
        got[f.ticket], refs[f.ticket] = f.prediction, f.audit
    assert stream.in_flight == 0 and stream.waiting_rows == [0] * engine.model.num_layers
    assert sorted(got) == list(range(len(samples))), "every sample comes back exactly once"
    return [got[i] for i in range(len(samples))], [refs[i] for i in range(len(samples))], stream


@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_stream_across_calls_gives_the_same_predictions(family, task):
    """Continuous batching over many submits: each sample's prediction and exit are what one
    ``run`` over all of them gives, whatever the chunking."""
    samples = make_samples(family, task, n=40)
    model = epee_model(family, task, samples)
    engine = EarlyExitEngine(model, EngineConfig(batch_size=4))
    expected = engine.run(samples).predictions
    assert len({p.exit_layer for p in expected}) > 1, "test needs samples exiting at different layers"
    for chunks in ([40], [1] * 40, [3, 7, 1, 13, 16], [9, 9, 9, 9, 4]):
        got, refs, _ = _stream_all(engine, samples, chunks)
        assert_same_predictions(got, expected)
        assert all(r is None for r in refs)


def test_stream_keeps_every_layer_call_full_across_calls():
    """Rows that have not exited wait between calls, so with new samples arriving every layer
    call but the flush's is full, where per-call regrouping leaves part batches at every call's
    end; the same rows are computed either way."""
    layers, bsz, n, chunk = 4, 8, 96, 12
    model = tiny_model("bert", "sequence", layers=layers)
    samples = make_samples("bert", "sequence", n=n)
    schedule = torch.tensor([1 + (i * 7) % layers for i in range(n)])
    engine = EarlyExitEngine(model, EngineConfig(batch_size=bsz, sort_by_length=False))
    per_call = [engine.run(samples[s:s + chunk], ScheduledExit(schedule[s:s + chunk], layers)).stats
                for s in range(0, n, chunk)]
    got, _, stream = _stream_all(engine, samples, [chunk] * (n // chunk), policy=ScheduledExit(schedule, layers))
    assert [p.exit_layer for p in got] == schedule.tolist()
    stats = stream.stats
    assert stats.rows_per_layer == [sum(s.rows_per_layer[i] for s in per_call) for i in range(layers)]
    full_calls = [stats.rows_per_layer[i] // bsz for i in range(layers)]
    assert all(stats.calls_per_layer[i] - full_calls[i] <= 1 for i in range(layers)), "one part batch per layer at most"
    per_call_fill = sum(sum(s.rows_per_layer) for s in per_call) / (sum(s.layer_calls for s in per_call) * bsz)
    assert stats.mean_batch_fill > 0.9 > per_call_fill


@pytest.mark.parametrize("family, task", FAMILY_TASKS[:2])
def test_stream_audit_references_match_a_run(family, task):
    """Audited samples ride on to the last layer across calls too; each comes back once, with
    its full-depth reference, only when that has run."""
    samples = make_samples(family, task, n=30)
    model = epee_model(family, task, samples)
    engine = EarlyExitEngine(model, EngineConfig(batch_size=4))
    flags = [i % 3 != 1 for i in range(len(samples))]
    expected = engine.run(samples, audit=flags)
    got, refs, _ = _stream_all(engine, samples, [5, 11, 2, 12], audit=flags)
    assert_same_predictions(got, expected.predictions)
    assert any(r is not None for r in refs), "test needs audited samples that exit early"
    for ref, exp in zip(refs, expected.audit):
        assert (ref is None) == (exp is None)
        if ref is not None:
            assert (ref.exit_layer, ref.label, ref.token_labels) == (exp.exit_layer, exp.label, exp.token_labels)


def test_stream_reset_drops_what_is_in_flight():
    model = tiny_model("bert", "sequence")
    samples = make_samples("bert", "sequence", n=10)
    stream = EarlyExitEngine(model, EngineConfig(batch_size=4)).stream()
    tickets = stream.submit(samples)
    assert tickets == list(range(10)) and stream.in_flight == 10
    assert stream.reset() == tickets and stream.in_flight == 0 and stream.flush() == []
    assert stream.submit(samples[:2]) == [10, 11]
    with pytest.raises(ValueError, match="flags"):
        stream.submit(samples[:2], audit=[True])
