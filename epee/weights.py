"""Which file of a model directory holds the weights, and the rule for pickle files.

Weights load from safetensors. A pickle file (``torch.save``: ``pytorch_model.bin``, ``model.pt``,
...) can execute code when it is loaded, so a directory whose weights are only a pickle is
refused unless the caller passes ``allow_pickle=True`` (``--allow_pickle_weights`` in the
pipelines, ``--allow-pickle-weights`` in the ``epee`` CLI); even then the file goes through
PyTorch's restricted unpickler, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "model.bin", "model.ckpt", "model.pkl")
# Pickle files a training run leaves next to its weights that are not weights (transformers' Trainer).
NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"})
PIPELINE_FLAG, CLI_FLAG = "--allow_pickle_weights", "--allow-pickle-weights"


class PickleWeightsRefused(ValueError):
    """A model directory's weights are a pickle file and were not loaded (see ``allow_pickle``)."""


def choose_weights_file(names: Iterable[str]) -> str | None:
    """The weights file among a model directory's file names (relative, as in ``epee_config.json``
    ``"files"``): ``model.safetensors`` whenever present, else a top-level pickle weights file
    (a well-known name first, else the only candidate), else None."""
    names = set(names)
    if WEIGHTS_NAME in names:
        return WEIGHTS_NAME
    for name in PICKLE_WEIGHTS_NAMES:
        if name in names:
            return name
    pickles = sorted(n for n in names if "/" not in n and Path(n).suffix in PICKLE_SUFFIXES and n not in NOT_WEIGHTS)
    if len(pickles) > 1:
        raise ValueError(f"model directory has no {WEIGHTS_NAME} and several pickle files {pickles}: which one "
                         f"holds the weights is unclear; rename it {PICKLE_WEIGHTS_NAMES[0]} (then `epee convert` "
                         f"turns it into {WEIGHTS_NAME})")
    return pickles[0] if pickles else None


def is_pickle_weights(name: str) -> bool:
    return name != WEIGHTS_NAME and Path(name).suffix in PICKLE_SUFFIXES


def pickle_refusal_message(where: str, name: str, convert: str | None = None) -> str:
    """Why ``name`` is not loaded, and the two ways forward (``convert``: how to convert it)."""
    convert = convert or f"`epee convert --model DIR` writes {WEIGHTS_NAME} and removes {name}"
    return (
        f"{where}: the weights are a pickle file ({name}) and there is no {WEIGHTS_NAME}. Loading a pickle "
        f"can execute code hidden in it, so it is refused. Convert it once, where you trust the file: "
        f"{convert}. Or pass {PIPELINE_FLAG} "
        f"(pipelines) / {CLI_FLAG} (epee CLI) / allow_pickle=True (Python) to load it with PyTorch's "
        f"restricted unpickler (torch.load weights_only=True: tensors and plain containers only)."
    )


