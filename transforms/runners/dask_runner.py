"""Beam's DaskRunner with the defects that break our jobs mended (issue 34).

Beam 2.77's :class:`apache_beam.runners.dask.dask_runner.DaskRunner` translates a pipeline into
dask bags. Probe pipelines without project code (tests/transforms/test_dask_runner.py) show five
defects; each is fixed here by a small override, named after it:

1. ``tagged_outputs_share_one_bag``: every output of a multi-output ParDo went into one bag, so
   one output's elements reached another's consumer. Here a ParDo's bundle yields (tag, value)
   pairs and each output PCollection gets its own bag, filtered on its tag.
2. ``finish_bundle_outputs_dropped``: outputs were gathered before ``finish_bundle`` ran, so
   what a DoFn emits there (RunInference's last partial batch, our sorted writers) was lost.
3. ``only_last_sink_computed``: only the last bag of the graph was computed, so every other
   branch (other sinks, RunInference itself) never ran. Here every PCollection nobody consumes
   is a sink, and all of them are computed together, sharing the graph.
4. ``reshuffle_is_a_no_op``: ``Reshuffle`` did nothing, so the elements of a small ``Create``
   (a list of files) stayed in one partition on one worker. Here it widens the bag to
   ``--dask_npartitions`` partitions (default: 2 per worker thread, at least MIN_PARTITIONS) and
   redistributes the elements over them by a hash of each, in a task shuffle.
5. ``dofn_set_up_per_bundle``: each bundle created, set up and tore down its DoFn, so a model was
   loaded once per bundle. Here a worker process keeps its set-up DoFns (one per concurrent
   bundle) for the run, as the other runners do, and tears down those of older runs when a
   newer one's bundles arrive (it keeps the latest two: a cluster that serves night after night
   does not accumulate models); the latest runs' ``teardown`` is left to process exit, which
   Beam allows.

What cannot be supported is refused when the run starts, with one line saying so: streaming
(the DaskRunner is batch-only), user state and timers (``user_state_context=None``), splittable
DoFns. A scheduler that cannot be reached is a start-up error naming the address.

Grouping (GroupByKey) and redistribution use dask's task-based shuffle (not the disk-based
one, which only works on one machine), keyed by a SHA-1 of the pickled key: Python's ``hash``
of a string differs between worker processes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import pickle
import re
import threading
import typing as t
import uuid

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor, PTransformOverride
from apache_beam.runners.common import Receiver
from apache_beam.runners.dask.dask_runner import DaskOptions, DaskRunner, DaskRunnerResult
from apache_beam.runners.dask.overrides import _Create, _Flatten, dask_overrides
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms import userstate
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10
# A dask bag holds each partition's elements in memory between steps (a partition is one bundle):
# more partitions, less held at once; the night's files spread over at least this many
MIN_PARTITIONS = 16


class DaskRunnerRefused(ValueError):
    """The pipeline or its options use something the Dask runner cannot run; the message says what."""


# -- primitives our overrides put in the graph ---------------------------------------------------------
class _GroupByKeyOnDask(beam.PTransform):
    """GroupByKey as one primitive: grouped by (key, window) in a task shuffle."""

    def expand(self, pcoll):
        return pvalue.PCollection.from_(pcoll)

    def infer_output_type(self, input_type):
        key_type, value_type = beam.typehints.trivial_inference.key_value_types(input_type)
        return beam.typehints.KV[key_type, beam.typehints.Iterable[value_type]]


class _ReshuffleOnDask(beam.PTransform):
    """Reshuffle as one primitive: the elements redistributed over a task shuffle."""

    def expand(self, pcoll):
        return pvalue.PCollection.from_(pcoll)

    def infer_output_type(self, input_type):
        return input_type


def _overrides() -> list[PTransformOverride]:
    class GroupByKeyOverride(PTransformOverride):
        def matches(self, applied):
            return applied.transform.__class__ == beam.GroupByKey

        def get_replacement_transform_for_applied_ptransform(self, applied):
            return _GroupByKeyOnDask()

    class ReshuffleOverride(PTransformOverride):  # defect 4: reshuffle_is_a_no_op
        def matches(self, applied):
            return applied.transform.__class__ == beam.Reshuffle

        def get_replacement_transform_for_applied_ptransform(self, applied):
            return _ReshuffleOnDask()

    stock = [o for o in dask_overrides() if type(o).__name__ not in ("GroupByKeyOverride", "ReshuffleOverride")]
    return [GroupByKeyOverride(), ReshuffleOverride(), *stock]


# -- what runs on the workers -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ParDoSpec:
    """Everything a bundle needs, pickled once at graph construction (the DoFn as Beam pickles it)."""

    run: str  # unique per run: a worker keeps the set-up DoFns of its latest runs only
    key: str  # unique per ParDo per run: the worker's cache key for its set-up DoFns
    label: str
    fn: bytes
    args: tuple
    kwargs: dict
    window_fn: bytes
    sides: tuple  # (view class, view options) per side input, in the ParDo's order


_POOLS: dict[str, list] = collections.defaultdict(list)  # spec key -> set-up DoFns not in use (this process)
_RUNS: collections.OrderedDict = collections.OrderedDict()  # run -> its spec keys, oldest first
_POOLS_LOCK = threading.Lock()
KEEP_RUNS = 2  # a long-lived cluster serves night after night: older runs' DoFns (their models) are torn down


def _take_dofn(spec: _ParDoSpec):
    """A DoFn of ``spec`` set up in this process, not used by another bundle right now (defect 5)."""
    retired = []
    with _POOLS_LOCK:
        _RUNS.setdefault(spec.run, set()).add(spec.key)
        _RUNS.move_to_end(spec.run)
        while len(_RUNS) > KEEP_RUNS:
            _, keys = _RUNS.popitem(last=False)
            retired += [fn for key in keys for fn in _POOLS.pop(key, [])]
        pool = _POOLS[spec.key]
        fn = pool.pop() if pool else None
    for old in retired:
        try:
            old.teardown()
        except Exception:  # noqa: BLE001 - a finished run's clean-up must not fail this one
            log.warning("teardown of a finished run's %s failed", type(old).__name__, exc_info=True)
    if fn is not None:
        return fn
    fn = pickler.loads(spec.fn)
    fn.setup()
    return fn


def _give_back(spec: _ParDoSpec, fn) -> None:
    with _POOLS_LOCK:
        _POOLS[spec.key].append(fn)


def _set_up(specs: list) -> int:
    """On one worker: a set-up DoFn of every ParDo of the run, put in the pool its tasks take from."""
    for spec in specs:
        _give_back(spec, _take_dofn(spec))
    return len(specs)


class _TagReceiver(Receiver):
    def __init__(self, tag, out: list):
        self.tag, self.out = tag, out

    def receive(self, windowed_value):
        self.out.append((self.tag, windowed_value))


class _Receivers(dict):
    def __init__(self, out: list):
        super().__init__()
        self.out = out

    def __missing__(self, tag):
        receiver = self[tag] = _TagReceiver(tag, self.out)
        return receiver


def _run_bundle(items, spec: _ParDoSpec, *side_values) -> list:
    """One dask partition as one Beam bundle: (tag, WindowedValue) of every output, including
    those emitted in finish_bundle (defect 2) and to tagged outputs (defect 1)."""
    from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, _OutputHandler

    fn = _take_dofn(spec)
    out: list = []
    receivers = _Receivers(out)
    handler = _OutputHandler(
        window_fn=pickler.loads(spec.window_fn), main_receivers=receivers[None], tagged_receivers=receivers,
        per_element_output_counter=None, output_batch_converter=None, process_yields_batches=False,
        process_batch_yields_elements=False)
    sides = [SideInputMap(view_class, view_options, values)
             for (view_class, view_options), values in zip(spec.sides, side_values)]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(fn), handler, context=DoFnContext(spec.label, state=None), side_inputs=sides,
        input_args=list(spec.args), input_kwargs=dict(spec.kwargs), user_state_context=None,
        bundle_finalizer_param=beam.DoFn.BundleFinalizerParam())
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()
    _give_back(spec, fn)  # only after a bundle that finished: a failed one's DoFn is not reused
    return out


class _BundleRunner:
    """``_run_bundle`` for one ParDo, named after its step: dask names its tasks ``<step>-<token>``,
    so the dashboard and task streams say which Beam step a task ran."""

    def __init__(self, spec: _ParDoSpec):
        self.spec = spec
        self.__name__ = re.sub(r"[^A-Za-z0-9_]+", "_", spec.label).strip("_")[-80:] or "ParDo"

    def __call__(self, items, *side_values):
        return _run_bundle(items, self.spec, *side_values)

    def __dask_tokenize__(self):
        return ("epee-bundle", self.spec.key)


def _only(tag):
    def pick(pairs):
        return [wv for t_, wv in pairs if t_ == tag]
    return pick


def _stable_hash(value) -> int:
    """The same number for the same value in every worker process (``hash`` of a str is not)."""
    return int.from_bytes(hashlib.sha1(pickle.dumps(value, protocol=4)).digest()[:8], "big")


def _keyed_by_window(part) -> list:
    out = []
    for wv in part:
        key, value = wv.value
        for window in wv.windows:
            out.append((_stable_hash((key, window)), key, window, value))
    return out


def _grouped(groups) -> list:
    out = []
    for _, members in groups:
        by_key: dict = {}
        for _, key, window, value in members:  # equal hashes of different keys (a 2^-64 collision) split here
            by_key.setdefault(pickle.dumps((key, window), protocol=4), (key, window, []))[2].append(value)
        for key, window, values in by_key.values():
            out.append(WindowedValue((key, values), window.max_timestamp(), (window,)))
    return out


def _as_list(part) -> list:
    return list(part)


def _first(x):
    return x[0]


def _members(groups) -> list:
    return [wv for _, members in groups for wv in members]


def _concat(parts) -> list:
    return [x for p in parts for x in p]


def _total(counts) -> int:
    return sum(counts)


def _count(part) -> int:
    return sum(1 for _ in part)


# -- graph construction -------------------------------------------------------------------------------
class _BagVisitor(PipelineVisitor):
    """Every PCollection's bag (keyed by the PCollection, not by its producer: defect 1)."""

    def __init__(self, npartitions: int, run_id: str, workers: t.Sequence[str] = ()):
        self.npartitions = npartitions
        self.run_id = run_id
        self.workers = list(workers)  # the cluster's worker addresses when the graph was built
        self.bags: dict[pvalue.PCollection, t.Any] = {}
        self.consumed: set = set()
        self.produced: list = []
        self.specs: list[_ParDoSpec] = []

    def visit_transform(self, node: AppliedPTransform) -> None:
        import dask.bag as db

        transform = node.transform
        inputs = [i for i in node.inputs if not isinstance(i, pvalue.PBegin)]
        self.consumed.update(inputs)
        self.consumed.update(si.pvalue for si in node.side_inputs)
        outputs = {tag: pc for tag, pc in node.outputs.items() if isinstance(pc, pvalue.PCollection)}
        self.produced.extend(outputs.values())
        if isinstance(transform, _Create):
            items = list(transform.values)
            n = max(1, min(len(items), self.npartitions))
            bag = db.from_sequence([GlobalWindows.windowed_value(v) for v in items], npartitions=n)
            self._set(outputs, bag)
        elif isinstance(transform, _Flatten):
            bags = [self.bags[i] for i in inputs]
            self._set(outputs, db.concat(bags) if bags else db.from_sequence([], npartitions=1))
        elif isinstance(transform, _GroupByKeyOnDask):
            keyed = self._widened(self.bags[inputs[0]]).map_partitions(_keyed_by_window)
            groups = keyed.groupby(_first, shuffle="tasks")
            self._set(outputs, groups.map_partitions(_grouped))
        elif isinstance(transform, _ReshuffleOnDask):
            n = self.npartitions
            spread = self._widened(self.bags[inputs[0]]).groupby(lambda wv: _stable_hash(wv.value) % n, shuffle="tasks")
            self._set(outputs, self._placed(spread.map_partitions(_members)))
        elif isinstance(transform, beam.ParDo):
            self._pardo(node, inputs, outputs)
        elif not outputs:
            return
        else:
            raise DaskRunnerRefused(f"DaskRunner: transform {node.full_label!r} ({type(transform).__name__}) has no "
                                    "translation to dask")

    def _widened(self, bag):
        """At least ``npartitions`` partitions before a shuffle: dask's task shuffle keeps its input's
        partition count, so the one partition of a small Create would stay one task on one worker."""
        return bag.repartition(self.npartitions) if bag.npartitions < self.npartitions else bag

    def _placed(self, bag):
        """The shuffle's partitions dealt round-robin over the workers. A shuffle's output tasks are
        tiny, so dask ran them, and then every step after them, wherever their inputs sat: on a
        small job that was often one worker. Each partition prefers one worker
        (``allow_other_workers``: a dead worker's partitions still run elsewhere)."""
        import dask
        import dask.bag as db

        if len(self.workers) < 2:
            return bag
        placed = []
        for i, part in enumerate(bag.to_delayed(optimize_graph=False)):
            with dask.annotate(workers=[self.workers[i % len(self.workers)]], allow_other_workers=True):
                placed.append(dask.delayed(_as_list, pure=True)(part))
        return db.from_delayed(placed)

    def _set(self, outputs: dict, bag) -> None:
        for pc in outputs.values():
            self.bags[pc] = bag

    def _pardo(self, node: AppliedPTransform, inputs: list, outputs: dict) -> None:
        transform = node.transform
        main = inputs[0]
        args, kwargs = transform.raw_side_inputs
        side_inputs = list(node.side_inputs)
        sides, side_items = [], []
        for si in side_inputs:
            sides.append((type(si), si._view_options()))
            # not optimised on its own: a fused copy of the steps before it would run them a second time
            side_items.append(self.bags[si.pvalue].reduction(list, _concat).to_delayed(optimize_graph=False))
        window_fn = main.windowing.windowfn if hasattr(main, "windowing") else GlobalWindows()
        spec = _ParDoSpec(
            run=self.run_id, key=f"{self.run_id}/{node.full_label}", label=node.full_label, fn=pickler.dumps(transform.fn),
            args=tuple(a for a in args if not isinstance(a, pvalue.AsSideInput)),
            kwargs={k: v for k, v in kwargs.items() if not isinstance(v, pvalue.AsSideInput)},
            window_fn=pickler.dumps(window_fn), sides=tuple(sides))
        self.specs.append(spec)
        tagged = self.bags[main].map_partitions(_BundleRunner(spec), *side_items)
        for pc in outputs.values():  # the main output's tag is None, as its receiver's
            self.bags[pc] = tagged.map_partitions(_only(pc.tag))

    def sinks(self) -> list:
        """The bags of every PCollection no transform consumes (defect 3: all of them, not the last)."""
        return [self.bags[pc] for pc in self.produced if pc not in self.consumed and pc in self.bags]


