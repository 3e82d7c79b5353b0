"""What the benchmarks share: the corpora, the held-out splits, the one Beam-stock baseline
system, the machine they ran on and one timing harness. A library for the scripts under bench/
(``bench.run_all`` and the others import from here, never from each other's ``main``).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn

T = TypeVar("T")


# -- the machine and the runner -------------------------------------------------------------------
def machine() -> str:
    """Architecture, CPU model (where /proc/cpuinfo names it) and cores, for the figures' headers:
    machines of one kind differ in speed, so a figure names the one it ran on."""
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return ", ".join(x for x in (platform.machine(), model, f"{os.cpu_count()} cores") if x)


def stock_pipeline():
    """A Beam pipeline for the stock RunInference baselines, on the FnApiRunner.

    That is where Beam's DirectRunner runs them offline, but only after offering them to Prism, which
    tries to download its binary from GitHub (a network call at run time; offline it fails, and leaves
    an empty /tmp/beam-temp* directory behind). Our pipelines never reach Prism: they run on
    ``transforms.runners.direct.EpeeDirectRunner``, which never offers a pipeline to it
    (tests/pipelines/test_pipelines.py::test_direct_runner_never_offers_our_pipelines_to_prism).
    """
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return beam.Pipeline(runner=FnApiRunner())


# -- corpora and splits ---------------------------------------------------------------------------
CORPORA = {  # name -> (pipeline, what)
    "medical_abstracts": ("notes", "5-class medical abstract classification (accuracy)"),
    "ddi": ("relations", "DDI 2013 drug-drug interactions (micro-F1 over positive relations)"),
    "chemprot": ("relations", "ChemProt chemical-protein relations, 13 types, no negative class (macro-F1)"),
    "phee": ("events", "PHEE pharmacovigilance events: trigger and argument spans as BIO tags (exact-match span F1)"),
    "pneumoniamnist": ("dicom", "PneumoniaMNIST chest X-rays, wrapped as DICOM (accuracy)"),
}


def add_text_corpus_arguments(parser, default: str) -> None:
    """``--corpus`` (one of run_all's text corpora) and ``--models`` (where their model directories are)."""
    parser.add_argument("--corpus", default=default, choices=[c for c in CORPORA if c != "pneumoniamnist"])
    parser.add_argument("--models", default="models")


def encode_examples(bundle, examples) -> tuple[list, list, list]:
    """(samples, gold, examples kept): examples that cannot be encoded are left out of every system."""
    samples, gold, kept = [], [], []
    for ex in examples:
        try:
            enc = bundle.preprocessor.encode(ex)
        except ValueError:
            continue
        samples.append(enc.sample)
        gold.append(enc.target.tolist() if hasattr(enc.target, "tolist") else enc.target)
        kept.append(ex)
    return samples, gold, kept


def halves(examples: list) -> tuple[list, list]:
    """The held-out set's two fixed halves: (calibration half, test half)."""
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    return [examples[i] for i in order[0::2]], [examples[i] for i in order[1::2]]


# DICOM copies per repeat: the test half of PneumoniaMNIST is 135 tiny images
DICOM_COPIES = 4


def repeat_inputs(input_glob: str, is_dicom: bool, repeat: int, d: Path) -> tuple[str, int]:
    """The test half's input K times over with new ids (DICOM: DICOM_COPIES x K copies of each
    file under new names); returns (input glob, records)."""
    d.mkdir(parents=True)
    if is_dicom:
        import shutil

        files = sorted(Path(input_glob).parent.glob("*.dcm"))
        for k in range(DICOM_COPIES * repeat):
            for f in files:
                shutil.copyfile(f, d / f"{k}-{f.name}")
        return str(d / "*.dcm"), len(files) * DICOM_COPIES * repeat
    lines = Path(input_glob).read_text().splitlines()
    with open(d / "test.jsonl", "w") as f:
        for k in range(repeat):
            for line in lines:
                row = json.loads(line)
                row["id"] = f"{row['id']}-{k}"
                f.write(json.dumps(row) + "\n")
    return str(d / "test.jsonl"), len(lines) * repeat


def write_inputs(bundle, examples, d: Path) -> tuple[str, dict[str, int]]:
    """The test half as the pipelines read it; returns (input glob, record id -> gold index)."""
    d.mkdir(parents=True)
    gold = {}
    if bundle.data_task == "image":
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

        for i, ex in enumerate(examples):
            img = np.asarray(ex.image, dtype=np.uint8)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "OT", 1, "MONOCHROME2"
            ds.Rows, ds.Columns = img.shape[:2]
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit, ds.PixelRepresentation = 7, 0
            ds.PixelData = img.tobytes()
            path = d / f"{i:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            gold[str(path)] = i
        return str(d / "*.dcm"), gold
    rows = []
    for i, ex in enumerate(examples):
        row = {"id": f"r{i:05d}", "text": ex.text}
        if ex.entities is not None:
            (s1, e1), (s2, e2) = ex.entities
            row.update(e1_start=s1, e1_end=e1, e2_start=s2, e2_end=e2)
        rows.append(row)
        gold[row["id"]] = i
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d / "test.jsonl"), gold


