"""A corpus of broken, huge and hostile inputs, generated on the spot (nothing of it is committed).

Each builder writes files into a directory and returns what must come out of a pipeline run:
``{record id or file path: expected dead-letter error_type}`` for the bad ones, and the ids of the
good ones that must be predicted. Used by the tests and by ``bench/hostile.py`` (peak memory).
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

GOOD_DICOM = ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm")  # decode with pydicom's bundled files


def _base(name: str = "CT_small.dcm") -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _rewrite(name: str, **changes) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        elif keyword == "TransferSyntaxUID":
            from pydicom.encaps import encapsulate

            ds.file_meta.TransferSyntaxUID = value
            ds.PixelData = encapsulate([ds.PixelData])
        else:
            setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deep_sequence(depth: int) -> bytes:
    """Undefined-length (0040,A730) ContentSequence items nested ``depth`` deep, explicit VR LE."""
    seq_open = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"
    item_open = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    seq_close = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return (seq_open + item_open) * depth + (item_close + seq_close) * depth


def hostile_dicom(d: Path, max_file_bytes: int = 4 << 20) -> tuple[dict[str, str], list[str]]:
    """Bad DICOM files -> expected reasons (keys: file paths), and the good files' paths."""
    d.mkdir(parents=True, exist_ok=True)
    base = _base()
    pixel_at = base.find(b"\xe0\x7f\x10\x00")
    bad = {
        # header claims 65535 x 65535 x 1000 frames: refused from the header, nothing decoded
        "huge_header.dcm": (_rewrite("CT_small.dcm", Rows=65535, Columns=65535, NumberOfFrames="1000"), "pixel_budget_exceeded"),
        "deep_nesting.dcm": (base[:pixel_at] + deep_sequence(20000) + base[pixel_at:], "nesting_too_deep"),
        "truncated_pixels.dcm": (base[: len(base) - 5000], "truncated_pixel_data"),
        "not_dicom_at_all": (bytes(random.Random(1).getrandbits(8) for _ in range(4096)), "not_dicom"),
        "empty.dcm": (b"", "not_dicom"),
        "no_pixels.dcm": (_rewrite("CT_small.dcm", PixelData=None), "no_pixel_data"),
        "structured_report.dcm": (_rewrite("CT_small.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.88.22", PixelData=None),
                                  "non_image_sop_class"),
        "rt_struct.dcm": (_rewrite("CT_small.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.481.3", PixelData=None),
                          "non_image_sop_class"),
        "segmentation.dcm": (_rewrite("CT_small.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.66.4"), "non_image_sop_class"),
        "mpeg2_syntax.dcm": (_rewrite("CT_small.dcm", TransferSyntaxUID="1.2.840.10008.1.2.4.100"), "unsupported_transfer_syntax"),
        "oversized.dcm": (base + b"\x00" * (max_file_bytes + 1 - len(base)), "file_too_large"),
    }
    expected = {}
    for name, (data, reason) in bad.items():
        (d / name).write_bytes(data)
        expected[str(d / name)] = reason
    good = []
    for name in GOOD_DICOM:
        (d / f"good_{name}").write_bytes(_base(name))
        good.append(str(d / f"good_{name}"))
    return expected, good


