"""Our DaskRunner (transforms/runners/dask_runner.py) on a real multi-process Dask cluster.

Each defect of Beam 2.77's DaskRunner has a probe pipeline with no project code, run on our
runner (must pass) and on Beam's (strict xfail: the probe shows the defect; when upstream fixes
it the xfail passes, the test fails, and the override can go). Sinks write one JSON file per
element with the pid of the process that ran it (the workers share this machine's disk)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.dask.dask_runner import DaskRunner
from apache_beam.transforms import userstate
from apache_beam.transforms.window import GlobalWindows

from transforms.runners import is_dask, resolve_runner
from transforms.runners.dask_runner import DaskRunnerRefused, EpeeDaskRunner


class Record(beam.DoFn):
    """Writes each element, with this process's pid, to a file of its own under ``directory``."""

    def __init__(self, directory: str, pause: float = 0.0):
        self.directory, self.pause = directory, pause

    def process(self, element):
        time.sleep(self.pause)
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        path = Path(self.directory) / f"{uuid.uuid4().hex}.json"
        path.write_text(json.dumps({"value": element, "pid": os.getpid()}))


def recorded(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] if directory.exists() else []


def values(directory: Path) -> list:
    got = [r["value"] for r in recorded(directory)]
    return sorted(got, key=lambda v: (json.dumps(v) if isinstance(v, list) else v))


def run_on(runner_cls, address: str, build, *flags: str) -> None:
    options = PipelineOptions(["--dask_client_address", address, *flags])
    with beam.Pipeline(runner=runner_cls(), options=options) as p:
        build(p)


RUNNERS = [pytest.param(EpeeDaskRunner, id="ours"),
           pytest.param(DaskRunner, id="beam", marks=pytest.mark.xfail(strict=True, reason="Beam 2.77's defect"))]


def split_odd_even(x):
    yield beam.pvalue.TaggedOutput("odd" if x % 2 else "even", x)


@pytest.mark.parametrize("runner", RUNNERS)
def test_tagged_outputs_share_one_bag(runner, dask_address, tmp_path):
    def build(p):
        outs = p | beam.Create(range(10)) | beam.FlatMap(split_odd_even).with_outputs("odd", "even")
        outs.odd | beam.ParDo(Record(str(tmp_path / "odd")))

    run_on(runner, dask_address, build)
    assert values(tmp_path / "odd") == [1, 3, 5, 7, 9]


class BatchOf4(beam.DoFn):
    """Emits batches of 4 and the last partial batch in finish_bundle (as RunInference does)."""

    def start_bundle(self):
        self.batch = []

    def process(self, x):
        self.batch.append(x)
        if len(self.batch) == 4:
            yield self.batch
            self.batch = []

    def finish_bundle(self):
        if self.batch:
            yield GlobalWindows.windowed_value(self.batch)
            self.batch = []


@pytest.mark.parametrize("runner", RUNNERS)
def test_finish_bundle_outputs_dropped(runner, dask_address, tmp_path):
    def build(p):
        p | beam.Create(range(10)) | beam.ParDo(BatchOf4()) | beam.ParDo(Record(str(tmp_path / "batches")))

    run_on(runner, dask_address, build, "--dask_npartitions", "1")
    batches = values(tmp_path / "batches")
    assert sorted(x for b in batches for x in b) == list(range(10))


@pytest.mark.parametrize("runner", RUNNERS)
def test_only_last_sink_computed(runner, dask_address, tmp_path):
    def build(p):
        numbers = p | beam.Create(range(6))
        numbers | "A" >> beam.ParDo(Record(str(tmp_path / "a")))
        numbers | "Square" >> beam.Map(lambda x: x * x) | "B" >> beam.ParDo(Record(str(tmp_path / "b")))

    run_on(runner, dask_address, build)
    assert values(tmp_path / "a") == list(range(6))
    assert values(tmp_path / "b") == [x * x for x in range(6)]


@pytest.mark.parametrize("runner", RUNNERS)
def test_reshuffle_is_a_no_op(runner, dask_address, tmp_path):
    """Eight files' names from one listing (one element): only Reshuffle can spread them."""

    def build(p):
        (p | beam.Create([8]) | beam.FlatMap(lambda n: [f"file-{i}" for i in range(n)]) | beam.Reshuffle()
         | beam.ParDo(Record(str(tmp_path / "files"), pause=0.3)))

    run_on(runner, dask_address, build)
    rows = recorded(tmp_path / "files")
    assert sorted(r["value"] for r in rows) == [f"file-{i}" for i in range(8)]
    assert len({r["pid"] for r in rows}) == 2  # both worker processes read files


class CountSetups(beam.DoFn):
    """Records each setup (a model load, in our jobs) with its pid."""

    def __init__(self, directory: str):
        self.directory = directory

    def setup(self):
        Record(self.directory).process("setup")

    def process(self, x):
        yield x


@pytest.mark.parametrize("runner", RUNNERS)
def test_dofn_set_up_per_bundle(runner, dask_address, tmp_path):
    def build(p):
        (p | beam.Create(range(16)) | beam.ParDo(CountSetups(str(tmp_path / "setups")))
         | beam.ParDo(Record(str(tmp_path / "out"))))

    run_on(runner, dask_address, build, "--dask_npartitions", "8")
    assert len(recorded(tmp_path / "out")) == 16
    setups = recorded(tmp_path / "setups")
    # one set-up DoFn per worker thread (one each here), however many bundles
    assert 1 <= len(setups) == len({s["pid"] for s in setups}) <= 2


