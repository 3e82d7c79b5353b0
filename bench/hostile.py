"""Peak memory of the four pipelines over the hostile corpus, compression bombs included (issue 31
target: under 2 GiB resident in every process). Not a test.

The corpus, generated on the spot into a temporary directory (nothing of it is committed):

- notes: ``tests/hostile_corpus.py``'s hostile notes (a 50 MB note as .txt and as a JSONL line,
  binary junk, malformed CSV/JSONL/Parquet, ...) and ``hostile_notes_formats`` (compressed files,
  BOMs, delimiters, Latin-1, JSON arrays, Parquet row groups, odd file names, ...), plus a
  ``.jsonl.gz`` and a ``.csv.gz`` that inflate to 1 GiB + 1 MiB from about 1 MB;
- relations and events: ``tests/privacy_corpus.py``'s note files of the task (one file per
  dead-letter type), for relations ``hostile_relations`` (hostile entity offsets), plus the same
  two gzip bombs;
- DICOM: ``tests/hostile_corpus.py``'s hostile DICOM (65535 x 65535 x 1000 headers, 20000-deep
  sequences, truncated pixel data, ...), a ``.dcm.gz`` inflating to 1 GiB, a Deflated Explicit VR
  Little Endian file whose private element inflates to 1.2 GiB (``tests/hostile_dicom_corpus.py``),
  and the real files of ``../shared/data/dicom`` when present.

Each pipeline runs in a fresh process under default limits (``--max_file_bytes`` 1 GiB); every
50 ms the peak resident size (``VmHWM``) of that process and of each of its descendants (the DICOM
decoder children) is read from ``/proc``. One JSON line: per pipeline records in, predictions, dead
letters by reason, wall time, the launcher's peak and the largest descendant's, and the largest of
all against the target.

    .venv/bin/python -m bench.hostile            # ~3-6 minutes on 2 cores
    .venv/bin/python -m bench.hostile --bomb_mib 256   # smaller bombs, quicker
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.scaling import _descendants, _rss_mib

ROOT = Path(__file__).resolve().parent.parent
TARGET_GIB = 2.0
CHILD = r"""
import json, sys
from pipelines.common import run
print(json.dumps({"summary": run(sys.argv[1], sys.argv[2:])}, default=str))
"""


def _hwm_mib(pid: int) -> float | None:
    """The process's peak resident size so far (VmHWM), MiB."""
    return _rss_mib(pid, "VmHWM")

