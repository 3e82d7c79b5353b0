"""The float32 linear kernel (epee.kernels): oneDNN where sound, the same answers as PyTorch's own."""

import pytest
import torch
from torch import nn

import epee.runtime
import epee.kernels
from epee import EarlyExitEngine, EngineConfig
from epee.calibration import collect_layer_outputs
from epee.kernels import (
    ROW_STEPS,
    OneDNNLinear,
    bucket_rows,
    check_linear_kernel,
    fusable_gelu_ffn,
    linear_gelu,
    linear_kernel_mode,
    onednn_linear_available,
    resolve_linear_kernel,
)
from epee.backbones import BertAdapter
from tests.conftest import FAMILY_TASKS, make_samples, tiny_backbone_config
from tests.epee.test_engine import assert_same_predictions, epee_model

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN linear op")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_pytorch_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    inputs = [torch.randn(5, 48), torch.randn(3, 7, 48), torch.randn(48, 7, 3).permute(2, 1, 0), torch.randn(0, 4, 48),
              torch.randn(4, 33, 48)]  # 21 and 132 token rows are padded (to 22 and 144), 5 and 0 are not
    with torch.inference_mode():
        for x in inputs:
            mode = OneDNNLinear()
            with mode:
                got = lin(x)
            assert mode.calls == 1
            assert got.shape == (*x.shape[:-1], 80) and got.dtype == torch.float32
            torch.testing.assert_close(got, lin(x), atol=1e-5, rtol=1e-5)


def test_bucket_rows_bounds_the_padding_and_the_number_of_shapes():
    sizes = [bucket_rows(m) for m in range(1, 4097)]
    assert all(m <= b < m * (1 + 1 / ROW_STEPS) for m, b in zip(range(1, 4097), sizes))
    assert sizes == sorted(sizes)  # more rows never get fewer padded rows
    assert [bucket_rows(m) for m in (1, 8, 9, 16, 17, 100, 1000, 4096, 4097)] == [1, 8, 9, 16, 18, 104, 1024, 4096, 4608]
    assert len(set(sizes)) == 8 + 8 * 9  # 1..8 as they are, then 8 sizes per power of two up to 4096
    assert bucket_rows(0) == 0
    assert bucket_rows(97, steps=16) == 100 and bucket_rows(97) == 104


@needs_onednn
def test_engine_calls_onednn_with_bucketed_row_counts_only(monkeypatch):
    """Whatever the lengths and exits, oneDNN sees padded row counts from the bounded set."""
    seen = []
    call = epee.kernels._onednn_linear

    posts = []

    def recording(rows, w, b, post="none"):
        seen.append(rows.shape[0])
        posts.append(post)
        return call(rows, w, b, post)

    monkeypatch.setattr(epee.kernels, "_onednn_linear", recording)
    samples = make_samples("bert", "sequence", n=40)
    model = epee_model("bert", "sequence", samples)
    aten = EarlyExitEngine(model, EngineConfig(batch_size=7, linear_kernel="aten")).run(samples)
    whole = EarlyExitEngine(model, EngineConfig(batch_size=7, linear_kernel="onednn", split_layers=False)).run(samples)
    assert_same_predictions(whole.predictions, aten.predictions)
    assert seen and all(bucket_rows(m) == m for m in seen)
    assert len({s.length for s in samples}) > 3  # the samples really varied
    # every layer call's up-projection ran with GELU fused; Q, K, V, O, down and the heads without
    assert posts.count("gelu") == whole.stats.layer_calls > 0
    assert posts.count("none") >= 5 * whole.stats.layer_calls
    # two-step layers: the head's positions, then the rows that go on; both steps fused and bucketed
    seen.clear(), posts.clear()
    split = EarlyExitEngine(model, EngineConfig(batch_size=7, linear_kernel="onednn")).run(samples)
    assert_same_predictions(split.predictions, aten.predictions)
    assert seen and all(bucket_rows(m) == m for m in seen)
    assert split.stats.two_step_calls == split.stats.layer_calls
    assert split.stats.layer_calls < posts.count("gelu") < 2 * split.stats.layer_calls