def test_group_by_key_and_side_inputs_across_workers(dask_address, tmp_path):
    """String keys group the same in every worker process (``hash`` of a str differs between
    them); combiners, Flatten and side inputs as lists and dicts work."""
    words = [f"w{i % 5}" for i in range(40)]

    def build(p):
        pc = p | "Words" >> beam.Create(words)
        counts = pc | beam.combiners.Count.PerElement()
        lookup = p | "Lookup" >> beam.Create([("w0", "zero"), ("w1", "one")])
        both = (counts, p | "More" >> beam.Create([("extra", 1)])) | beam.Flatten()
        named = both | beam.Map(lambda kv, names: [kv[0], kv[1], names.get(kv[0], "?")], beam.pvalue.AsDict(lookup))
        named | "Named" >> beam.ParDo(Record(str(tmp_path / "named")))
        grouped = pc | beam.Map(lambda w: (w, 1)) | beam.GroupByKey() | beam.MapTuple(lambda k, vs: [k, len(list(vs))])
        grouped | "Grouped" >> beam.ParDo(Record(str(tmp_path / "grouped")))
        sizes = pc | beam.Map(lambda w, table: len(table), beam.pvalue.AsList(lookup))
        sizes | "Sizes" >> beam.ParDo(Record(str(tmp_path / "sizes")))

    run_on(EpeeDaskRunner, dask_address, build, "--dask_npartitions", "4")
    assert values(tmp_path / "grouped") == [[f"w{i}", 8] for i in range(5)]
    assert values(tmp_path / "named") == sorted([["extra", 1, "?"]] + [[f"w{i}", 8, {0: "zero", 1: "one"}.get(i, "?")]
                                                                      for i in range(5)], key=json.dumps)
    assert values(tmp_path / "sizes") == [2] * 40


def test_a_failing_dofn_fails_the_run(dask_address, tmp_path):
    def boom(x):
        if x == 3:
            raise RuntimeError("element 3 is bad")
        return x

    with pytest.raises(Exception, match="element 3 is bad"):
        run_on(EpeeDaskRunner, dask_address, lambda p: p | beam.Create(range(5)) | beam.Map(boom))


class Stateful(beam.DoFn):
    COUNT = userstate.CombiningValueStateSpec("count", combine_fn=sum)

    def process(self, kv, count=beam.DoFn.StateParam(COUNT)):
        count.add(1)
        yield kv


def test_what_it_cannot_run_is_refused_at_start_up(dask_address):
    with pytest.raises(DaskRunnerRefused, match="batch-only"):
        run_on(EpeeDaskRunner, dask_address, lambda p: p | beam.Create([1]), "--streaming")
    with pytest.raises(DaskRunnerRefused, match="user state"):
        run_on(EpeeDaskRunner, dask_address, lambda p: p | beam.Create([("a", 1)]) | beam.ParDo(Stateful()))


def test_an_unreachable_scheduler_is_one_clear_error():
    started = time.monotonic()
    with pytest.raises(DaskRunnerRefused, match=r"no Dask scheduler reachable at tcp://127\.0\.0\.1:9\b") as err:
        run_on(EpeeDaskRunner, "tcp://127.0.0.1:9", lambda p: p | beam.Create([1]), "--dask_connection_timeout", "2")
    assert "\n" not in str(err.value) and time.monotonic() - started < 30


def test_short_names_resolve_to_our_runner():
    ours = "transforms.runners.dask_runner.EpeeDaskRunner"
    for name in ("DaskRunner", "dask", "apache_beam.runners.dask.dask_runner.DaskRunner"):
        assert resolve_runner(name) == ours and is_dask(name)
    assert resolve_runner("DirectRunner") == "DirectRunner" and not is_dask("DirectRunner") and not is_dask(None)


class CountTeardowns(CountSetups):
    def teardown(self):
        Record(self.directory + "-teardown").process("teardown")


def test_a_long_lived_cluster_tears_down_older_runs_dofns(dask_address, tmp_path):
    """Night after night on one cluster: each worker keeps the DoFns of its latest two runs, and
    tears down older ones (their models) when a newer run's bundles arrive."""
    for night in range(4):
        d = str(tmp_path / f"night{night}")
        run_on(EpeeDaskRunner, dask_address,
               lambda p: p | beam.Create(range(8)) | beam.ParDo(CountTeardowns(d)), "--dask_npartitions", "4")
    set_up = [night for night in range(4) if recorded(tmp_path / f"night{night}")]
    torn_down = [night for night in range(4) if recorded(tmp_path / f"night{night}-teardown")]
    assert set_up == [0, 1, 2, 3]
    assert torn_down and set(torn_down) <= {0, 1} and 0 in torn_down


class Pass(Record):
    def process(self, x):
        super().process(x)
        yield x


def test_a_step_feeding_a_side_input_and_several_sinks_runs_once(dask_address, tmp_path):
    """Each element goes through each step once, however many consumers, side inputs and sinks
    read its output (a model must not run twice)."""

    def build(p):
        xs = p | beam.Create(range(6)) | beam.Reshuffle() | beam.ParDo(Pass(str(tmp_path / "pass")))
        xs | "Side" >> beam.Map(lambda x, table: x, beam.pvalue.AsList(xs))
        xs | "Count" >> beam.combiners.Count.Globally() | beam.ParDo(Record(str(tmp_path / "count")))

    run_on(EpeeDaskRunner, dask_address, build)
    assert values(tmp_path / "pass") == list(range(6)) and values(tmp_path / "count") == [6]