# -- our pipeline and the stock Beam system ---------------------------------------------------------
def time_our_pipeline(pipeline: str, model_dir: str, input_glob: str, out: Path, batch_size: int,
                      *extra: str) -> float:
    """Seconds for one run of our pipeline as run_all's steady rows run it (stored policy,
    ``--max_windows 1``, RunInference batches of ``batch_size``)."""
    from pipelines.common import run as run_pipeline

    t0 = time.perf_counter()
    run_pipeline(pipeline, ["--model", model_dir, "--input", input_glob, "--output", str(out), "--max_windows", "1",
                            "--id_field", "id", "--min_batch_size", str(batch_size), "--max_batch_size",
                            str(batch_size), *extra])
    return time.perf_counter() - t0


class StockFullDepth(nn.Module):
    """Our model at full depth as a plain module taking stacked tensors: what Beam's stock PyTorch
    handler can run. Returns the last exit head's probabilities."""

    def __init__(self, model_dir: str) -> None:
        super().__init__()
        from epee.modeldir import load_model_dir

        self.model = load_model_dir(model_dir).model

    def forward(self, **kw) -> torch.Tensor:
        from epee.inputs import Batch

        batch = Batch(input_ids=kw.get("input_ids"), token_type_ids=kw.get("token_type_ids"),
                      attention_mask=kw.get("attention_mask"), pixel_values=kw.get("pixel_values"),
                      entity_positions=kw.get("entity_positions"), token_mask=kw.get("token_mask"))
        return torch.softmax(self.model(batch).logits[-1], dim=-1)


