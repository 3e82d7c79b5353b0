"""transforms.note_parsing: the note parser is pure (streams and rows in, InputRecord or DeadLetter
out, in input order) and imports no Beam; ParseNoteFile is a thin DoFn around it."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from transforms.note_parsing import NoteParser
from transforms.note_splitting import bounded_lines
from transforms.records import DeadLetter, InputRecord


def _parser(**kw) -> NoteParser:
    args = dict(task="sequence", text_field="text", id_field="id", max_note_bytes=1 << 10, run_id="r1")
    args.update(kw)
    return NoteParser(**args)


def test_importing_the_parser_imports_no_beam():
    code = ("import sys, transforms.note_parsing, transforms.note_splitting; "
            "sys.exit(any(m.split('.')[0] == 'apache_beam' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_jsonl_gives_records_and_dead_letters_in_input_order():
    data = b'{"id": "a", "text": "first note"}\n\n{"id": 2, "text": 3}\nnot json\n{"text": "third"}\n'
    out = list(_parser().parse_jsonl("f.jsonl", io.BytesIO(data)))
    assert [type(o) for o in out] == [InputRecord, DeadLetter, DeadLetter, InputRecord]
    assert (out[0].record_id, out[0].source_uri, out[0].text) == ("a", "f.jsonl", "first note")
    assert (out[1].record_id, out[1].error_type, out[1].run_id) == ("2", "bad_field_type", "r1")
    assert (out[2].record_id, out[2].error_type) == ("f.jsonl#4", "malformed_json")
    assert out[3].record_id == "f.jsonl#5"


def test_csv_rows_and_a_row_of_the_wrong_width():
    data = "id;text\nn1;a note; with a semicolon\nn2;another note\n".encode()
    out = list(_parser().parse_csv("f.csv", io.BytesIO(data), None))
    assert [(type(o).__name__, o.record_id) for o in out] == [("DeadLetter", "f.csv#1"), ("InputRecord", "n2")]
    assert out[0].error_type == "malformed_csv_row"


@pytest.mark.parametrize("row, error_type", [
    ({"id": "x"}, "missing_field"), ({"id": "x", "text": None}, "empty_note"),
    ({"id": "x", "text": "a\x00b"}, "binary_content"), ({"id": "x", "text": "y" * 2000}, "note_too_large"),
    ({"id": "x", "text": "\ud83d"}, "invalid_utf8"), ({"id": 1.5, "text": "t"}, "bad_field_type"),
])
def test_a_bad_row_is_one_dead_letter_whose_message_does_not_quote_it(row, error_type):
    (out,) = _parser().field_note("f.parquet", row, 7)
    assert isinstance(out, DeadLetter) and out.error_type == error_type and out.stage == "read"
    assert "y" * 20 not in out.message and "a\x00b" not in out.message


def test_bounded_lines_skips_a_line_over_the_limit_without_holding_it():
    lines = list(bounded_lines(io.BytesIO(b"short\n" + b"x" * 100 + b"\nend"), max_line=10, chunk=8))
    assert lines == [(1, b"short"), (2, None), (3, b"end")]
