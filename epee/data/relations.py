"""Relation extraction: a row (entity offsets or inline markers) or a DDI 2013 XML corpus to examples.

Errors are :class:`~epee.errors.InputError` or ``ValueError`` whose message names the problem,
never a value of the row: the text may be a clinical note.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ..errors import InputError
from .example import Example, Span
from .tables import _field

log = logging.getLogger(__name__)

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