# -- the runner -------------------------------------------------------------------------------------
def refuse_unsupported(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Raise :class:`DaskRunnerRefused` for what the Dask runner cannot run, before anything starts."""
    if options.view_as(StandardOptions).streaming:
        raise DaskRunnerRefused("DaskRunner is batch-only: --streaming cannot run on it (use the DirectRunner, "
                                "Dataflow or Flink for streaming)")

    class Check(PipelineVisitor):
        def visit_transform(self, node):
            transform = node.transform
            if isinstance(transform, beam.ParDo):
                fn = transform.fn
                if userstate.is_stateful_dofn(fn):
                    raise DaskRunnerRefused(f"DaskRunner: {node.full_label!r} uses user state or timers, which the "
                                            "Dask runner does not support")
                from apache_beam.runners.common import DoFnSignature

                if DoFnSignature(fn).is_splittable_dofn():
                    raise DaskRunnerRefused(f"DaskRunner: {node.full_label!r} is a splittable DoFn, which the Dask "
                                            "runner does not support")

    pipeline.visit(Check())


def connect(options: PipelineOptions):
    """A dask.distributed Client for the options (``--dask_client_address``, else a local cluster);
    an unreachable scheduler is one clear error."""
    import dask.distributed as ddist

    kwargs = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
    DaskOptions._extract_bag_kwargs(kwargs)
    address = kwargs.get("address")
    if address and "timeout" not in kwargs:
        kwargs["timeout"] = CONNECT_TIMEOUT_S
    try:
        return ddist.Client(**kwargs)
    except (OSError, TimeoutError) as exc:
        where = address or kwargs.get("scheduler_file") or "a local cluster"
        raise DaskRunnerRefused(f"DaskRunner: no Dask scheduler reachable at {where} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None


def _threads(client) -> int:
    try:
        workers = client.scheduler_info().get("workers", {})
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
    except Exception:  # noqa: BLE001 - a guess is enough for a default partition count
        return 1


def _worker_addresses(client) -> list[str]:
    try:
        return sorted(client.scheduler_info().get("workers", {}))
    except Exception:  # noqa: BLE001 - without them partitions go where dask puts them
        return []


class _Result(DaskRunnerResult):
    """Beam's result, closing the run's client once the run is over (left open, it outlived the
    job and logged connection errors when the cluster went away)."""

    def wait_until_finish(self, duration=None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            if self._state in (PipelineState.DONE, PipelineState.FAILED):
                self.client.close()


class EpeeDaskRunner(DaskRunner):
    """Beam's DaskRunner with defects 1-5 (module docstring) mended; same options."""

    def run_pipeline(self, pipeline, options):
        refuse_unsupported(pipeline, options)
        client = connect(options)
        bag_kwargs = DaskOptions._extract_bag_kwargs(
            options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True))
        npartitions = bag_kwargs.get("npartitions") or max(MIN_PARTITIONS, 2 * _threads(client))
        pipeline.replace_all(_overrides())
        visitor = _BagVisitor(npartitions, uuid.uuid4().hex, _worker_addresses(client))
        pipeline.visit(visitor)
        sinks = visitor.sinks()
        log.info("DaskRunner: %d sink(s) over %d partitions on %s (pid %d)", len(sinks), npartitions,
                 client.scheduler.address if client.scheduler else "?", os.getpid())
        # one collection over every sink: computed as separate collections, dask optimised each
        # graph on its own and ran the steps they share once per sink (a model ran twice)
        import dask

        # every worker sets the run's DoFns up (imports, the model) before the first task: a cold worker
        # spent its first task on that for seconds while the warm one stole its queue (skewed runs)
        try:
            client.run(_set_up, visitor.specs)
        except Exception:  # noqa: BLE001 - the tasks set up what they need and report a real failure
            log.warning("DaskRunner: setting the DoFns up on the workers ahead of the run failed; each task sets up its own", exc_info=True)
        total = dask.delayed(_total, pure=False)([bag.reduction(_count, sum).to_delayed(optimize_graph=False)
                                                  for bag in sinks])
        return _Result(client, [client.compute(total)])
