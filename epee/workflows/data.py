"""Labelled data for the workflows: which fields to read, which dev set, encoding and scoring.

The dev-set rule lives here once (:func:`dev_source`): the data given explicitly, else the dev set
the model directory recorded at training, else a ``dev_fraction`` split of the recorded training
data; ``train``, ``calibrate``, ``evaluate`` and ``sparsify`` all ask it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..data import Example

log = logging.getLogger("epee")

DATA_TASKS = ("sequence", "relation", "token", "image")
PARTS = ("all", "train", "dev")
# the overlap of the windows a long note is read in, as the pipelines' --window_overlap default
WINDOW_OVERLAP = 0.25


def model_task(data_task: str) -> str:
    """The model's (and the metrics') task for a data task: images are classified as sequences."""
    return "sequence" if data_task == "image" else data_task


@dataclass(frozen=True)
class DataFields:
    """Where the values are in a data file; ``None`` takes the model directory's recorded value,
    else the default named beside each field."""

    text_field: str | None = None  # column holding the text (text)
    label_field: str | None = None  # column holding the label (label)
    id_field: str | None = None  # column holding a record id (row number)
    image_field: str | None = None  # image tables: column with the file path (path)
    label_names: str | None = None  # two-column table (id,name) mapping raw label values to names
    npz_split: str | None = None  # npz files: array prefix, e.g. "train"
    dev_fraction: float | None = None  # carve a dev split out of the data, by document
    split_seed: int | None = None  # seed of that split (13)

    def __post_init__(self) -> None:
        if self.dev_fraction is not None and self.dev_fraction and not 0.0 < self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction ({self.dev_fraction}) must lie in (0, 1)")

    def resolve(self, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every field's value: given here, else ``recorded`` (a model directory's), else the default."""
        recorded = recorded or {}
        out = {}
        for key, default in (("text_field", "text"), ("label_field", "label"), ("id_field", None),
                             ("image_field", "path"), ("label_names", None), ("npz_split", None),
                             ("dev_fraction", None), ("split_seed", 13)):
            value = getattr(self, key)
            out[key] = value if value is not None else recorded.get(key, default)
        return out


@dataclass(frozen=True)
class DataSpec:
    """The labelled data ``calibrate`` and ``evaluate`` score: ``data`` (default: the dev set the
    model directory recorded), its ``part`` with a ``dev_fraction``, at most ``max_examples``."""

    data: str | None = None
    part: str = "all"  # "all", or with fields.dev_fraction the "train" or "dev" part
    max_examples: int | None = None
    fields: DataFields = DataFields()

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"part ({self.part!r}) must be one of {PARTS}")
        if self.max_examples is not None and self.max_examples < 0:
            raise ValueError(f"max_examples ({self.max_examples}) must be >= 0")


@dataclass(frozen=True)
class DataSource:
    """Where a dev set comes from: a file and the part of it to keep."""

    uri: str
    npz_split: str | None
    part: str  # "all", "train" or "dev" (of a dev_fraction split)


def dev_source(fields: dict[str, Any], recorded: dict[str, Any] | None = None, data: str | None = None,
               npz_split: str | None = None, part: str = "all", train: str | None = None,
               missing: str = "give --data FILE (the model directory records no dev set)") -> DataSource:
    """The one dev-set rule: ``data`` if given (its ``part``; ``npz_split`` else the fields'), else
    the dev set ``recorded`` at training, else the dev part of a ``dev_fraction`` split of
    ``train`` (else of the recorded training data). ``missing``: the message when there is none."""
    recorded = recorded or {}
    if data:
        return DataSource(data, npz_split or fields.get("npz_split"), part)
    if recorded.get("dev"):
        return DataSource(recorded["dev"], recorded.get("dev_npz_split") or fields.get("npz_split"), "all")
    train = train or recorded.get("train")
    if train and fields.get("dev_fraction"):
        return DataSource(train, fields.get("npz_split"), "dev")
    raise ValueError(missing)


