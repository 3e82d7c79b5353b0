"""Everything the four pipelines write for one fixed corpus, as a digest to compare across a refactor.

    .venv/bin/python scripts/golden_outputs.py OUT_DIR > before.json
    (change the code)
    .venv/bin/python scripts/golden_outputs.py OUT_DIR2 > after.json
    diff before.json after.json

Each pipeline runs on the DirectRunner with a fixed ``--run_id`` and tiny random models (seeded) over
the hostile test corpora plus generated notes and pydicom's test files: good records, and bad ones of
most dead-letter types. For every Parquet file the run committed it prints the SHA-256 of its bytes and
the SHA-256 of its rows with the columns that hold wall-clock times (``*_seconds``, ``started*``,
``finished*``, ``*_at``) dropped, so "same bytes" and "same content apart from the clock" are both
visible. Needs the test helpers (run from the repository root).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLOCK = ("_seconds", "_at", "_s")


def _clock_column(name: str) -> bool:
    return name.endswith(CLOCK) or name.startswith(("started", "finished", "wall"))


def _corpora(root: Path) -> dict[str, Path]:
    from pipelines.sample_data import generate_notes
    from tests.hostile_corpus import hostile_dicom, hostile_notes_formats, hostile_relations

    notes = root / "notes"
    hostile_notes_formats(notes)
    with open(notes / "generated.jsonl", "w") as fh:
        for n in generate_notes(48, seed=3):
            fh.write(json.dumps({"id": n.note_id, "text": n.text}) + "\n")
    relations = root / "relations"
    hostile_relations(relations)
    dicom = root / "dicom"
    hostile_dicom(dicom)
    from pydicom.data import get_testdata_file

    for name in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm"):
        shutil.copy(get_testdata_file(name), dicom / f"good_{name}")
    for gz in root.rglob("*.gz"):  # a gzip header holds its write time: zero it, so the digests repeat
        data = gz.read_bytes()
        if data[:2] == b"\x1f\x8b" and len(data) >= 8:
            gz.write_bytes(data[:4] + bytes(4) + data[8:])
    return {"notes": notes, "events": notes, "relations": relations, "dicom": dicom}


def _digest_parquet(path: Path) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    keep = [c for c in table.column_names if not _clock_column(c)]
    rows = sorted(json.dumps(r, sort_keys=True, default=repr) for r in table.select(keep).to_pylist())
    return {
        "bytes_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "rows": table.num_rows,
        "columns": table.column_names,
        "content_sha256": hashlib.sha256("\n".join(rows).encode()).hexdigest(),
    }


def main(out: str) -> int:
    from pipelines.common import run
    from pipelines.outputs import current_run_dir
    from tests.conftest import save_tiny_model_dir

    root = Path(out)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    corpora = _corpora(root / "in")
    tasks = {"notes": "sequence", "relations": "relation", "events": "token", "dicom": "image"}
    result: dict = {}
    for pipeline, task in tasks.items():
        model = save_tiny_model_dir(root / "models" / task, task, seed=7)
        dest = root / "out" / pipeline
        args = ["--input", f"{corpora[pipeline]}/*", "--model", str(model), "--output", str(dest),
                "--run_id", "golden", "--min_batch_size", "1", "--max_batch_size", "1"]  # batches of one: bytes repeat
        if pipeline != "dicom":
            args += ["--id_field", "id"]
        summary = run(pipeline, args)
        run_dir = Path(current_run_dir(str(dest)))
        files = {str(p.relative_to(run_dir)): _digest_parquet(p) for p in sorted(run_dir.rglob("*.parquet"))}
        result[pipeline] = {
            "summary": {k: summary[k] for k in ("records_in", "predictions", "dead_letters") if k in summary},
            "files": files,
        }
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/golden_outputs"))
