"""Which file of a model directory holds the weights, and the rule for pickle files.

Weights load from safetensors. A pickle file (``torch.save``: ``pytorch_model.bin``, ``model.pt``,
...) can execute code when it is loaded, so a directory whose weights are only a pickle is
refused unless the caller passes ``allow_pickle=True`` (``--allow_pickle_weights`` in the
pipelines, ``--allow-pickle-weights`` in the ``epee`` CLI); even then the file goes through
PyTorch's restricted unpickler, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

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