def load(uri: str, task: str, fields: dict[str, Any], negative_label: str | None, part: str = "all") -> list[Example]:
    """The labelled examples of ``uri``; with ``part`` "train" or "dev", that part of the
    ``dev_fraction`` split."""
    from ..data import load_examples, read_label_map, split_examples

    label_map = read_label_map(fields["label_names"]) if fields.get("label_names") else None
    examples = load_examples(
        uri, task, text_field=fields["text_field"], label_field=fields["label_field"], id_field=fields["id_field"],
        image_field=fields["image_field"], split=fields.get("npz_split"), label_map=label_map,
        negative_label=negative_label or "negative",
    )
    if task in ("sequence", "image"):
        unlabelled = [ex.id for ex in examples if ex.label is None]
        if unlabelled:
            raise ValueError(f"{uri}: {len(unlabelled)} record(s) have no {fields['label_field']!r} value "
                             f"(first: id {unlabelled[0]}); labelled data needs one per record")
    if part != "all":
        if not fields.get("dev_fraction"):
            raise ValueError(f"part {part!r} needs a dev_fraction (--dev-fraction)")
        train, dev = split_examples(examples, fields["dev_fraction"], fields["split_seed"])
        examples = train if part == "train" else dev
    return examples


def load_source(source: DataSource, task: str, fields: dict[str, Any], negative_label: str | None) -> list[Example]:
    return load(source.uri, task, {**fields, "npz_split": source.npz_split}, negative_label, source.part)


def encode_all(preprocessor, examples: Sequence[Example], teacher=None) -> tuple[list, list, list, int]:
    """Encode examples, truncated: (samples, targets, teacher samples, skipped). Ones that cannot
    be encoded are counted and skipped (ids logged, not text). With a ``teacher`` preprocessor
    (`sparsify --teacher-distill`) each example is also encoded for the teacher, kept only if both can."""
    samples, targets, teacher_samples, skipped = [], [], [], 0
    for ex in examples:
        try:
            enc = preprocessor.encode(ex)
            teacher_enc = teacher.encode(ex) if teacher is not None else None
        except ValueError as exc:
            skipped += 1
            log.warning("skipping example %s: %s", ex.id, exc)
            continue
        samples.append(enc.sample)
        targets.append(enc.target)
        if teacher_enc is not None:
            teacher_samples.append(teacher_enc.sample)
    return samples, targets, teacher_samples, skipped


@dataclass(frozen=True)
class EncodedSet:
    """Examples as the engine reads them: ``samples`` (windows), whose example ``owners`` is."""

    samples: list  # EncodedSample per window
    targets: list  # per window: its example's target
    owners: list[int]  # per window: index of its example among the encoded ones
    examples: int  # examples encoded
    skipped: int  # examples that could not be encoded

    @property
    def gold(self) -> list:
        """One target per example (its first window's), as plain values."""
        first = {}
        for target, owner in zip(self.targets, self.owners):
            first.setdefault(owner, target)
        return [_plain(first[i]) for i in range(self.examples)]


def _plain(target: Any) -> Any:
    return target.tolist() if hasattr(target, "tolist") else target


def encode_windows(preprocessor, examples: Sequence[Example], data_task: str) -> EncodedSet:
    """Encode examples the way the pipelines do (:func:`epee.encoding.model_inputs`): a long
    note of a sequence task is read in overlapping windows; token tasks keep their gold tags by
    truncating (the windows of a long note carry none); relations and images have one input."""
    from ..encoding import model_inputs

    mode = "windows" if data_task == "sequence" else "truncate"
    samples, targets, owners, kept, skipped = [], [], [], 0, 0
    for ex in examples:
        try:
            encoded, _ = model_inputs(preprocessor, ex, mode, WINDOW_OVERLAP)
        except ValueError as exc:
            skipped += 1
            log.warning("skipping example %s: %s", ex.id, exc)
            continue
        for enc in encoded:
            samples.append(enc.sample)
            targets.append(enc.target)
            owners.append(kept)
        kept += 1
    return EncodedSet(samples, targets, owners, kept, skipped)


def score_function(data_task: str, label_names: Sequence[str], negative_label: str | None) -> tuple[str, Callable]:
    """(metric name, fn(gold, predictions) -> float) for the task's primary metric.

    ``fn.counts(gold, predictions)`` and ``fn.from_counts(totals)`` give the same score as a sum
    over records (:class:`epee.metrics.CountedScore`), which :func:`epee.policy_search.choose_robust`
    resamples by weighting rows instead of rescoring every resample.
    """
    from ..metrics import CountedScore, primary_metric

    metric_task = model_task(data_task)
    metric = primary_metric(metric_task, negative_label)

    def fn(gold: list, pred: list) -> float:
        return all_scores(metric_task, gold, pred, label_names, negative_label)[metric]

    try:
        counted = CountedScore(metric_task, metric, label_names, negative_label)
    except ValueError:  # a negative label the head does not have: task_scores warns; no counted form
        return metric, fn

    def counts(gold: list, pred: list):  # per-record statistics of the same score (a bootstrap sums rows)
        if metric_task == "token":
            gold, pred = _scored_positions(gold, pred)
        return counted.counts(gold, pred)

    fn.counts, fn.from_counts = counts, counted.from_counts
    return metric, fn