@needs_onednn
def test_calls_needing_gradients_keep_pytorch_linear():
    """Training inside the mode (it never is, but a caller could) still gets gradients."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    mode = OneDNNLinear()
    with mode:
        lin(torch.randn(3, 8)).sum().backward()
    assert mode.calls == 0 and lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    with torch.no_grad(), mode:  # no gradients wanted: oneDNN again
        lin(torch.randn(3, 8))
    assert mode.calls == 1


@needs_onednn
def test_autocast_and_other_dtypes_keep_pytorch_linear():
    lin = nn.Linear(8, 4)
    mode = OneDNNLinear()
    with torch.inference_mode(), mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lin(torch.randn(3, 8))
        assert out.dtype == torch.bfloat16  # autocast's semantics kept, not silently float32
        out64 = lin.double()(torch.randn(3, 8, dtype=torch.float64))
        assert out64.dtype == torch.float64
    assert mode.calls == 0


def test_kernel_choice_rules():
    assert EngineConfig().linear_kernel == "auto"
    assert resolve_linear_kernel("aten", "cpu", "float32") == "aten"
    assert resolve_linear_kernel("aten", "cuda", "bfloat16") == "aten"
    assert resolve_linear_kernel("auto", "cpu", "bfloat16") == "aten"  # autocast keeps PyTorch's path
    assert resolve_linear_kernel("auto", "cuda", "float32") == "aten"
    with pytest.raises(ValueError, match="CPU only"):
        check_linear_kernel("onednn", "cuda:0", "float32")
    with pytest.raises(ValueError, match="float32"):
        check_linear_kernel("onednn", "cpu", "bfloat16")
    with pytest.raises(ValueError, match="must be one of"):
        check_linear_kernel("mkl", "cpu", "float32")
    with pytest.raises(ValueError, match="linear_kernel"):
        EngineConfig(linear_kernel="mkl")
    with pytest.raises(ValueError, match="must be 'onednn' or 'aten'"):
        linear_kernel_mode("auto")


def test_auto_follows_the_machine(monkeypatch):
    monkeypatch.setattr(epee.kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(epee.kernels, "onednn_linear_available", lambda: True)
    assert resolve_linear_kernel("auto", "cpu", "float32") == "onednn"
    monkeypatch.setattr(epee.kernels, "onednn_linear_available", lambda: False)
    assert resolve_linear_kernel("auto", "cpu", "float32") == "aten"
    monkeypatch.setattr(epee.kernels, "onednn_linear_available", lambda: True)
    monkeypatch.setattr(epee.kernels.platform, "machine", lambda: "aarch64")
    assert resolve_linear_kernel("auto", "cpu", "float32") == "aten"


def test_onednn_asked_for_without_the_op_is_an_error(monkeypatch):
    monkeypatch.setattr(epee.kernels, "onednn_linear_available", lambda: False)
    with pytest.raises(ValueError, match="no oneDNN linear op"):
        resolve_linear_kernel("onednn", "cpu", "float32")
    with pytest.raises(ValueError, match="no oneDNN linear op"):
        EarlyExitEngine(epee_model("bert", "sequence"), EngineConfig(linear_kernel="onednn"))
    assert EarlyExitEngine(epee_model("bert", "sequence")).linear_kernel == "aten"  # auto falls back


def record_modes(monkeypatch) -> list:
    """The kernel modes the engine's runs enter, in order (``epee.runtime.linear_kernel_mode`` spied on)."""
    modes = []

    def recording(kernel, int8=None):
        modes.append(linear_kernel_mode(kernel, int8))
        return modes[-1]

    monkeypatch.setattr(epee.runtime, "linear_kernel_mode", recording)
    return modes


@needs_onednn
@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_engine_gives_the_same_results_with_either_kernel(family, task, monkeypatch):
    samples = make_samples(family, task, n=24)
    model = epee_model(family, task, samples)
    modes = record_modes(monkeypatch)
    aten = EarlyExitEngine(model, EngineConfig(batch_size=5, linear_kernel="aten")).run(samples)
    onednn_engine = EarlyExitEngine(model, EngineConfig(batch_size=5, linear_kernel="onednn"))
    assert onednn_engine.linear_kernel == "onednn"
    onednn = onednn_engine.run(samples)
    assert_same_predictions(onednn.predictions, aten.predictions)
    assert not isinstance(modes[0], OneDNNLinear)
    assert isinstance(modes[1], OneDNNLinear) and modes[1].calls > 0  # the layers really ran through it
    assert onednn.stats.rows_per_layer == aten.stats.rows_per_layer


