"""The ``epee`` command: train, calibrate and evaluate early-exit model directories.

    epee train      --task sequence --train notes.jsonl --dev dev.jsonl --backbone DIR --output MODEL
    epee calibrate  --model MODEL [--data dev.jsonl] [--tolerance 1.0] [--confidence 0.9] [--rule ltt]
    epee calibrate  --model MODEL --unlabeled 'archive/*.jsonl' [--sample 2000] [--epsilon 0.02] [--delta 0.1]
    epee evaluate   --model MODEL --data test.jsonl
    epee sparsify   --model MODEL --output SPARSE --sparsity 0.75 [--dense-epochs 1] [--num-prompts 8]
    epee convert    --model MODEL        (pickle weights -> model.safetensors, once)

See the README ("Training a model") for every data format with an example. Each command is
argparse -> a dataclass of :mod:`epee.workflows` -> its function -> the result printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

from .config import LINEAR_KERNELS, PRECISIONS
from .workflows.data import DATA_TASKS

if TYPE_CHECKING:
    from .workflows import DataFields, DataSpec, TrainJob

log = logging.getLogger("epee")


# -- data ------------------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data fields (defaults come from the model directory where it has them)")
    g.add_argument("--text-field", help="column holding the text (default: text)")
    g.add_argument("--label-field", help="column holding the label (default: label)")
    g.add_argument("--id-field", help="column holding a record id (default: row number)")
    g.add_argument("--image-field", help="image tables: column with the file path (default: path)")
    g.add_argument("--label-names", help="two-column table (id,name) mapping raw label values to names")
    g.add_argument("--npz-split", help="npz files: array prefix, e.g. 'train' for train_images/train_labels")
    g.add_argument("--dev-fraction", type=float, help="carve a dev split out of the data, by document")
    g.add_argument("--split-seed", type=int, help="seed of that split (default 13)")


def _fields(args: argparse.Namespace) -> DataFields:
    from .workflows import DataFields

    return DataFields(**{k: getattr(args, k, None) for k in (
        "text_field", "label_field", "id_field", "image_field", "label_names", "npz_split", "dev_fraction", "split_seed")})


def _data(args: argparse.Namespace) -> DataSpec:
    from .workflows import DataSpec

    return DataSpec(data=args.data, part=args.part, max_examples=args.max_examples, fields=_fields(args))


def _kwargs(args: argparse.Namespace, cls: type, **given: Any) -> dict[str, Any]:
    """The dataclass fields ``cls`` shares with the parsed arguments, plus ``given``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls) if f.init} - set(given)
    return {**{n: getattr(args, n) for n in names if hasattr(args, n)}, **given}


# -- commands: argparse -> dataclass -> workflow -> what is printed ----------------------------------
def _train_job(args: argparse.Namespace) -> TrainJob:
    from .workflows import TrainJob

    return TrainJob(**_kwargs(args, TrainJob, fields=_fields(args), progress=not args.no_progress,
                              mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None))


def train_job(flags: Sequence[str]) -> TrainJob:
    """The :class:`~epee.workflows.TrainJob` of an `epee train FLAGS...` command, for a script that
    keeps the training command it documents (bench.real_models): parsed here, never re-run as argv."""
    return _train_job(build_parser().parse_args(["train", *flags]))


def cmd_train(args: argparse.Namespace) -> dict:
    from .workflows import train

    return train(_train_job(args)).summary


def cmd_calibrate(args: argparse.Namespace) -> dict:
    from .workflows import CalibrationSpec, calibrate

    return calibrate(args.model, CalibrationSpec(**_kwargs(args, CalibrationSpec, data=_data(args)))).record


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from .workflows import EvaluateSpec, evaluate

    return evaluate(args.model, EvaluateSpec(**_kwargs(args, EvaluateSpec, data=_data(args)))).summary


def cmd_sparsify(args: argparse.Namespace) -> dict:
    from .workflows import SparsifyJob, sparsify

    return sparsify(SparsifyJob(**_kwargs(args, SparsifyJob, fields=_fields(args), progress=not args.no_progress))).summary


def cmd_convert(args: argparse.Namespace) -> dict:
    from .workflows import convert

    return convert(args.model)


def _add_kernel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--linear-kernel", default="auto", choices=LINEAR_KERNELS,
                   help="float32 CPU kernel of the linear layers: auto (oneDNN on x86-64 CPUs in float32, see "
                        "epee/kernels.py; PyTorch's elsewhere), aten (PyTorch's default) or onednn")


def _add_pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="load a model directory whose weights are a pickle file (pytorch_model.bin, model.pt) "
                        "instead of model.safetensors, through PyTorch's restricted unpickler (weights_only=True); "
                        "refused without this flag. `epee convert` turns such a directory into safetensors once")