def _scored_positions(gold: list, pred: list) -> tuple[list, list]:
    """Token gold and predictions with positions without gold (special tokens) marked -1 in both."""
    from ..encoding import IGNORE

    pred = [[-1 if g == IGNORE else p for g, p in zip(gs, ps)] for gs, ps in zip(gold, pred)]
    return [[-1 if g == IGNORE else g for g in gs] for gs in gold], pred


def all_scores(metric_task: str, gold: list, pred: list, label_names, negative_label) -> dict[str, float]:
    """Every metric of the task; token positions without gold (special tokens) are not scored."""
    from ..metrics import task_scores

    if metric_task == "token":
        gold, pred = _scored_positions(gold, pred)
    return task_scores(metric_task, gold, pred, label_names, negative_label)


def dev_set(model_dir: str, spec: DataSpec = DataSpec(), allow_pickle_weights: bool = False):
    """(bundle, examples, source): the model directory loaded and the labelled data to score it on,
    chosen by :func:`dev_source`, subsampled (seed 0) to ``spec.max_examples``."""
    from ..data import subsample
    from ..modeldir import load_model_dir

    bundle = load_model_dir(model_dir, allow_pickle=allow_pickle_weights)
    training = bundle.sections.get("training", {}).get("data", {})
    fields = spec.fields.resolve(training.get("fields"))
    source = dev_source(fields, training, data=spec.data, part=spec.part)
    examples = load_source(source, bundle.data_task, fields, bundle.model.config.negative_label)
    if spec.max_examples:
        examples = subsample(examples, spec.max_examples, 0)
    return bundle, examples, source


# -- unlabelled records of the target archive (`epee calibrate --unlabeled`) -----------------------
UNLABELED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt")
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".npy")  # image tasks: one record per file, as the DICOM pipeline reads


def expand_pattern(pattern: str, task: str | None = None, s3_client_kwargs: dict[str, Any] | None = None) -> list[str]:
    """The files a pattern names, sorted: a file, a glob (``notes/*.jsonl``) or a directory (its
    files of the readable types: tables and ``.txt``, and for image tasks image files);
    local, ``s3://`` or ``gs://``."""
    import glob
    import os

    if "://" in pattern:
        files = _remote_files(pattern, s3_client_kwargs)
    elif os.path.isdir(pattern):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names)
    else:
        files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    readable = UNLABELED_SUFFIXES + (IMAGE_SUFFIXES if task == "image" else ())
    files = [f for f in files if f.lower().endswith(readable)] if len(files) > 1 else files
    if not files:
        raise ValueError(f"--unlabeled {pattern!r} matches no file ({', '.join(readable)})")
    return files


def _remote_files(pattern: str, s3_client_kwargs: dict[str, Any] | None = None) -> list[str]:
    """The objects of an ``s3://`` or ``gs://`` pattern: a glob over keys, or every key under a
    prefix ending in ``/``, or the one object named (boto3 with ``s3_client_kwargs``,
    google-cloud-storage)."""
    import fnmatch
    import glob

    scheme, rest = pattern.split("://", 1)
    bucket, _, key = rest.partition("/")
    if not glob.has_magic(key) and not key.endswith("/") and key:
        return [pattern]
    prefix = key[: min((key.index(c) for c in "*?[" if c in key), default=len(key))]
    if scheme == "s3":
        import boto3

        client = boto3.client("s3", **(s3_client_kwargs or {}))
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    elif scheme == "gs":
        from google.cloud import storage

        keys = [blob.name for blob in storage.Client().list_blobs(bucket, prefix=prefix)]
    else:
        raise ValueError(f"--unlabeled {pattern!r}: only local paths, s3:// and gs:// are read")
    wanted = [k for k in keys if fnmatch.fnmatchcase(k, key)] if glob.has_magic(key) else keys
    return sorted(f"{scheme}://{bucket}/{k}" for k in wanted if not k.endswith("/"))