class StockFullDepthInt8(StockFullDepth):
    """The stock system in int8 as a Beam user would get it: PyTorch's dynamic quantisation
    (``torch.ao.quantization.quantize_dynamic``, every ``nn.Linear`` in qint8) applied to the model
    the stock handler has just loaded its state dict into."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        loaded = super().load_state_dict(state_dict, strict=strict, assign=assign)
        torch.ao.quantization.quantize_dynamic(self, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return loaded


def padded(sample, max_length: int) -> dict[str, torch.Tensor]:
    """One EncodedSample as fixed-shape tensors (the stock handler stacks them)."""
    if sample.pixel_values is not None:
        return {"pixel_values": sample.pixel_values}
    n = int(sample.input_ids.numel())
    pad = max_length - n

    def right(t, value=0):
        return torch.nn.functional.pad(t, (0, pad), value=value)

    out = {"input_ids": right(sample.input_ids), "attention_mask": right(torch.ones(n, dtype=torch.long))}
    if sample.token_type_ids is not None:
        out["token_type_ids"] = right(sample.token_type_ids)
    if sample.entity_positions is not None:
        out["entity_positions"] = torch.tensor(sample.entity_positions, dtype=torch.long)
    if sample.token_mask is not None:
        out["token_mask"] = right(sample.token_mask, False)
    return out


def bf16_keyed_tensor_inference_fn(batch, model, device, inference_args=None, model_id=None):
    """Beam's default keyed-tensor inference under torch.autocast(bfloat16): how a Beam user would
    run the stock handler in bfloat16 (its ``inference_fn`` argument)."""
    from apache_beam.ml.inference.pytorch_inference import default_keyed_tensor_inference_fn

    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        return default_keyed_tensor_inference_fn(batch, model, device, inference_args, model_id)


def run_stock(input_glob: str, model_dir: str, output: str, batch_size: int, is_dicom: bool,
              precision: str = "float32") -> float:
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.io import fileio
    from apache_beam.io.parquetio import WriteToParquet
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerKeyedTensor

    state_path = os.path.join(tempfile.mkdtemp(), "stock.pth")
    torch.save(StockFullDepth(model_dir).state_dict(), state_path)  # a file we made ourselves
    handler = PytorchModelHandlerKeyedTensor(state_dict_path=state_path,
                                             model_class=StockFullDepthInt8 if precision == "int8" else StockFullDepth,
                                             model_params={"model_dir": model_dir}, min_batch_size=batch_size,
                                             max_batch_size=batch_size,
                                             **({"inference_fn": bf16_keyed_tensor_inference_fn}
                                                if precision == "bfloat16" else {}))

    class Encode(beam.DoFn):
        def setup(self):
            from epee.modeldir import load_preprocessor

            self.pre, self.task = load_preprocessor(model_dir)

        def process(self, item):
            from epee.data import Example

            if is_dicom:
                from epee.images import read_dicom

                ex = Example(id=item.metadata.path, image=read_dicom(item.open()))
            else:
                row = json.loads(item)
                ents = ((row["e1_start"], row["e1_end"]), (row["e2_start"], row["e2_end"])) if "e1_start" in row else None
                ex = Example(id=row["id"], text=row["text"], entities=ents)
            yield padded(self.pre.encode(ex).sample, getattr(getattr(self.pre, "settings", None), "max_length", 0))

    def row(r):
        probs = r.inference
        probs = probs.float()
        return {"label": int(probs.reshape(-1, probs.shape[-1]).argmax(-1)[0]), "score": float(probs.max())}

    schema = pa.schema([("label", pa.int64()), ("score", pa.float64())])
    t0 = time.perf_counter()
    with stock_pipeline() as p:
        src = (p | fileio.MatchFiles(input_glob) | fileio.ReadMatches()) if is_dicom else (p | beam.io.ReadFromText(input_glob))
        (src | beam.ParDo(Encode()) | RunInference(handler) | beam.Map(row)
             | WriteToParquet(f"{output}/stock", schema, file_name_suffix=".parquet", num_shards=1))
    return time.perf_counter() - t0


# -- timing ----------------------------------------------------------------------------------------
def write_result(result: dict, path: str | None = None) -> None:
    """A benchmark's result as indented JSON on stdout, and in ``path`` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work, so a clock read after it measures the work (no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clocked(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[float, T]:
    """(wall seconds, result) of one call of ``fn``."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def seconds(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Wall seconds of one call of ``fn``."""
    return clocked(fn, device)[0]


def timed(fn: Callable[[], object], repeat: int = 1, warmup: int = 0, reduce: str = "best",
          device: torch.device | str | None = None) -> float:
    """Seconds of one call of ``fn``: ``warmup`` untimed calls, then ``repeat`` timed ones, reduced to
    their ``"best"`` (least disturbed by a shared CPU), ``"median"`` or ``"mean"``."""
    if reduce not in ("best", "median", "mean"):
        raise ValueError(f"reduce must be best, median or mean, got {reduce!r}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for _ in range(warmup):
        fn()
    runs = [seconds(fn, device) for _ in range(repeat)]
    return min(runs) if reduce == "best" else statistics.median(runs) if reduce == "median" else statistics.fmean(runs)