def load_pickle_state_dict(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state dict from a pickle weights file, through ``torch.load(weights_only=True)``.

    PyTorch's restricted unpickler builds only tensors, numbers, strings and plain containers;
    a pickle that references anything else (``os.system``, ``builtins.exec``, a class of its own)
    is refused before that object is built, so the code it carries never runs. Accepts a plain
    state dict or ``{"state_dict": {...}}`` (the common checkpoint layout); anything else is
    refused with :class:`PickleWeightsRefused`.
    """
    import pickle

    path = Path(path)
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message suggests weights_only=False; only the offending global is worth repeating.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = (f"it references {found.group(1)}, which is not a tensor or a plain container" if found
                else "it is not a pickle of tensors and plain containers")
        raise PickleWeightsRefused(
            f"{path.name}: refused by PyTorch's restricted unpickler (weights_only=True): {what}. Nothing in it "
            f"was executed. Do not load it with weights_only=False unless you wrote the file yourself; "
            f"ask for {WEIGHTS_NAME} instead"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:  # truncated or not a torch.save file at all
        raise PickleWeightsRefused(f"{path.name}: not a readable PyTorch weights file ({type(exc).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise PickleWeightsRefused(f"{path.name}: not a state dict (name -> tensor), nor {{'state_dict': ...}}")
    return obj


def weights_path(directory: str | os.PathLike) -> Path | None:
    """The weights file ``EarlyExitModel.from_pretrained`` reads in ``directory`` (None: none)."""
    src = Path(directory)
    names = [p.name for p in src.iterdir() if p.is_file()] if src.is_dir() else []
    name = choose_weights_file(names)
    return src / name if name else None


def refuse_pickle_backbone(directory: str | os.PathLike, allow_pickle: bool) -> None:
    """A pretrained transformers directory (``epee train --backbone``) follows the same rule:
    without ``allow_pickle`` one whose weights are only pickle files is refused here, before
    transformers would read them."""
    src = Path(directory)
    if allow_pickle or not src.is_dir() or any(src.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in src.iterdir() if is_pickle_weights(p.name) and p.name not in NOT_WEIGHTS)
    if pickles:
        raise PickleWeightsRefused(pickle_refusal_message(
            f"backbone directory {src}", pickles[0],
            convert=f"transformers' `AutoModel.from_pretrained(DIR).save_pretrained(DIR)` writes {WEIGHTS_NAME}"))


# --------------------------------------------------------------------------------------------------
# Integrity of a weights file, checked at start-up without loading a tensor
# --------------------------------------------------------------------------------------------------

# Bits per element of each safetensors dtype (safetensors' Dtype::bitsize); F4 and F6 pack elements.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64,
    "F64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses longer headers (MAX_HEADER_SIZE)
HASH_CHUNK_BYTES = 1 << 20  # weights are streamed in 1 MiB chunks: start-up memory stays flat for any model size


class WeightsFileError(ValueError):
    """A weights file that cannot be what its model directory says; the message is ours and never
    quotes the file's content (its header is free text to whoever wrote it)."""


def _read_exactly(fh: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the file (object-store streams return short reads)."""
    parts, left = [], n
    while left:
        part = fh.read(min(left, HASH_CHUNK_BYTES))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def safetensors_data_bytes(header: object) -> int:
    """The bytes of tensor data a parsed safetensors header describes: every tensor's dtype and shape
    must match its ``data_offsets``, and the tensors must tile the data section from 0 without gap or
    overlap (what safetensors itself requires before it reads a tensor)."""
    if not isinstance(header, dict):
        raise WeightsFileError(f"{WEIGHTS_NAME}: its header is not a JSON object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not isinstance(entry, dict):
                raise WeightsFileError(f"{WEIGHTS_NAME}: its header's __metadata__ is not a JSON object")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WeightsFileError(f"{WEIGHTS_NAME}: a tensor entry of its header lacks dtype, shape or data_offsets")
        bits = SAFETENSORS_DTYPE_BITS.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        shape, offsets = entry["shape"], entry["data_offsets"]
        if bits is None:
            raise WeightsFileError(f"{WEIGHTS_NAME}: a tensor of its header has a dtype safetensors does not define")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise WeightsFileError(f"{WEIGHTS_NAME}: a tensor of its header has a shape that is not a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
            raise WeightsFileError(f"{WEIGHTS_NAME}: a tensor of its header has data_offsets that are not two offsets")
        numel = 1
        for d in shape:
            numel *= d
        begin, end = offsets
        if end < begin or (end - begin) * 8 != numel * bits:
            raise WeightsFileError(f"{WEIGHTS_NAME}: a tensor's data_offsets disagree with its dtype and shape")
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise WeightsFileError(f"{WEIGHTS_NAME}: its tensors overlap or leave gaps in the data section")
        covered = end
    return covered


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_weights_stream(fh: BinaryIO, name: str, recorded_sha256: str | None = None) -> str:
    """Check one weights file read front to back, once, and return its SHA-256 (hex).

    ``model.safetensors``: the 8-byte header length, the JSON header, every tensor's dtype x shape
    against its ``data_offsets``, and the data section's size against the file's, so a file cut
    short, padded, or with a garbled header is refused before any worker loads it. No tensor is
    built: the data is only hashed, in 1 MiB chunks. A pickle weights file is only hashed (its
    format is checked by the restricted unpickler when it is loaded). With ``recorded_sha256``
    (epee_config.json ``weights.sha256``), a file whose bytes differ from the ones saved is refused.
    Raises :class:`WeightsFileError`; only our own words and byte counts reach its message."""
    digest = hashlib.sha256()
    size = 0
    if name == WEIGHTS_NAME:
        prefix = _read_exactly(fh, 8)
        digest.update(prefix)
        if len(prefix) < 8:
            raise WeightsFileError(f"{WEIGHTS_NAME} is cut short: {len(prefix)} bytes, less than its 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if not 2 <= header_len <= MAX_HEADER_BYTES:
            raise WeightsFileError(f"{WEIGHTS_NAME}: its header length ({header_len} bytes) is not that of a "
                                   "safetensors file (corrupt or not safetensors)")
        raw = _read_exactly(fh, header_len)
        digest.update(raw)
        if len(raw) < header_len:
            raise WeightsFileError(f"{WEIGHTS_NAME} is cut short inside its header ({8 + len(raw)} bytes; the header "
                                   f"alone needs {8 + header_len})")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise WeightsFileError(f"{WEIGHTS_NAME}: its header is not valid JSON (corrupt or not safetensors)") from None
        expected = safetensors_data_bytes(header)
        for chunk in iter(lambda: fh.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
            size += len(chunk)
        if size != expected:
            how = "cut short in its tensor data" if size < expected else "longer than its tensors"
            raise WeightsFileError(f"{WEIGHTS_NAME} is {how}: its header describes {expected} bytes of tensor "
                                   f"data, the file holds {size}")
    else:
        for chunk in iter(lambda: fh.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    sha256 = digest.hexdigest()
    if recorded_sha256 is not None and sha256 != recorded_sha256.lower():
        raise WeightsFileError(f"{name}: the weights do not match the SHA-256 recorded in epee_config.json "
                               "(changed or damaged since the model directory was saved)")
    return sha256