def _read_bytes(uri: str, s3_client_kwargs: dict[str, Any] | None = None) -> bytes:
    from ..data import open_uri

    with open_uri(uri, "rb", s3_client_kwargs) as fh:
        return fh.read()


@dataclass(frozen=True)
class UnlabeledRead:
    """What :func:`read_unlabeled` read: the records, each file's uri, SHA-256 and record count,
    and the image files that could not be read (counted, never shown: they may carry PHI)."""

    examples: list[Example]
    files: list[dict[str, Any]]
    unreadable: int = 0


def read_unlabeled(pattern: str, task: str, fields: dict[str, Any],
                   s3_client_kwargs: dict[str, Any] | None = None) -> UnlabeledRead:
    """Every record of the files ``pattern`` names, labels optional, each file read once (its
    SHA-256 is of the bytes parsed): tables by :func:`epee.data.load_examples`, a ``.txt`` file
    one record per non-empty line, and for image tasks an image file (DICOM, PNG, .npy) one
    record whose id is its uri. Without an id field, table ids are row numbers, prefixed by the
    file's name when several files match."""
    import hashlib

    from ..data import load_examples
    from ..images import load_image_file

    files = expand_pattern(pattern, task, s3_client_kwargs)
    examples: list[Example] = []
    record, unreadable = [], 0
    for uri in files:
        data = _read_bytes(uri, s3_client_kwargs)
        lower = uri.lower()
        if task == "image" and (lower.endswith(IMAGE_SUFFIXES) or not lower.endswith(UNLABELED_SUFFIXES)):
            try:
                rows = [Example(id=uri, image=load_image_file(data, uri.rsplit("/", 1)[-1]))]
            except Exception:  # noqa: BLE001 - the pipeline would dead-letter it; calibration counts it
                rows, unreadable = [], unreadable + 1
        elif lower.endswith(".txt"):
            lines = [raw.decode("utf-8").rstrip("\r") for raw in data.split(b"\n")]
            rows = [Example(id=f"row-{n}", text=line, spans=() if task == "token" else None)
                    for n, line in enumerate(lines, start=1) if line.strip()]
        else:
            rows = load_examples(uri, task, text_field=fields["text_field"], label_field=fields["label_field"],
                                 id_field=fields["id_field"], image_field=fields["image_field"],
                                 split=fields.get("npz_split"), data=data)
        if len(files) > 1 and not fields.get("id_field") and not (rows and rows[0].id == uri):
            name = uri.rsplit("/", 1)[-1]
            rows = [Example(**{**ex.__dict__, "id": f"{name}:{ex.id}"}) for ex in rows]
        examples += rows
        record.append({"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "records": len(rows)})
    return UnlabeledRead(examples, record, unreadable)


def record_key(record_id: str, seed: int) -> str:
    """The keyed hash that orders records for sampling: the same id, the same place, every run."""
    import hashlib

    return hashlib.sha256(f"{seed}:{record_id}".encode()).hexdigest()


def keyed_sample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """The ``n`` records with the smallest keyed hash of their id (all if fewer), in that order:
    deterministic, and a record's membership does not depend on the order it was read in."""
    keyed = sorted(range(len(examples)), key=lambda i: (record_key(examples[i].id, seed), i))
    return [examples[i] for i in keyed[:n]]


def _content_sha256(ex: Example) -> str:
    """SHA-256 of what the model reads of a record: its text, or its image's dtype, shape and pixels."""
    import hashlib

    import numpy as np

    if ex.image is not None:
        image = np.ascontiguousarray(ex.image)
        return hashlib.sha256(f"{image.dtype.str}{image.shape}".encode() + image.tobytes()).hexdigest()
    return hashlib.sha256((ex.text or "").encode()).hexdigest()


def sample_manifest(examples: Sequence[Example], files: list[dict[str, Any]]) -> dict[str, Any]:
    """SHA-256 manifest of a sample: over its sorted ``id<TAB>sha256(text)`` lines, and the files read."""
    import hashlib

    lines = sorted(f"{ex.id}\t{_content_sha256(ex)}\n" for ex in examples)
    return {"records": len(lines), "records_sha256": hashlib.sha256("".join(lines).encode()).hexdigest(),
            "files": files}
