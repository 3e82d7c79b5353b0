"""Labelled data for training, calibration and evaluation: readers for the documented formats.

Formats (see the README's "Data formats" section for examples):

* tables: JSONL, CSV or Parquet, local or ``s3://`` / ``gs://``, one example per row;
* relation extraction: a text with its two entities either as character offsets
  (``e1_start, e1_end, e2_start, e2_end``, end exclusive) or as inline markers in the text
  (``<< e1 >> ... [[ e2 ]]`` as ChemProt, ``[E1] e1 [/E1] ... [E2] e2 [/E2]``, or
  ``<e1>e1</e1> ... <e2>e2</e2>``); or a directory of DDI 2013 XML files;
* event extraction: the PHEE JSONL layout (``context`` + ``annotations`` with character offsets
  of trigger and arguments), or rows with ``text`` and ``spans: [{"type", "start", "end"}]``;
* images: a NumPy ``.npz`` (``images``/``labels`` or ``<split>_images``/``<split>_labels``), or a
  table with an image ``path`` column (DICOM, PNG or ``.npy``, relative to the table) and a label.

Error messages name rows and fields, never the text in them: the text may be a clinical note.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

Span = tuple[int, int]  # character offsets [start, end)


@dataclass(frozen=True)
class Example:
    """One labelled (or unlabelled) input, before tokenisation or pixel preprocessing."""

    id: str
    text: str | None = None
    label: str | None = None  # class name (sequence, relation, image tasks)
    entities: tuple[Span, Span] | None = None  # relation task: entity 1 and entity 2
    spans: tuple[tuple[str, int, int], ...] | None = None  # token task: (type, start, end)
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    group: str | None = None  # document the example comes from, so splits never share a document


def open_uri(uri: str, mode: str = "rb"):
    """Open a local path or an ``s3://`` / ``gs://`` URI (smart-open)."""
    if "://" in uri:
        from smart_open import open as smart_open

        return smart_open(uri, mode)
    return open(uri, mode)


