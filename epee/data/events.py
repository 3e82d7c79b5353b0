"""Event extraction and token tagging: a row (PHEE layout, or ``text`` with ``spans``) to an example."""

from __future__ import annotations

import json

from .example import Example
from .tables import _field

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