# -- entry point -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epee", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune backbone and exit heads (weighted loss)")
    t.add_argument("--task", required=True, choices=DATA_TASKS)
    t.add_argument("--train", required=True, help="training data: file, DDI directory or .npz (local, s3://, gs://)")
    t.add_argument("--dev", help="dev data (else --dev-fraction carves it out of --train)")
    t.add_argument("--dev-npz-split", help="npz dev file: array prefix, e.g. 'val'")
    t.add_argument("--output", required=True, help="model directory to write (also holds the resume checkpoint)")
    src = t.add_argument_group("backbone")
    src.add_argument("--backbone", help="pretrained transformers directory (BERT, ALBERT, GPT-2, ViT)")
    src.add_argument("--architecture", choices=["bert", "albert", "gpt2", "vit"], help="train from scratch")
    src.add_argument("--backbone-config", help="JSON (or a JSON file) of config values for --architecture")
    src.add_argument("--tokenizer", help="tokenizer directory (text tasks from scratch)")
    src.add_argument("--allow-pickle-weights", action="store_true",
                     help="let --backbone load pytorch_model.bin when it has no *.safetensors (read by transformers "
                          "with torch.load weights_only=True); refused without this flag")
    src.add_argument("--image-size", type=int, default=28, help="vit from scratch: input side in pixels")
    src.add_argument("--channels", type=int, default=1, choices=[1, 3])
    src.add_argument("--mean", type=float, nargs="+", help="image normalisation mean per channel (default 0.5)")
    src.add_argument("--std", type=float, nargs="+", help="image normalisation std per channel (default 0.5)")
    _add_data_args(t)
    t.add_argument("--negative-label", help="relation task: the no-relation class (DDI: negative)")
    t.add_argument("--max-length", type=int, default=256, help="tokens per input")
    t.add_argument("--pooling", choices=["default", "mean"], default="default",
                   help="sequence/image exit-head input: the family's pooled vector ([CLS] via the pooler, "
                        "GPT-2 last token, ViT CLS) or the mean of the real tokens (sentence-transformers "
                        "backbones such as all-MiniLM were trained with mean pooling)")
    t.add_argument("--head-input", choices=["layer", "attention"], default="layer",
                   help="what the exit heads after layers 1..L-1 read: each layer's output, or (bert) its attention "
                        "sublayer's output, so that a record exiting there skips that layer's feed-forward; the "
                        "last head reads the last layer's output either way")
    h = t.add_argument_group("training")
    h.add_argument("--epochs", type=int, default=3)
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--lr", type=float, default=5e-5, help="backbone learning rate")
    h.add_argument("--head-lr", type=float, default=1e-3, help="exit-head learning rate")
    h.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                   help="self-distillation weight in [0, 1]: earlier exit heads also learn the last head's "
                        "distribution (default 0: labels only)")
    h.add_argument("--seed", type=int, default=42)
    h.add_argument("--max-train", type=int, help="subsample training examples (seeded)")
    h.add_argument("--max-dev", type=int, help="subsample dev examples (seeded)")
    h.add_argument("--negative-ratio", type=float, help="relation task: keep at most R negatives per positive")
    h.add_argument("--checkpoint-every", type=int, default=200)
    h.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # simulates an interruption (tests)
    h.add_argument("--num-prompts", type=int, default=0, help="soft prompt vectors to learn (text models)")
    h.add_argument("--freeze-backbone", action="store_true", help="with --num-prompts: train only prompts and exit heads")
    h.add_argument("--tau", type=float, default=0.2, help="entropy threshold until calibrated")
    h.add_argument("--patience", type=int, default=2, help="patience until calibrated")
    h.add_argument("--device", default="cpu")
    h.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="sweep τ and P on a dev set and store the fastest setting within tolerance")
    c.add_argument("--model", required=True)
    c.add_argument("--data", help="labelled dev data (default: the dev set recorded at training)")
    c.add_argument("--part", default="all", choices=["all", "train", "dev"], help="with --dev-fraction: which part")
    c.add_argument("--tolerance", type=float, default=1.0, help="score points below full depth allowed (1.0 = 1 point)")
    c.add_argument("--confidence", type=float, default=0.9,
                   help="take the fastest setting whose score drop stays within tolerance at this bootstrap "
                        "confidence (guards against picking a setting for its luck on the dev set); "
                        "0 takes the fastest within tolerance on the dev set itself")
    c.add_argument("--resamples", type=int, default=200, help="bootstrap resamples for --confidence")
    c.add_argument("--rule", default="bootstrap", choices=["bootstrap", "ltt"],
                   help="labelled data: the paired bootstrap (default), or Learn then Test (fixed-sequence, exact "
                        "binomial): the share of records right at full depth but wrong at the exit is <= "
                        "--tolerance with confidence --confidence, for the chosen setting (docs/calibration.md)")
    u = c.add_argument_group("label-free calibration on the archive the model will run on (docs/calibration.md)")
    u.add_argument("--unlabeled", metavar="PATTERN",
                   help="records without labels: file, glob or directory of JSONL, CSV, Parquet or .txt (one record "
                        "a line), local, s3:// or gs://; chooses the fastest setting whose agreement with full depth "
                        "(token tasks: the same spans) is >= 1 - --epsilon with confidence 1 - --delta")
    u.add_argument("--sample", type=int, default=2000, help="records drawn, keyed by a hash of the record id")
    u.add_argument("--epsilon", type=float, default=0.02, help="share of records allowed to disagree with full depth")
    u.add_argument("--delta", type=float, default=0.1, help="chance allowed that the true disagreement exceeds --epsilon")
    u.add_argument("--seed", type=int, default=13, help="key of the sample")
    u.add_argument("--s3-endpoint-url", "--s3_endpoint_url", dest="s3_endpoint_url", metavar="URL",
                   help="s3:// archives on an S3-compatible store (MinIO, Ceph); credentials and region come from "
                        "boto3's usual settings (AWS_* environment variables, ~/.aws)")
    c.add_argument("--min-exit-layer", type=int, default=1)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--max-examples", type=int)
    c.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="calibrate in the precision the pipelines will run in (--precision there)")
    _add_kernel_arg(c)
    _add_data_args(c)
    _add_pickle_arg(c)
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("evaluate", help="score a model directory on labelled data with its stored policy")
    e.add_argument("--model", required=True, help="model directory: local path, s3:// or gs://")
    e.add_argument("--data", help="labelled data (default: the dev set recorded at training)")
    e.add_argument("--part", default="all", choices=["all", "train", "dev"])
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-examples", type=int)
    e.add_argument("--policy", choices=["entropy", "patience", "epee", "none"], help="override the stored policy")
    e.add_argument("--tau", type=float)
    e.add_argument("--patience", type=int)
    e.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="run the engine in this precision (bfloat16: torch.autocast; int8: the layers' linear "
                        "products in int8), to check its scores before a pipeline runs with that --precision")
    _add_kernel_arg(e)
    e.add_argument("--whole-layers", action="store_true",
                   help="run every layer whole, never at the exit heads' positions first (EngineConfig."
                        "split_layers; the same predictions, more multiply-adds): for comparisons")
    _add_data_args(e)
    _add_pickle_arg(e)
    e.set_defaults(func=cmd_evaluate)

    z = sub.add_parser("sparsify", help="prune a model directory's transformer weights, train sparse, optionally "
                                        "fine-tune dense; optional soft prompts (MediSwift)")
    z.add_argument("--model", required=True, help="trained model directory (local, s3:// or gs://)")
    z.add_argument("--output", required=True, help="new model directory")
    z.add_argument("--sparsity", type=float, required=True, help="share of transformer linear weights set to zero, e.g. 0.5 or 0.75; 0 = none")
    z.add_argument("--scope", default="global", choices=["global", "layer"], help="one magnitude threshold for all, or per matrix")
    z.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"], help="2:4 needs --sparsity 0.5")
    z.add_argument("--gradual-steps", type=int, default=0, help="raise sparsity gradually (cubic) over this many steps")
    z.add_argument("--epochs", type=int, default=1, help="epochs of sparse training (masks enforced); 0 = prune only")
    z.add_argument("--dense-epochs", type=int, default=0, help="then epochs of dense fine-tuning (masks released)")
    z.add_argument("--sparse-output", help="with --dense-epochs: also save the model as it was after sparse training here")
    z.add_argument("--num-prompts", type=int, default=0, help="add this many soft prompt vectors (text models)")
    z.add_argument("--freeze-backbone", action="store_true", help="train only soft prompts and exit heads")
    z.add_argument("--teacher-distill", type=float, default=0.0, metavar="BETA",
                   help="weight in [0, 1] of distillation from the dense model given by --model: every exit head "
                        "also learns its full-depth distribution, in both stages (sequence-level tasks; default 0)")
    z.add_argument("--teacher-temperature", type=float, default=2.0, help="softening of --teacher-distill's targets")
    z.add_argument("--train", help="training data (default: the data recorded at training)")
    z.add_argument("--dev", help="dev data (default: the dev set recorded at training)")
    z.add_argument("--max-train", type=int, help="use at most this many training examples (default: as recorded)")
    z.add_argument("--max-dev", type=int)
    z.add_argument("--batch-size", type=int, default=16)
    z.add_argument("--lr", type=float, default=5e-5)
    z.add_argument("--head-lr", type=float, default=1e-3, help="exit heads and soft prompts")
    z.add_argument("--seed", type=int, default=42)
    z.add_argument("--device", default="cpu")
    z.add_argument("--no-progress", action="store_true")
    _add_data_args(z)
    _add_pickle_arg(z)
    z.set_defaults(func=cmd_sparsify)

    v = sub.add_parser("convert", help="rewrite a model directory's pickle weights as model.safetensors")
    v.add_argument("--model", required=True, help="local model directory holding pytorch_model.bin or model.pt")
    v.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 2 (the message on stderr) when its arguments or data are
    refused (a ``ValueError`` of the workflow, e.g. pickle weights without --allow-pickle-weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the command never downloads: models are directories
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        result = args.func(args)
    except ValueError as exc:  # a refusal, not a crash: the message says what to do
        log.debug("epee %s refused", args.command, exc_info=True)
        print(f"epee {args.command}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
