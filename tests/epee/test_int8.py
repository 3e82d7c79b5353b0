"""--precision int8 (epee.kernels): the layers' linear products in int8, per-row activation scales,
so a row's result never depends on its batch; everything else float32."""

import pytest
import torch
from torch import nn

from epee import EarlyExitEngine, EngineConfig
from epee.calibration import collect_layer_outputs
from epee.config import ExitPolicyConfig
from epee.int8 import Int8Linear, Int8Weights, int8_matmul_available, quantize_rows
from epee.kernels import check_linear_kernel, linear_gelu, linear_kernel_mode
from epee.policies import ExitPolicy
from tests.conftest import FAMILY_TASKS, make_samples
from tests.epee.test_engine import assert_same_predictions, epee_model
from tests.epee.test_kernels import record_modes

pytestmark = pytest.mark.skipif(not int8_matmul_available(), reason="this PyTorch build has no CPU int8 matmul")


def test_quantize_rows_scales_each_row_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    x[2] = 0.0
    x[3] *= 1000.0
    q, scale = quantize_rows(x, rows=8)
    assert q.dtype == torch.int8 and q.shape == (8, 16) and scale.shape == (5, 1)
    assert int(q.abs().max()) == 127 and not q[5:].any()  # full int8 range used; padding rows are zero
    assert not q[2].any() and float(scale[2]) == 0.0  # an all-zero row stays zero
    err = (q[:5].float() * scale - x).abs()
    assert bool((err <= scale / 2 + 1e-6 * scale).all())  # within half a step of the row's own scale
    other = x.clone()
    other[1:] = torch.randn(4, 16) * 50.0  # other rows change: row 0 does not
    q2, scale2 = quantize_rows(other)
    assert torch.equal(q2[0], q[0]) and torch.equal(scale2[0], scale[0])


def test_int8_linear_is_close_to_float32_and_counts_its_calls():
    torch.manual_seed(0)
    lin, up = nn.Linear(48, 80), nn.Linear(48, 96)
    head = nn.Linear(48, 3)  # not in the int8 table: stays float32
    x = torch.randn(3, 7, 48)
    with torch.inference_mode():
        expected, expected_gelu, expected_head = lin(x), nn.functional.gelu(up(x)), head(x)
        mode = Int8Linear(Int8Weights([lin.weight, up.weight]))
        with mode:
            got, got_gelu, got_head = lin(x), linear_gelu(x, up), head(x)
    assert mode.int8_calls == 2
    assert torch.equal(got_head, expected_head)
    for g, e in ((got, expected), (got_gelu, expected_gelu)):
        assert g.shape == e.shape and g.dtype == torch.float32
        assert float((g - e).abs().max()) < 0.02 * float(e.abs().max())  # int8: about 1% of the range
        assert not torch.equal(g, e)  # it did run in int8


@pytest.mark.parametrize("rows", [1, 9, 21, 300])  # 9, 21 and 300 rows are padded for the kernel
def test_int8_linear_is_exactly_the_int8_arithmetic_it_describes(rows):
    """The int32 product lands in the output's own memory and is converted there: check every value
    against the same arithmetic written out plainly."""
    torch.manual_seed(rows)
    lin = nn.Linear(40, 24)
    x = torch.randn(rows, 40)
    weights = Int8Weights([lin.weight])
    entry = weights.get(lin.weight)
    q, scale = quantize_rows(x)
    expected = (q.int() @ entry.qt.int()).float() * scale * entry.scale + lin.bias
    with torch.inference_mode(), Int8Linear(weights):
        got = lin(x)
    assert torch.equal(got, expected.detach())


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao.quantization
def test_a_rows_int8_result_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    lin = nn.Linear(32, 40)
    x = torch.randn(1, 5, 32)
    crowd = torch.cat([x, torch.randn(6, 5, 32) * 30.0])  # outliers elsewhere in the batch
    with torch.inference_mode(), Int8Linear(Int8Weights([lin.weight])):
        alone, together = lin(x), lin(crowd)[:1]
    assert torch.equal(alone, together)  # exactly: per-row scales and exact int32 products
    # the premise: one activation scale per call (PyTorch's dynamic quantisation) would change it
    per_tensor = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        assert not torch.allclose(per_tensor(x), per_tensor(crowd)[:1], atol=1e-3)