@needs_onednn
def test_calibration_collects_the_same_probabilities_with_either_kernel():
    samples = make_samples("bert", "sequence", n=20)
    model = epee_model("bert", "sequence", samples)
    a = collect_layer_outputs(model, samples, batch_size=6, linear_kernel="aten")
    b = collect_layer_outputs(model, samples, batch_size=6, linear_kernel="onednn")
    for pa, pb in zip(a.probs, b.probs):
        torch.testing.assert_close(torch.as_tensor(pb), torch.as_tensor(pa), atol=1e-5, rtol=0)


def test_handler_refuses_onednn_off_the_cpu_at_construction(tmp_path):
    from transforms.handler import EarlyExitModelHandler

    from transforms.context import JobContext

    with pytest.raises(ValueError, match="CPU only"):  # the handler's engine config, built at start-up
        EarlyExitModelHandler(JobContext("r", str(tmp_path)), EngineConfig(device="cuda", linear_kernel="onednn"))
    handler = EarlyExitModelHandler(JobContext("r", str(tmp_path)), EngineConfig(linear_kernel="aten"))
    assert handler.engine_config.linear_kernel == "aten"


@needs_onednn
def test_linear_gelu_fuses_inside_the_mode_and_equals_gelu_of_linear():
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    x = torch.randn(3, 7, 48)  # 21 token rows: padded to 22 for oneDNN
    with torch.inference_mode():
        expected = nn.functional.gelu(lin(x))
        assert torch.equal(linear_gelu(x, lin), expected)  # no mode: exactly the two ops
        mode = OneDNNLinear()
        with mode:
            got = linear_gelu(x, lin)
        assert (mode.calls, mode.fused_gelu_calls) == (1, 1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert got.shape == (3, 7, 96)


@needs_onednn
def test_linear_gelu_does_not_fuse_what_the_mode_would_not_route():
    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    x = torch.randn(5, 16)
    seen = []
    lin.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.inference_mode():
        mode = OneDNNLinear()
        with mode:
            hooked = linear_gelu(x, lin)  # a hooked module runs its own forward, hooks included
        assert seen == [(5, 32)] and mode.fused_gelu_calls == 0
        torch.testing.assert_close(hooked, nn.functional.gelu(lin(x)))
    plain = nn.Linear(16, 32)
    xg = torch.randn(5, 16, requires_grad=True)
    mode = OneDNNLinear()
    with mode:
        out = linear_gelu(xg, plain)  # needs gradients: PyTorch's linear, differentiable
    assert mode.calls == 0 and out.requires_grad
    out.sum().backward()
    assert xg.grad is not None


def _bert(**overrides):
    from transformers import BertModel

    torch.manual_seed(0)
    cfg = tiny_backbone_config("bert", layers=2)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return BertModel(cfg).eval()


@pytest.mark.parametrize("hidden_act, fused", [("gelu", True), ("relu", False), ("gelu_new", False)])
def test_bert_layer_runs_the_stock_layer_with_or_without_the_fused_path(hidden_act, fused):
    model = _bert(hidden_act=hidden_act)
    adapter = BertAdapter(model)
    layer = model.encoder.layer[0]
    assert fusable_gelu_ffn(layer) is fused
    x = torch.randn(3, 9, 32)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 4:] = 0
    bias = adapter.attention_bias(x, mask)
    with torch.inference_mode():
        expected = layer(x, bias)
        assert torch.equal(adapter.layer(0, x, bias), expected)  # PyTorch's kernel: the very same ops
        if onednn_linear_available():
            mode = OneDNNLinear()
            with mode:
                got = adapter.layer(0, x, bias)
            assert mode.fused_gelu_calls == int(fused)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bert_layer_hooks_and_training_keep_the_stock_forward():
    model = _bert()
    adapter = BertAdapter(model)
    layer = model.encoder.layer[0]
    calls = []
    handle = layer.intermediate.register_forward_hook(lambda mod, inp, out: calls.append(1))
    assert not fusable_gelu_ffn(layer)
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        adapter.layer(0, x, None)
    assert calls == [1]  # the hooked module really ran
    handle.remove()
    assert fusable_gelu_ffn(layer)
    model.train()
    seen = []
    layer.register_forward_hook(lambda mod, inp, out: seen.append(1))  # BertLayer's own forward runs in training
    adapter.layer(0, x, None)
    assert seen == [1]