def hostile_notes(d: Path, big_note_mb: int = 50) -> tuple[dict[str, str], list[str]]:
    """Bad notes -> expected reasons (keys: record ids), and the good notes' ids."""
    d.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    good = [f"ok{i}" for i in range(5)]
    big = "chest pain " * (big_note_mb * (1 << 20) // 11)
    lines = [json.dumps({"id": "ok0", "text": "patient with fever and cough"}).encode(),
             b"{this is not json",
             b"[1, 2, 3]",
             b"[" * 100000,  # nesting that recursion-based parsers choke on
             b'{"id": "utf8", "text": "caf\xe9 au lait"}',
             json.dumps({"id": "number", "text": 12345}).encode(),
             json.dumps({"id": "huge", "text": big}).encode(),
             json.dumps({"id": "nul", "text": "a\u0000b\u0000c"}).encode(),
             json.dumps({"id": "ok1", "text": "no acute distress"}).encode()]
    (d / "notes.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    p = str(d / "notes.jsonl")
    expected.update({f"{p}#2": "malformed_json", f"{p}#3": "malformed_json", f"{p}#4": "malformed_json",
                     f"{p}#5": "invalid_utf8", "number": "bad_field_type", f"{p}#7": "note_too_large",
                     "nul": "binary_content"})
    (d / "rows.csv").write_bytes(b'id,text\nok2,"shortness of breath"\nwide,"a","b","c"\nbad8,"\xff\xfe"\n'
                                 b'ok3,"headache"\nopen,"never closed\n')
    c = str(d / "rows.csv")
    expected.update({f"{c}#2": "malformed_csv_row", "bad8": "invalid_utf8", f"{c}#5": "malformed_csv_row"})
    (d / "big.txt").write_text(big)
    expected[str(d / "big.txt")] = "note_too_large"
    (d / "junk.txt").write_bytes(bytes(random.Random(2).getrandbits(8) for _ in range(20000)))
    expected[str(d / "junk.txt")] = "invalid_utf8"
    (d / "controls.txt").write_bytes(bytes(range(1, 9)) * 100)
    expected[str(d / "controls.txt")] = "binary_content"
    (d / "ok4.txt").write_text("mild cough, no fever")
    good[4] = str(d / "ok4.txt")
    (d / "table.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    expected[str(d / "table.parquet")] = "malformed_parquet"
    return expected, good


def hanging_decode(data: bytes, frame_policy: str, max_pixel_bytes: int):
    """A decode function for the isolated decoder that hangs on files starting with b"HANG"
    and dies on files starting with b"CRASH" (as a segfaulting plugin would)."""
    from transforms.decode_worker import decode_bytes

    if data.startswith(b"HANG"):
        time.sleep(3600)
    if data.startswith(b"CRASH"):
        os._exit(11)
    return decode_bytes(data, frame_policy, max_pixel_bytes)


def slow_decode(data: bytes, frame_policy: str, max_pixel_bytes: int):
    """A decode function for the isolated decoder that takes half a second per file."""
    from transforms.decode_worker import decode_bytes

    time.sleep(0.5)
    return decode_bytes(data, frame_policy, max_pixel_bytes)


def heavy_modules_decode(data: bytes, frame_policy: str, max_pixel_bytes: int):
    """A decode function that reports which heavy packages the decoder process has imported."""
    import sys

    from transforms.decode_worker import DecodeOutcome

    heavy = ("torch", "transformers", "apache_beam", "_pytest")  # _pytest: the main module of a test run
    return DecodeOutcome(pixels=sorted(m for m in heavy if m in sys.modules))


# -- notes: formats, encodings, field types, file names, entries that are not files ---------------
def _parquet(path: Path, table, **kw) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path, **kw)


def hostile_notes_formats(d: Path, bomb_bytes: int | None = None) -> tuple[dict[str, str], list[str]]:
    """Notes as archives export them (read with ``--id_field id``): compressed files, byte order
    marks, CRLF, CSV with leading blank lines, quoted multi-line fields, ``;`` and tab delimiters,
    Latin-1 bytes, JSON arrays and documents, text and id fields of every JSON type, lone
    surrogate escapes, empty and whitespace-only files, Parquet with wrong, nested and
    dictionary-encoded columns, a corrupt row group, file names that are not UTF-8, hold a
    newline or are 250 bytes long, a directory and a dangling link matched by the pattern.
    Returns ({record id, or the printable path for file-level ones: error_type}, good ids).
    ``bomb_bytes``: also a ``.jsonl.gz`` that inflates to that many bytes (run the pipeline with
    ``--max_file_bytes`` below it)."""
    import gzip

    import pyarrow as pa

    from transforms.privacy import printable

    d.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    good: list[str] = []

    def j(**row) -> bytes:
        return json.dumps(row).encode()

    # JSON field types; a lone surrogate escape (a UTF-16 string cut mid-emoji) in the text and in the id
    p = d / "types.jsonl"
    p.write_bytes(b"\n".join([
        j(id="ok_t1", text="fever since monday"),
        b'{"id": "sur_text", "text": "pain \\ud83d cut"}',
        b'{"id": "\\ud83d", "text": "an id cut mid-emoji"}',
        j(id=1.5, text="an id that is a float"),
        j(id={"mrn": 1}, text="an id that is an object"),
        j(id="t_num", text=12), j(id="t_list", text=["a", "b"]), j(id="t_obj", text={"a": 1}), j(id="t_bool", text=True),
        j(id="t_null", text=None),
        j(id=77, text="a whole-number id"),
    ]) + b"\n")
    expected.update({"sur_text": "invalid_utf8", f"{p}#3": "invalid_utf8", f"{p}#4": "bad_field_type",
                     f"{p}#5": "bad_field_type", "t_num": "bad_field_type", "t_list": "bad_field_type",
                     "t_obj": "bad_field_type", "t_bool": "bad_field_type", "t_null": "empty_note"})
    good += ["ok_t1", "77"]
    # byte order marks, CRLF
    (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + j(id="ok_bom1", text="no acute distress") + b"\r\n"
                                  + j(id="ok_bom2", text="mild cough") + b"\r\n")
    (d / "bom.csv").write_bytes(b'\xef\xbb\xbfid,text\r\nok_bomcsv,"fever, chills"\r\nok_crlf,headache\r\n')
    good += ["ok_bom1", "ok_bom2", "ok_bomcsv", "ok_crlf"]
    # CSV: leading blank lines, a quoted note over several lines, Latin-1 bytes, ; and tab delimiters
    (d / "blank_first.csv").write_bytes(b"\n\n   \nid,text\nok_blank,cough at night\n")
    (d / "multiline.csv").write_bytes(b'id,text\nok_multi,"line one\nline two, with a comma\n\nand a blank line"\n'
                                      b'ok_after,"after it"\n')
    p = d / "latin1.csv"
    p.write_bytes(b"id,text\nok_lat,plain ascii\nlat_bad,caf\xe9 au lait\nok_lat2,more ascii\n")
    expected["lat_bad"] = "invalid_utf8"
    (d / "semi.csv").write_bytes(b'id;text\nok_semi;chest pain, left side\nok_semi2;"quoted; with ;"\n')
    (d / "tabs.tsv").write_bytes(b"id\ttext\nok_tsv\tshortness of breath, mild\n")
    good += ["ok_blank", "ok_multi", "ok_after", "ok_lat", "ok_lat2", "ok_semi", "ok_semi2", "ok_tsv"]
    # JSON: an array (one record per element), one pretty-printed object, JSON Lines named .json
    p = d / "array.json"
    p.write_bytes(b'[\n  {"id": "ok_arr1", "text": "rash, [itchy] {mild}"},\n  {"id": "ok_arr2", "text": "a \\" quote"},\n'
                  b'  5,\n  {"id": "arr_num", "text": 3}\n]\n')
    expected.update({f"{p}#3": "malformed_json", "arr_num": "bad_field_type"})
    (d / "one.json").write_bytes(b'{\n  "id": "ok_one",\n  "text": "a single document"\n}\n')
    (d / "lines.json").write_bytes(j(id="ok_jl1", text="json lines") + b"\n" + j(id="ok_jl2", text="named .json") + b"\n")
    good += ["ok_arr1", "ok_arr2", "ok_one", "ok_jl1", "ok_jl2"]
    # empty and whitespace-only files, one empty_file each
    for name, data in (("empty.jsonl", b""), ("spaces.jsonl", b"  \n\n \r\n"), ("spaces.csv", b"\n \n"),
                       ("spaces.txt", b" \n\t"), ("empty.parquet", b""), ("spaces.json", b"\n  \n"),
                       ("bom_only.txt", b"\xef\xbb\xbf")):
        (d / name).write_bytes(data)
        expected[str(d / name)] = "empty_file"
    # compressed: the format of the name without the suffix; inflated in bounded steps
    with gzip.open(d / "notes.jsonl.gz", "wb") as fh:
        fh.write(j(id="ok_gz1", text="from a gzip") + b"\n{broken\n")
    expected[f"{d / 'notes.jsonl.gz'}#2"] = "malformed_json"
    (d / "rows.csv.gz").write_bytes(gzip.compress(b"id,text\nok_gzcsv,gzipped csv\n"))
    (d / "note.txt.gz").write_bytes(gzip.compress("a gzipped text note".encode()))
    (d / "arr.json.gz").write_bytes(gzip.compress(b'[{"id": "ok_gzarr", "text": "gzipped array"}]'))
    import bz2

    (d / "rows.tsv.bz2").write_bytes(bz2.compress(b"id\ttext\nok_bz2\tbzipped tsv\n"))
    good += ["ok_gz1", "ok_gzcsv", str(d / "note.txt.gz"), "ok_gzarr", "ok_bz2"]
    whole = gzip.compress(b"".join(j(id=f"cut{i}", text="x " * 50) + b"\n" for i in range(400)))
    (d / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    expected[str(d / "cut.jsonl.gz")] = "bad_compression"
    (d / "empty.csv.gz").write_bytes(gzip.compress(b""))
    expected[str(d / "empty.csv.gz")] = "empty_file"
    if bomb_bytes:
        with gzip.open(d / "bomb.jsonl.gz", "wb", compresslevel=6) as fh:
            line = j(id="bomb", text="cough " * 100) + b"\n"
            block = line * ((1 << 20) // len(line))
            for _ in range(bomb_bytes // len(block) + 1):
                fh.write(block)
        expected[str(d / "bomb.jsonl.gz")] = "file_too_large"
    # Parquet: a text column of numbers, a nested one, a dictionary-encoded one, a binary one, and
    # a file of three row groups whose second is corrupt
    _parquet(d / "int_text.parquet", pa.table({"id": ["pq_int1", "pq_int2"], "text": [1, 2]}))
    expected.update({"pq_int1": "bad_field_type", "pq_int2": "bad_field_type"})
    _parquet(d / "nested.parquet", pa.table({"id": ["pq_nest"], "text": [{"a": "b"}]}))
    expected["pq_nest"] = "bad_field_type"
    _parquet(d / "dict.parquet", pa.table({"id": ["ok_dict1", "ok_dict2"],
                                           "text": pa.array(["same note", "same note"]).dictionary_encode()}))
    _parquet(d / "binary.parquet", pa.table({"id": ["ok_bin", "bin_bad"],
                                             "text": pa.array([b"bytes of text", b"caf\xe9"], pa.binary())}))
    expected["bin_bad"] = "invalid_utf8"
    good += ["ok_dict1", "ok_dict2", "ok_bin"]
    p = d / "groups.parquet"
    _parquet(p, pa.table({"id": [f"rg{i}" for i in range(6)], "text": [f"row group note {i} " * 20 for i in range(6)]}),
             row_group_size=2, compression="snappy", use_dictionary=False)
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(p).metadata.row_group(1).column(1)
    data = bytearray(p.read_bytes())
    at = meta.data_page_offset
    data[at: at + 24] = b"\xff" * 24  # the page header of row group 1's text column
    p.write_bytes(bytes(data))
    expected[f"{p}#rowgroup1"] = "malformed_parquet"
    good += ["rg0", "rg1", "rg4", "rg5"]
    full = d / "truncated.parquet"
    _parquet(full, pa.table({"id": ["tr"], "text": ["cut short"]}))
    full.write_bytes(full.read_bytes()[:-30])
    expected[str(full)] = "malformed_parquet"
    # file names: not UTF-8 (Latin-1), a newline, 250 bytes; read end to end, written printable
    base = os.fsencode(str(d))
    for raw, rid in ((b"M\xfcller.jsonl", "ok_latin_name"), (b"new\nline.jsonl", "ok_newline_name"),
                     (b"n" * 244 + b".jsonl", "ok_long_name")):
        with open(base + b"/" + raw, "wb") as fh:
            fh.write(j(id=rid, text="a note in an oddly named file") + b"\n")
        good.append(rid)
    with open(base + b"/r\xe9sum\xe9.txt", "wb") as fh:
        fh.write(b"a plain-text note whose name is Latin-1")
    good.append(printable(os.fsdecode(base + b"/r\xe9sum\xe9.txt")))
    with open(base + b"/x\xff.jsonl", "wb") as fh:
        fh.write(b"{broken\n")
    expected[printable(os.fsdecode(base + b"/x\xff.jsonl")) + "#1"] = "malformed_json"
    # entries matched by the pattern that are not files
    (d / "sub.jsonl").mkdir()
    expected[str(d / "sub.jsonl")] = "read_error"
    os.symlink(d / "nowhere.jsonl", d / "dangling.jsonl")
    expected[str(d / "dangling.jsonl")] = "read_error"
    return expected, good


def hostile_relations(d: Path) -> tuple[dict[str, str], list[str]]:
    """Relation candidates whose entity offsets are every wrong thing JSON and CSV can hold; good
    rows after each bad one (read with ``--id_field id``)."""
    d.mkdir(parents=True, exist_ok=True)
    text = "aspirin and warfarin"
    ok = {"e1_start": 0, "e1_end": 7, "e2_start": 12, "e2_end": 20}
    bad = {"inf": "Infinity", "nan": "NaN", "neg_inf": "-Infinity", "list": "[0, 7]", "bool": "true", "float": "1.5",
           "string": '"12"', "marker": '"DOE12345"', "huge": str(10 ** 30), "negative": "-1", "big_float": "1e400"}
    lines = []
    for name, raw in bad.items():
        lines.append(f'{{"id": "rel_{name}", "text": "{text}", "e1_start": {raw}, "e1_end": 7, "e2_start": 12, '
                     f'"e2_end": 20}}'.encode())
        lines.append(json.dumps({"id": f"ok_after_{name}", "text": text, **ok}).encode())
    lines.append(json.dumps({"id": "rel_reversed", "text": text, **ok, "e2_start": 20, "e2_end": 12}).encode())
    lines.append(json.dumps({"id": "rel_outside", "text": text, **ok, "e2_end": 21}).encode())
    (d / "rel.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    expected = {f"rel_{name}": "bad_entities" for name in [*bad, "reversed", "outside"]}
    good = [f"ok_after_{name}" for name in bad]
    (d / "rel.csv").write_text(f"id,text,e1_start,e1_end,e2_start,e2_end\nok_csv,{text},0,7,12,20\n"
                               f"rel_csv_word,{text},DOE12345,7,12,20\nrel_csv_neg,{text},-1,7,12,20\n"
                               f"rel_csv_float,{text},0.5,7,12,20\nrel_csv_long,{text},{'9' * 5000},7,12,20\n"
                               f"ok_csv2,{text}, 0 ,7,12,20\n")
    expected.update({"rel_csv_word": "bad_entities", "rel_csv_neg": "bad_entities", "rel_csv_float": "bad_entities",
                     "rel_csv_long": "bad_entities"})
    good += ["ok_csv", "ok_csv2"]
    return expected, good