def test_an_inplace_change_to_the_shared_input_is_not_missed():
    """Q, K and V share one quantisation of their input; an in-place op in between drops it."""
    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        mode = Int8Linear(Int8Weights([a.weight, b.weight]))
        with mode:
            a(x)
            x.mul_(3.0)
            got = b(x)
        with Int8Linear(Int8Weights([b.weight])):
            fresh = b(x)
    assert torch.equal(got, fresh)


@pytest.mark.parametrize("family, per_layer", [("bert", 6), ("albert", 6), ("gpt2", 4), ("vit", 6)])
def test_int8_weights_are_the_layers_linear_weights_only(family, per_layer):
    task = "sequence"
    model = epee_model(family, task, make_samples(family, task))
    weights = Int8Weights.for_model(model)
    # ALBERT's layers share their groups' weights (two groups in the tiny config)
    layers = model.adapter.config.num_hidden_groups if family == "albert" else model.num_layers
    assert len(weights) == per_layer * layers
    for name, p in model.named_parameters():
        if "head" in name or "pooler" in name or "embed" in name or "wte" in name or "wpe" in name:
            assert weights.get(p) is None and weights.get(p, transposed=True) is None, name


def test_a_weight_changed_in_place_is_quantised_again():
    lin = nn.Linear(8, 4)
    weights = Int8Weights([lin.weight])
    before = weights.get(lin.weight).scale.clone()
    with torch.no_grad():
        lin.weight.mul_(2.0)
    torch.testing.assert_close(weights.get(lin.weight).scale, 2 * before)


def test_no_layer_weights_is_an_error_not_a_silent_float32_run():
    class Plain(nn.Module):
        num_layers = 1

        class adapter:
            @staticmethod
            def layer_module(i):
                return nn.LayerNorm(4)

    with pytest.raises(ValueError, match="no float32 linear layer"):
        Int8Weights.for_model(Plain())


def test_int8_rules():
    check_linear_kernel("onednn", "cpu", "int8")  # heads may run through oneDNN beside the int8 layers
    with pytest.raises(ValueError, match="CPU only"):
        check_linear_kernel("auto", "cuda", "int8")
    with pytest.raises(ValueError, match="'onednn' or 'aten'"):
        linear_kernel_mode("auto", Int8Weights())


@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_engine_in_int8_is_close_to_float32_and_the_same_at_every_batch_size(family, task, monkeypatch):
    samples = make_samples(family, task, n=24)
    model = epee_model(family, task, samples)
    modes = record_modes(monkeypatch)
    fp32 = EarlyExitEngine(model, EngineConfig(batch_size=5)).run(samples).predictions
    int8 = EarlyExitEngine(model, EngineConfig(batch_size=5, precision="int8")).run(samples)
    assert isinstance(modes[-1], Int8Linear) and modes[-1].int8_calls > 0
    assert not isinstance(modes[0], Int8Linear)
    close = sum(a.exit_layer == b.exit_layer and float(abs(a.probs - b.probs).max()) < 0.05
                for a, b in zip(fp32, int8.predictions))
    assert close >= len(samples) - 2  # a sample near τ may exit elsewhere
    for bsz in (1, 3, 24):  # regrouping changes every row's batch mates: its result must not change
        again = EarlyExitEngine(model, EngineConfig(batch_size=bsz, precision="int8")).run(samples)
        assert_same_predictions(again.predictions, int8.predictions)


def test_calibration_in_int8_sees_what_the_int8_engine_runs():
    samples = make_samples("bert", "sequence", n=20)
    model = epee_model("bert", "sequence", samples)
    outputs = collect_layer_outputs(model, samples, batch_size=6, precision="int8")
    full = EarlyExitEngine(model, EngineConfig(batch_size=4, precision="int8")).run(
        samples, ExitPolicy(ExitPolicyConfig(kind="none"), model.num_layers)).predictions
    last = torch.as_tensor(outputs.probs[-1])
    for i, p in enumerate(full):
        torch.testing.assert_close(torch.as_tensor(p.probs), last[i], atol=1e-5, rtol=0)
    fp32 = collect_layer_outputs(model, samples, batch_size=6)
    assert not torch.equal(torch.as_tensor(fp32.probs[-1]), last)
