"""Readers on TestPipeline: every record becomes an InputRecord or a DeadLetter, never silence."""

import json
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.readers import DEAD, ReadDicom, ReadNotes


@pytest.fixture
def notes_dir(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(
        json.dumps({"id": "1", "text": "chest pain"}).encode() + b"\n\n"
        + b'{"id": "2", "text": "trunc\n'
        + json.dumps({"id": "3", "text": "   "}).encode() + b"\n"
        + json.dumps({"id": "4", "body": "x"}).encode() + b"\n"
        + b'{"id": "5", "text": "caf\xff"}\n'
    )
    (tmp_path / "b.csv").write_text('id,text\n6,"fever, cough"\n7,"a","extra"\n8,short\n')
    (tmp_path / "c.txt").write_text("a whole note in a text file")
    (tmp_path / "d.xml").write_text("<x/>")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "9", "text": "rash"}, {"id": "10", "text": None}]), tmp_path / "e.parquet")
    (tmp_path / "f.parquet").write_bytes(b"PAR1 not really")
    return tmp_path


def test_notes_good_and_bad(notes_dir):
    pattern = str(notes_dir / "*")
    with TestPipeline() as p:
        out = p | ReadNotes(pattern, id_field="id", run_id="t")
        assert_that(out.records | "ok" >> beam.Map(lambda r: (r.record_id, r.text)), equal_to([
            ("1", "chest pain"), ("6", "fever, cough"), ("8", "short"), (str(notes_dir / "c.txt"), "a whole note in a text file"),
            ("9", "rash"),
        ]), label="good")
        assert_that(out[DEAD] | "dead" >> beam.Map(lambda d: (d.record_id, d.error_type)), equal_to([
            (f"{notes_dir / 'a.jsonl'}#3", "malformed_json"), ("3", "empty_note"), ("4", "missing_field"),
            (f"{notes_dir / 'a.jsonl'}#6", "invalid_utf8"), (f"{notes_dir / 'b.csv'}#2", "malformed_csv_row"),
            (None, "unsupported_format"), ("10", "empty_note"), (None, "malformed_parquet"),
        ]), label="dead")


def test_dead_letter_messages_never_quote_the_note(tmp_path):
    secret = "PATIENT-JOHN-DOE-1234"
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "' + secret.encode() + b'\n' + b'{"text": "' + secret.encode() + b'\xff"}\n')
    (tmp_path / "b.csv").write_text(f'text\n"{secret}","{secret}"\n')
    with TestPipeline() as p:
        out = p | ReadNotes(str(tmp_path / "*"), run_id="t")
        msgs = out[DEAD] | beam.Map(lambda d: json.dumps(d.to_row()))
        assert_that(msgs | beam.Filter(lambda m: secret in m) | beam.combiners.Count.Globally(), equal_to([0]))