def measure(pipeline: str, args: list[str], every: float = 0.05) -> dict:
    """Runs one pipeline in a fresh process; its summary and the peaks of its process tree."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, pipeline, *args], stdout=out, stderr=err, env=env,
                                cwd=ROOT)
        launcher, children = 0.0, {}
        while proc.poll() is None:
            launcher = max(launcher, _hwm_mib(proc.pid) or 0.0)
            for pid in _descendants(proc.pid):
                children[pid] = max(children.get(pid, 0.0), _hwm_mib(pid) or 0.0)
            time.sleep(every)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"{pipeline} run failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])["summary"]
    return {"summary": summary, "launcher_peak_mib": launcher, "largest_child_peak_mib": max(children.values(), default=0.0),
            "children": len(children)}


def gzip_bomb(path: Path, head: bytes, fill: bytes, inflated: int, tail: bytes = b"") -> None:
    """``head``, then ``fill`` repeated up to ``inflated`` bytes, then ``tail``, gzip-compressed
    in chunks (never held whole)."""
    block = fill * max(1, (1 << 20) // len(fill))
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(head)
        left = inflated - len(head) - len(tail)
        while left > 0:
            fh.write(block[:left])
            left -= len(block)
        fh.write(tail)


def notes_bombs(d: Path, inflated: int) -> None:
    """A JSONL file of one 1 GiB note and a CSV of many ordinary rows, each gzipped to ~1 MB."""
    gzip_bomb(d / "bomb.jsonl.gz", b'{"id": "bomb", "text": "', b"cough ", inflated, b'"}\n')
    gzip_bomb(d / "bomb.csv.gz", b"id,text\n", b"r,fever and cough\n", inflated)


def build(work: Path, bomb: int) -> dict[str, tuple[Path, list[str]]]:
    """The corpus of each pipeline: {pipeline: (input directory, extra arguments)}."""
    from tests.hostile_corpus import hostile_dicom, hostile_notes
    from tests.privacy_corpus import Markers, note_files

    corpora: dict[str, tuple[Path, list[str]]] = {}
    hostile_notes(work / "notes", big_note_mb=50)
    from tests.hostile_corpus import hostile_notes_formats, hostile_relations

    hostile_notes_formats(work / "notes")
    notes_bombs(work / "notes", bomb)
    corpora["notes"] = (work / "notes", ["--id_field", "id"])
    for pipeline, task in (("relations", "relation"), ("events", "token")):
        d = work / pipeline
        d.mkdir()
        note_files(d, task, Markers(), max_note_bytes=1 << 20, max_file_bytes=1 << 30)
        if pipeline == "relations":
            hostile_relations(d)  # rel.jsonl, rel.csv
        notes_bombs(d, bomb)
        corpora[pipeline] = (d, ["--id_field", "id"])
    dicom = work / "dicom"
    hostile_dicom(dicom, max_file_bytes=64 << 20)
    from pydicom.data import get_testdata_file

    gzip_bomb(dicom / "bomb.dcm.gz", Path(get_testdata_file("CT_small.dcm")).read_bytes(), b"\x00", bomb)
    from tests.hostile_dicom_corpus import deflate_bomb

    deflate_bomb(dicom / "deflate_bomb.dcm", int(bomb * 1.2))
    shared = ROOT.parent / "shared" / "data" / "dicom"
    if shared.is_dir():
        for f in shared.glob("*.dcm"):
            shutil.copy(f, dicom / f"shared_{f.name}")
    corpora["dicom"] = (dicom, ["--decode_timeout", "120"])
    return corpora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bomb_mib", type=int, default=1025,
                        help="what each gzip bomb inflates to (MiB; default: 1 MiB past the default --max_file_bytes); "
                             "the deflated DICOM bomb inflates to 1.2 times that")
    parser.add_argument("--pipelines", default="notes,relations,events,dicom")
    a = parser.parse_args()
    from tests.conftest import save_tiny_model_dir

    work = Path(tempfile.mkdtemp(prefix="epee-hostile-"))
    try:
        corpora = build(work, a.bomb_mib << 20)
        tasks = {"notes": "sequence", "relations": "relation", "events": "token", "dicom": "image"}
        result: dict = {}
        for pipeline in a.pipelines.split(","):
            directory, extra = corpora[pipeline]
            model = str(save_tiny_model_dir(work / f"m_{pipeline}", tasks[pipeline]))
            r = measure(pipeline, ["--input", str(directory / "*"), "--model", model,
                                   "--output", str(work / f"out_{pipeline}"), *extra])
            s = r["summary"]
            result[pipeline] = {"records_in": s["records_in"], "predictions": s["predictions"],
                                "dead_letters": s["dead_letters"], "dead_letters_by_reason": s["dead_letters_by_reason"],
                                "wall_s": s["wall_seconds"], "launcher_peak_rss_mib": round(r["launcher_peak_mib"]),
                                "largest_child_peak_rss_mib": round(r["largest_child_peak_mib"]),
                                "child_processes": r["children"]}
            print(pipeline, json.dumps(result[pipeline]), file=sys.stderr, flush=True)
        peaks = [max(v["launcher_peak_rss_mib"], v["largest_child_peak_rss_mib"]) for v in result.values()]
        result["max_peak_rss_gib"] = round(max(peaks) / 1024, 2)
        result["target_gib"] = TARGET_GIB
        result["within_target"] = result["max_peak_rss_gib"] < TARGET_GIB
        result["bomb_mib"] = a.bomb_mib
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
