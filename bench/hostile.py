"""Peak memory of runs over the hostile corpus (issue 5 target: under 4 GiB). Not a test.

Builds the corpus of ``tests/hostile_corpus.py`` (DICOM headers claiming 65535 x 65535 x 1000
pixels, 20000-deep sequences, truncated pixel data, non-image SOP classes, files over the size
limit; a 50 MB note as a .txt file and as a JSONL line, binary junk, malformed CSV and JSONL),
adds the real files of ``../shared/data/dicom`` when present, runs the DICOM and notes pipelines
over it in a fresh process each, and prints one JSON line: records in, predictions, dead letters
by reason, and peak resident memory of the pipeline process. (Not of the decoder child: Linux
carries the parent's resident size at fork into a child's peak, so ``RUSAGE_CHILDREN`` reports the
parent again; the child alone peaked at 154 MiB over the 65 shared DICOM files, read from its
``/proc/<pid>/status`` VmHWM.)

    .venv/bin/python -m bench.hostile
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from pipelines.common import run
summary = run(sys.argv[1], sys.argv[2:])
print(json.dumps({"summary": summary,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(pipeline: str, args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, pipeline, *args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise SystemExit(f"{pipeline} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from tests.conftest import save_tiny_model_dir
    from tests.hostile_corpus import hostile_dicom, hostile_notes

    work = Path(tempfile.mkdtemp(prefix="epee-hostile-"))
    bad_dicom, _ = hostile_dicom(work / "dicom", max_file_bytes=64 << 20)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
    if shared.is_dir():
        for f in shared.glob("*.dcm"):
            shutil.copy(f, work / "dicom" / f"shared_{f.name}")
    hostile_notes(work / "notes", big_note_mb=50)
    models = {t: str(save_tiny_model_dir(work / f"m_{t}", t)) for t in ("image", "sequence")}
    result = {}
    for name, pipeline, model, extra in (("dicom", "dicom", models["image"], ["--max_file_bytes", str(64 << 20)]),
                                         ("notes", "notes", models["sequence"], ["--id_field", "id"])):
        r = measure(pipeline, ["--input", str(work / name / "*"), "--model", model, "--output", str(work / f"out_{name}"), *extra])
        s = r["summary"]
        result[name] = {"records_in": s["records"], "predictions": s["predictions"], "dead_letters": s["dead_letters"],
                        "dead_letters_by_reason": s["dead_letters_by_reason"], "wall_s": s["wall_seconds"],
                        "peak_rss_mib": round(r["peak_rss_mib"])}
    result["max_peak_rss_gib"] = round(max(v["peak_rss_mib"] for v in result.values() if isinstance(v, dict)) / 1024, 2)
    result["target_gib"] = 4
    print(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