def test_relation_rows_with_markers_and_offsets(tmp_path):
    rows = [{"id": "r1", "text": "<< aspirin >> and [[ warfarin ]]"},
            {"id": "r2", "text": "aspirin and warfarin", "e1_start": 0, "e1_end": 7, "e2_start": 12, "e2_end": 20},
            {"id": "r3", "text": "no markers here"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with TestPipeline() as p:
        out = p | ReadNotes(str(tmp_path / "r.jsonl"), task="relation", id_field="id", run_id="t")
        assert_that(out.records | "ok" >> beam.Map(lambda r: (r.record_id, [r.text[s:e] for s, e in r.entities])),
                    equal_to([("r1", ["aspirin", "warfarin"]), ("r2", ["aspirin", "warfarin"])]), label="good")
        assert_that(out[DEAD] | "dead" >> beam.Map(lambda d: (d.record_id, d.error_type)), equal_to([("r3", "bad_entities")]),
                    label="dead")


def pydicom_test_files() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


def test_dicom_reader_decodes_or_explains(tmp_path):
    import shutil

    src = pydicom_test_files()
    for name in ("CT_small.dcm", "MR_small.dcm", "test-SR.dcm", "rtplan.dcm", "SC_rgb_rle_2frame.dcm"):
        shutil.copy(src / name, tmp_path / name)
    shutil.copy(src / "CT_small.dcm", tmp_path / "no_extension")
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all" * 10)
    with TestPipeline() as p:
        out = p | ReadDicom(str(tmp_path / "*"), run_id="t")
        assert_that(out.records | "ok" >> beam.Map(lambda r: (Path(r.record_id).name, r.pixels.ndim)), equal_to([
            ("CT_small.dcm", 2), ("MR_small.dcm", 2), ("no_extension", 2), ("SC_rgb_rle_2frame.dcm", 3)]), label="good")
        assert_that(out[DEAD] | "dead" >> beam.Map(lambda d: (Path(d.source_uri).name, d.stage)), equal_to([
            ("test-SR.dcm", "decode"), ("rtplan.dcm", "decode"), ("junk.dcm", "decode")]), label="dead")


def test_dicom_every_frame_policy(tmp_path):
    import shutil

    shutil.copy(pydicom_test_files() / "SC_rgb_rle_2frame.dcm", tmp_path / "multi.dcm")  # 2 RGB frames
    with TestPipeline() as p:
        out = p | ReadDicom(str(tmp_path / "*.dcm"), frame_policy="all", run_id="t")
        assert_that(out.records | beam.Map(lambda r: (r.record_id.rsplit("#", 1)[1], r.pixels.shape)),
                    equal_to([("frame=0", (100, 100, 3)), ("frame=1", (100, 100, 3))]))


def test_pipelined_dicom_outputs_keep_each_files_window_timestamp_and_inputs_row(tmp_path):
    """Outputs leave the decoding DoFn late (while later files decode, or in finish_bundle), so
    each carries the window and timestamp of its own file, on a runner, in fixed windows."""
    import shutil

    from apache_beam.io import fileio
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    from transforms.readers import INPUTS, DecodeDicomFile

    src = pydicom_test_files()
    names = [f"{i:02d}.dcm" for i in range(12)]
    for i, name in enumerate(names):
        shutil.copy(src / ("CT_small.dcm" if i % 4 else "test-SR.dcm"), tmp_path / name)  # every 4th: no image
    stamp = {name: 10.0 * i + 1 for i, name in enumerate(names)}  # one 10 s window each

    def window_start(value, w=beam.DoFn.WindowParam, t=beam.DoFn.TimestampParam):
        uri = value.source_uri if hasattr(value, "source_uri") else value.uri
        return Path(uri).name, float(w.start), float(t)

    with TestPipeline() as p:
        out = (p | fileio.MatchFiles(str(tmp_path / "*.dcm")) | fileio.ReadMatches()
               | beam.Map(lambda f: TimestampedValue(f, stamp[Path(f.metadata.path).name]))
               | beam.WindowInto(FixedWindows(10))
               | beam.ParDo(DecodeDicomFile(run_id="t", decode_timeout_s=30, max_in_flight_files=3)).with_outputs(
                   DEAD, INPUTS, main="records"))
        want = {n: (n, stamp[n] - 1, stamp[n]) for n in names}
        assert_that(out.records | "r" >> beam.Map(window_start),
                    equal_to([want[n] for i, n in enumerate(names) if i % 4]), label="records")
        assert_that(out[DEAD] | "d" >> beam.Map(window_start),
                    equal_to([want[n] for i, n in enumerate(names) if not i % 4]), label="dead")
        assert_that(out[INPUTS] | "i" >> beam.Map(lambda row: (Path(row.uri).name, row.records, row.status)),
                    equal_to([(n, 1, "processed") for n in names]), label="inputs")
        assert_that(out[INPUTS] | "iw" >> beam.Map(window_start), equal_to(list(want.values())), label="inputs_windows")


def test_pipelined_dicom_reader_returns_before_the_child_decodes_and_keeps_its_limit_and_order(tmp_path):
    import shutil

    from apache_beam.io import fileio
    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    from transforms.readers import DecodeDicomFile

    src = pydicom_test_files()
    paths = []
    for i in range(5):
        path = tmp_path / f"{i:02d}.dcm"
        shutil.copy(src / "CT_small.dcm", path)
        paths.append(path)
    # half a second per file in the child: a DoFn that waited for it would give each file's record at once
    fn = DecodeDicomFile(run_id="t", decode_timeout_s=30, max_in_flight_files=3, decode_path="tests.hostile_corpus:slow_decode")
    fn.setup()
    try:
        fn.start_bundle()
        per_call, in_flight = [], []
        for path in paths:
            readable = fileio.ReadableFile(FileMetadata(str(path), path.stat().st_size))
            per_call.append([o for o in fn.process(readable, window=GlobalWindow(), timestamp=0)
                             if isinstance(o, WindowedValue)])  # the records; tagged outputs wrap theirs
            in_flight.append(len(fn._in_flight))
        per_call.append([o for o in fn.finish_bundle() if isinstance(o, WindowedValue)])
    finally:
        fn.teardown()
    assert per_call[0] == [] and per_call[1] == [] and per_call[2] == []  # handed over, not waited for
    assert in_flight[:3] == [1, 2, 3] and max(in_flight) == 3  # the fourth file waits for the first
    records = [o.value for call in per_call for o in call]
    assert [Path(r.record_id).name for r in records] == [p.name for p in paths]


def test_pydicom_logs_and_warnings_never_reach_stderr(capfd):
    """pydicom's decoders log ERROR tracebacks for some files; the reader routes them."""
    import logging

    from transforms.decode_worker import decode_bytes

    logging.basicConfig()
    outcomes = [decode_bytes(f.read_bytes(), "middle", 1 << 30) for f in sorted(pydicom_test_files().glob("*.dcm"))]
    assert any(o.reason for o in outcomes) and any(o.pixels is not None for o in outcomes)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "pydicom" not in err


def test_binary_check_counts_the_control_characters_it_says():
    """_binary: NUL anywhere, or more than 10% of the first 64 Ki characters below 32 other than
    tab, newline, vertical tab, form feed and carriage return (checked against that rule spelled out)."""
    import random

    from transforms.readers import _binary

    def rule(text):
        sample = text[:65536]
        controls = sum(1 for c in sample if ord(c) < 32 and c not in "\t\n\r\f\v")
        return "\x00" in text or controls > 0.1 * max(1, len(sample))

    rng = random.Random(3)
    alphabet = [chr(i) for i in range(1, 40)] + list("abcdé漢 ")
    texts = ["plain note", "tabs\tand\nnewlines\r\f\v" * 50, "x" * 9 + "\x01", "x" * 8 + "\x01\x1f", "a\x00b",
             "ok" * 40000 + "\x02" * 10000]  # controls past 64 Ki characters do not count
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(500)]
    assert [_binary(t) for t in texts] == [rule(t) for t in texts]
    assert _binary("x" * 8 + "\x01\x1f") and not _binary("x" * 9 + "\x01") and not _binary(texts[5])


@pytest.mark.parametrize("size_hint", [None, 0, 3, 10, 100, 1 << 30])
@pytest.mark.parametrize("length,limit", [(0, 10), (10, 10), (11, 10), (50, 10), (50, 0), (7, 1 << 30)])
def test_read_bounded_reads_the_whole_file_or_limit_plus_one_bytes_whatever_the_size_hint(size_hint, length, limit):
    import io

    from transforms.readers import read_bounded

    class ShortReads(io.BytesIO):  # a stream that returns at most 4 bytes per call, as network streams may
        def read(self, n=-1):
            return super().read(4 if n is None or n < 0 else min(n, 4))

    data = bytes(range(length))
    want = data if not limit or length <= limit else data[:limit + 1]
    assert read_bounded(io.BytesIO(data), limit, size_hint) == want
    if limit:
        assert read_bounded(ShortReads(data), limit, size_hint) == want


def test_dicom_reader_instances_of_one_process_share_their_decoder_children(tmp_path):
    """Two DoFn instances (two bundle threads, or two reading stages) in one worker process use one
    pool of --decode_processes children, decode their own files each, and its children end with
    the last teardown."""
    import shutil
    import threading

    from apache_beam.io import fileio
    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    from transforms.decode_worker import SharedDecoders
    from transforms.readers import DecodeDicomFile

    src = pydicom_test_files()
    names = {"a": ["CT_small.dcm", "MR_small.dcm"], "b": ["JPEG2000.dcm", "CT_small.dcm", "MR_small.dcm"]}
    fns = {k: DecodeDicomFile(run_id="t", decode_timeout_s=30, decode_processes=2) for k in names}
    for fn in fns.values():
        fn.setup()
    pool = fns["a"].decoder
    assert fns["b"].decoder is pool and len(pool.decoders) == 2 and SharedDecoders.users(pool) == 2
    got: dict[str, list[str]] = {}

    def run(key):
        fn = fns[key]
        fn.start_bundle()
        out = []
        for i, name in enumerate(names[key]):
            path = tmp_path / key / f"{i}-{name}"
            path.parent.mkdir(exist_ok=True)
            shutil.copy(src / name, path)
            readable = fileio.ReadableFile(FileMetadata(str(path), path.stat().st_size))
            out += [o for o in fn.process(readable, window=GlobalWindow(), timestamp=0) if isinstance(o, WindowedValue)]
        out += [o for o in fn.finish_bundle() if isinstance(o, WindowedValue)]
        got[key] = [Path(o.value.record_id).name for o in out]

    threads = [threading.Thread(target=run, args=(k,)) for k in names]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        children = [d._proc for d in pool.decoders if d._proc is not None]
    finally:
        for fn in fns.values():
            fn.teardown()
    assert got == {k: [f"{i}-{n}" for i, n in enumerate(v)] for k, v in names.items()}
    assert children and all(p.wait(timeout=30) is not None for p in children)
    assert SharedDecoders.users(pool) == 0


@pytest.mark.parametrize("kind", ["notes", "dicom"])
def test_readers_spread_the_matched_files_over_the_workers(tmp_path, kind):
    """fileio's match and read do not split: without a shuffle after matching, every file is read in
    the one bundle that matched them, by one worker of however many (and the model after it too)."""
    import os
    import shutil

    from apache_beam.options.pipeline_options import PipelineOptions

    inputs, marks = tmp_path / "in", tmp_path / "pids"
    inputs.mkdir()
    marks.mkdir()
    for i in range(8):
        if kind == "notes":
            (inputs / f"{i}.jsonl").write_text(json.dumps({"id": str(i), "text": f"note {i}"}) + "\n")
        else:
            shutil.copy(pydicom_test_files() / "CT_small.dcm", inputs / f"{i}.dcm")

    def mark(record, d=str(marks)):
        Path(d, str(os.getpid())).touch()  # the worker process that read this record
        return record

    reader = (ReadNotes(str(inputs / "*.jsonl"), id_field="id", run_id="t") if kind == "notes"
              else ReadDicom(str(inputs / "*.dcm"), run_id="t"))
    options = PipelineOptions(["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    with beam.Pipeline(options=options) as p:
        out = p | reader
        assert_that(out.records | beam.Map(mark) | beam.combiners.Count.Globally(), equal_to([8]))
    assert len(list(marks.iterdir())) == 2
