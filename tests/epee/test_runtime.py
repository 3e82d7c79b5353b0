"""epee.runtime: the arithmetic decided once per model, shared by the engine and calibration."""

import pytest
import torch

from epee.config import EngineConfig
from epee.engine import EarlyExitEngine
from epee.kernels import int8_matmul_available
from epee.runtime import Runtime, sparse_kernels
from tests.conftest import make_samples
from tests.epee.test_engine import epee_model


def test_runtime_resolves_the_kernel_and_quantises_once():
    model = epee_model("bert", "sequence")
    rt = Runtime.from_config(model, EngineConfig(linear_kernel="aten"))
    assert rt.linear_kernel == "aten" and rt.int8 is None
    with rt.context():
        assert torch.is_inference_mode_enabled()
    with rt.context():  # reusable: a new context each time
        pass
    with pytest.raises(ValueError, match="precision"):
        Runtime(model, precision="float64")


@pytest.mark.skipif(not int8_matmul_available(), reason="no CPU int8 matmul in this PyTorch")
def test_an_engine_given_a_runtime_uses_it_and_quantises_nothing_again(monkeypatch):
    import epee.kernels

    samples = make_samples("bert", "sequence", n=8)
    model = epee_model("bert", "sequence", samples)
    cfg = EngineConfig(batch_size=3, precision="int8")
    rt = Runtime.from_config(model, cfg)
    calls = []
    monkeypatch.setattr(epee.kernels.Int8Weights, "for_model", classmethod(lambda cls, m: calls.append(m)))
    engine = EarlyExitEngine(model, cfg, runtime=rt)
    assert engine.runtime is rt and calls == []
    first = engine.run(samples).predictions
    again = engine.run(samples).predictions
    assert [p.exit_layer for p in first] == [p.exit_layer for p in again]


def test_sparse_kernels_leave_a_dense_model_alone():
    model = epee_model("bert", "sequence")
    assert sparse_kernels(model, None, "cpu") is None
    assert sparse_kernels(model, {"config": {"pattern": "2:4"}, "masks": {"released": True}}, "cpu") is None
    why = sparse_kernels(model, {"config": {"pattern": "2:4"}, "masks": {"released": False}}, "cpu")
    assert isinstance(why, str) and next(model.parameters()).dtype == torch.float32