def _suffix(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for ext in (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".npz"):
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def read_records(uri: str) -> list[dict[str, Any]]:
    """Rows of a JSONL, CSV or Parquet file as dicts."""
    ext = _suffix(uri)
    if ext in (".jsonl", ".ndjson", ".json"):
        rows = []
        with open_uri(uri, "rb") as fh:
            for n, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    rows.append(json.loads(raw))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{uri}: line {n} is not valid JSON ({type(exc).__name__})") from None
        return rows
    if ext == ".csv":
        with open_uri(uri, "rb") as fh:
            text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
            return list(csv.DictReader(text))
    if ext == ".parquet":
        import pyarrow.parquet as pq

        with open_uri(uri, "rb") as fh:
            return pq.read_table(fh).to_pylist()
    raise ValueError(f"{uri}: unsupported file type {ext!r}; use .jsonl, .csv or .parquet")


def _field(row: dict, name: str, where: str) -> Any:
    if name not in row or row[name] is None or row[name] == "":
        raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
    return row[name]


# -- relation extraction ---------------------------------------------------------------------------
_MARKER_STYLES = (
    ("<<", ">>", "[[", "]]"),  # ChemProt: << chemical >> ... [[ protein ]]
    ("[E1]", "[/E1]", "[E2]", "[/E2]"),
    ("<e1>", "</e1>", "<e2>", "</e2>"),
)


def strip_entity_markers(marked: str) -> tuple[str, tuple[Span, Span]]:
    """Remove inline entity markers; return the clean text and both entity spans in it.

    The whitespace that the marker style puts inside the markers (``<< x >>``) is not part of
    the entity.
    """
    for o1, c1, o2, c2 in _MARKER_STYLES:
        if all(m in marked for m in (o1, c1, o2, c2)):
            break
    else:
        raise ValueError("no entity markers found (expected << >> and [[ ]], [E1] [/E1] [E2] [/E2], or <e1> <e2>)")
    pattern = re.compile("|".join(re.escape(m) for m in (o1, c1, o2, c2)))
    clean, pos, opens, spans = [], 0, {}, {}
    length = 0
    for m in pattern.finditer(marked):
        chunk = marked[pos : m.start()]
        clean.append(chunk)
        length += len(chunk)
        tok = m.group(0)
        if tok in (o1, o2):
            opens[tok] = length
        else:
            start_tok = o1 if tok == c1 else o2
            if start_tok not in opens:
                raise ValueError(f"closing marker {tok!r} before its opening marker")
            spans[start_tok] = (opens[start_tok], length)
        pos = m.end()
    clean.append(marked[pos:])
    text = "".join(clean)
    if o1 not in spans or o2 not in spans:
        raise ValueError("an entity marker pair is incomplete")

    def tighten(span: Span) -> Span:
        s, e = span
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        return (s, e)

    # collapse the double spaces left where markers stood ("a << b >> c" -> "a  b  c") only if
    # harmless: offsets are computed on the text as returned, so leave the text as it is.
    return text, (tighten(spans[o1]), tighten(spans[o2]))


_MAX_OFFSET_DIGITS = 18  # an offset past 10**18 characters is no offset; int() of 5000 digits would raise


def _offset(value: Any, text_offsets: bool) -> int:
    """An entity offset: a whole number (not a bool, float, NaN or infinity); from a table whose
    cells are all text (CSV) also a string of decimal digits. Raises InputError without the value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if text_offsets and isinstance(value, str):
        digits = value.strip()
        if digits.isascii() and digits.isdigit() and len(digits) <= _MAX_OFFSET_DIGITS:
            return int(digits)
    raise InputError("bad_entities", f"entity offsets must be whole numbers (one is a {type(value).__name__}"
                                     + (" that is not a plain decimal number" if isinstance(value, str) else "") + ")")


def relation_example(row: dict, where: str, text_field: str, label_field: str, ex_id: str,
                     text_offsets: bool = True) -> Example:
    """One relation candidate from a row: offsets ``e1_start, e1_end, e2_start, e2_end`` (whole
    numbers; digit strings too when ``text_offsets``, as CSV cells are), or inline markers. Errors
    are :class:`~epee.errors.InputError` (``bad_entities``) whose message names the problem,
    never a value of the row; ``where`` (may be empty) prefixes it."""
    prefix = f"{where}: " if where else ""
    text = str(_field(row, text_field, where))
    keys = ("e1_start", "e1_end", "e2_start", "e2_end")
    if all(k in row and row[k] not in (None, "") for k in keys):
        try:
            s1, e1, s2, e2 = (_offset(row[k], text_offsets) for k in keys)
        except InputError as exc:
            raise InputError("bad_entities", prefix + exc.message) from None
        entities = ((s1, e1), (s2, e2))
    else:
        try:
            text, entities = strip_entity_markers(text)
        except ValueError as exc:
            raise InputError("bad_entities", prefix + str(exc)) from None  # our own words (strip_entity_markers)
    for i, (s, e) in enumerate(entities, start=1):
        if not (0 <= s < e <= len(text)):
            raise InputError("bad_entities", f"{prefix}entity {i}'s span is empty, reversed or outside the text")
    label = None if label_field not in row or row[label_field] in (None, "") else str(row[label_field])
    return Example(id=ex_id, text=text, label=label, entities=entities, group=row.get("document_id"))


def load_ddi(directory: str, negative_label: str = "negative") -> list[Example]:
    """Every candidate pair of a DDI 2013 corpus directory (XML, recursively) as a relation example.

    Labels: the pair ``type`` (effect, mechanism, advise, int) when ``ddi="true"``, else
    ``negative_label``. Offsets in the XML are inclusive (``45-52``); discontinuous entities
    (``a-b;c-d``) use their first part. Pairs marked true without a type are skipped and counted.
    """
    import xml.etree.ElementTree as ET

    files = sorted(Path(directory).rglob("*.xml"))
    if not files:
        raise ValueError(f"{directory}: no DDI XML files found")
    out, untyped = [], 0
    for path in files:
        root = ET.parse(path).getroot()
        doc = root.get("id", path.stem)
        for sent in root.iter("sentence"):
            text = sent.get("text", "")
            ents = {}
            for ent in sent.iter("entity"):
                first = ent.get("charOffset", "").split(";")[0]
                a, b = first.split("-")
                ents[ent.get("id")] = (int(a), int(b) + 1)
            for pair in sent.iter("pair"):
                if pair.get("ddi") == "true":
                    label = pair.get("type")
                    if not label:
                        untyped += 1
                        continue
                else:
                    label = negative_label
                out.append(
                    Example(
                        id=pair.get("id"), text=text, label=label,
                        entities=(ents[pair.get("e1")], ents[pair.get("e2")]), group=doc,
                    )
                )
    if untyped:
        log.warning("DDI: skipped %d pair(s) marked as interactions without a type", untyped)
    return out


# -- event extraction ------------------------------------------------------------------------------
PHEE_MAIN_ARGUMENTS = ("Subject", "Treatment", "Effect")


def phee_example(row: dict, where: str) -> Example:
    """PHEE layout: one ``Trigger.<event type>`` span per event plus its main arguments.

    Nested sub-arguments (Drug inside Treatment, Age inside Subject, ...) overlap their parent
    span and cannot share flat BIO tags with it, so only Subject, Treatment and Effect are kept.
    """
    text = str(_field(row, "context", where))
    spans = []
    for ann in row.get("annotations", []):
        for ev in ann.get("events", []):
            etype = ev.get("event_type", "event")
            for role, value in ev.items():
                if not isinstance(value, dict) or "start" not in value:
                    continue
                if role != "Trigger" and role not in PHEE_MAIN_ARGUMENTS:
                    continue
                name = f"Trigger.{etype}" if role == "Trigger" else role
                for texts, starts in zip(value.get("text", []), value.get("start", [])):
                    for t, s in zip(texts, starts):
                        spans.append((name, int(s), int(s) + len(t)))
    return Example(id=str(row.get("id", where)), text=text, spans=tuple(sorted(set(spans), key=lambda x: (x[1], x[2], x[0]))))


def token_example(row: dict, where: str, text_field: str, ex_id: str) -> Example:
    if "context" in row and "annotations" in row:
        return phee_example(row, where)
    text = str(_field(row, text_field, where))
    raw = row.get("spans") or []
    if isinstance(raw, str):
        raw = json.loads(raw)
    spans = []
    for sp in raw:
        s, e, t = int(sp["start"]), int(sp["end"]), str(sp["type"])
        if not (0 <= s < e <= len(text)):
            raise ValueError(f"{where}: span ({s}, {e}) outside a text of {len(text)} characters")
        spans.append((t, s, e))
    return Example(id=ex_id, text=text, spans=tuple(spans))


# -- images ----------------------------------------------------------------------------------------
def load_npz_images(uri: str, split: str | None = None) -> list[Example]:
    with open_uri(uri, "rb") as fh:
        data = np.load(io.BytesIO(fh.read()), allow_pickle=False)
        keys = set(data.files)
        prefix = f"{split}_" if split and f"{split}_images" in keys else ""
        if f"{prefix}images" not in keys or f"{prefix}labels" not in keys:
            raise ValueError(f"{uri}: expected arrays '{prefix}images' and '{prefix}labels', found {sorted(keys)}")
        images, labels = data[f"{prefix}images"], data[f"{prefix}labels"].reshape(len(data[f"{prefix}images"]), -1)
    return [
        Example(id=f"{split or 'npz'}-{i:06d}", image=images[i], label=str(int(labels[i][0])))
        for i in range(len(images))
    ]


def load_image_table(uri: str, path_field: str, label_field: str) -> list[Example]:
    from .images import load_image_file

    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    out = []
    for n, row in enumerate(read_records(uri), start=1):
        where = f"{uri}: row {n}"
        rel = str(_field(row, path_field, where))
        full = rel if ("://" in rel or os.path.isabs(rel)) else f"{base}/{rel}"
        out.append(Example(id=rel, image=load_image_file(full), label=str(_field(row, label_field, where))))
    return out


# -- entry point -----------------------------------------------------------------------------------
def load_examples(
    uri: str,
    task: str,
    *,
    text_field: str = "text",
    label_field: str = "label",
    id_field: str | None = None,
    image_field: str = "path",
    split: str | None = None,
    label_map: dict[str, str] | None = None,
    negative_label: str = "negative",
) -> list[Example]:
    """Read ``uri`` as examples of ``task`` ("sequence", "relation", "token" or "image")."""
    if task == "relation" and os.path.isdir(uri):
        examples = load_ddi(uri, negative_label=negative_label)
    elif task == "image" and _suffix(uri) == ".npz":
        examples = load_npz_images(uri, split)
    elif task == "image":
        examples = load_image_table(uri, image_field, label_field)
    else:
        examples = []
        for n, row in enumerate(read_records(uri), start=1):
            where = f"{uri}: row {n}"
            ex_id = str(row[id_field]) if id_field and row.get(id_field) not in (None, "") else f"row-{n}"
            if task == "sequence":
                label = row.get(label_field)
                examples.append(
                    Example(id=ex_id, text=str(_field(row, text_field, where)),
                            label=None if label in (None, "") else str(label))
                )
            elif task == "relation":
                examples.append(relation_example(row, where, text_field, label_field, ex_id))
            elif task == "token":
                examples.append(token_example(row, where, text_field, ex_id))
            else:
                raise ValueError(f"task ({task!r}) must be one of sequence, relation, token, image")
    if label_map:
        examples = [
            ex if ex.label is None else Example(**{**ex.__dict__, "label": label_map.get(ex.label, ex.label)})
            for ex in examples
        ]
    return examples


def read_label_map(uri: str) -> dict[str, str]:
    """A two-column table (id, name), e.g. medical_abstracts/labels.csv."""
    rows = read_records(uri)
    if not rows:
        return {}
    id_key, name_key = list(rows[0])[:2]
    return {str(r[id_key]): str(r[name_key]) for r in rows}


def split_examples(examples: Sequence[Example], dev_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic train/dev split by document (``group``, else id): the same inputs, fraction
    and seed always give the same split, and no document is in both parts."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction ({dev_fraction}) must lie in (0, 1)")
    train, dev = [], []
    for ex in examples:
        key = f"{seed}:{ex.group or ex.id}".encode()
        bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        (dev if bucket < dev_fraction else train).append(ex)
    return train, dev


def subsample(
    examples: Sequence[Example], max_examples: int | None, seed: int,
    negative_label: str | None = None, max_negative_ratio: float | None = None,
) -> list[Example]:
    """Optionally cap negatives at ``max_negative_ratio`` x positives, then cap the total; the
    order of what is kept is the input order."""
    rng = random.Random(seed)
    keep = list(range(len(examples)))
    if negative_label is not None and max_negative_ratio is not None:
        neg = [i for i in keep if examples[i].label == negative_label]
        pos = [i for i in keep if examples[i].label != negative_label]
        cap = int(len(pos) * max_negative_ratio)
        if len(neg) > cap:
            neg = rng.sample(neg, cap)
        keep = sorted(pos + neg)
    if max_examples is not None and len(keep) > max_examples:
        keep = sorted(rng.sample(keep, max_examples))
    return [examples[i] for i in keep]


def iter_labels(examples: Sequence[Example]) -> Iterator[str]:
    for ex in examples:
        if ex.label is not None:
            yield ex.label
