"""What a model directory's epee_config.json must hold, checked in one place.

:data:`REQUIRED_FIELDS` lists every entry the loader reads; :func:`validate_config` checks a
document against it (pure: the document only, no files), so the pipelines' start-up check refuses
exactly what a worker would fail on. :func:`read_config` reads and checks a local directory's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import HEAD_INPUTS, POLICY_KINDS, POOLINGS, TASKS, EarlyExitConfig
from .encoding import TextSettings
from .modeling import EPEE_CONFIG_NAME

if TYPE_CHECKING:  # images.py imports pydicom; text-only processes never need it
    from .images import ImageSettings


@dataclass(frozen=True)
class ConfigField:
    """One entry of epee_config.json, by its dotted path (``model.policy.patience``): what it must
    be, in our words, and the check; ``applies`` narrows it to text or image model directories."""

    path: str
    expected: str
    ok: Callable[[Any], bool]
    applies: Callable[[dict], bool] = lambda doc: True


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _one_of(choices: tuple) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _text(doc: dict) -> bool:
    return doc["preprocessing"]["input"] == "text"


def _image(doc: dict) -> bool:
    return doc["preprocessing"]["input"] == "image"


def _channels(v: Any) -> bool:
    from .images import CHANNEL_COUNTS

    return isinstance(v, int) and not isinstance(v, bool) and v in CHANNEL_COUNTS


def _frame_policy(v: Any) -> bool:
    from .images import FRAME_POLICIES

    return isinstance(v, str) and v in FRAME_POLICIES


_OBJECT = "a JSON object"
DATA_TASKS = (*TASKS, "image")  # preprocessing.data_task: an image model's exit heads run task "sequence"

# Every entry the loader reads, in the order they are checked (a section before its fields). All are
# written by save_model_dir; a missing one is refused rather than defaulted, because a default
# (max_length 256, the uncalibrated exit policy, [CLS] pooling) would run a different model silently.
REQUIRED_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("model", _OBJECT, lambda v: isinstance(v, dict)),
    ConfigField("model.task", f"one of {', '.join(TASKS)}", _one_of(TASKS)),
    ConfigField("model.label_names", "a list of at least 2 distinct label names (strings)",
                lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(n, str) for n in v)
                and len(set(v)) == len(v)),
    ConfigField("model.policy", _OBJECT, lambda v: isinstance(v, dict)),
    ConfigField("model.policy.kind", f"one of {', '.join(POLICY_KINDS)}", _one_of(POLICY_KINDS)),
    ConfigField("model.policy.entropy_threshold", "a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
    ConfigField("model.policy.patience", "an integer >= 1", _int_at_least(1)),
    ConfigField("model.policy.min_exit_layer", "an integer >= 1", _int_at_least(1)),
    ConfigField("model.pooling", f"one of {', '.join(POOLINGS)}", _one_of(POOLINGS)),
    ConfigField("model.num_prompts", "an integer >= 0", _int_at_least(0)),
    ConfigField("model.prompt_position", "an integer >= 0", _int_at_least(0)),
    ConfigField("model.head_input", f"one of {', '.join(HEAD_INPUTS)}", _one_of(HEAD_INPUTS)),
    ConfigField("preprocessing", _OBJECT, lambda v: isinstance(v, dict)),
    ConfigField("preprocessing.input", "text or image", _one_of(("text", "image"))),
    ConfigField("preprocessing.data_task", f"one of {', '.join(DATA_TASKS)}", _one_of(DATA_TASKS)),
    ConfigField("preprocessing.text", _OBJECT, lambda v: isinstance(v, dict), _text),
    ConfigField("preprocessing.text.max_length", "an integer >= 8", _int_at_least(8), _text),
    ConfigField("preprocessing.text.relation_markers", "a list of 4 non-blank strings",
                lambda v: isinstance(v, list) and len(v) == 4 and all(isinstance(m, str) and m.strip() for m in v),
                _text),
    ConfigField("preprocessing.image", _OBJECT, lambda v: isinstance(v, dict), _image),
    ConfigField("preprocessing.image.image_size", "an integer >= 1", _int_at_least(1), _image),
    ConfigField("preprocessing.image.num_channels", "1 (grey) or 3 (RGB)", _channels, _image),
    ConfigField("preprocessing.image.mean", "a list of finite numbers, one per channel",
                lambda v: isinstance(v, list) and bool(v) and all(_number(x) for x in v), _image),
    ConfigField("preprocessing.image.std", "a list of numbers > 0, one per channel",
                lambda v: isinstance(v, list) and bool(v) and all(_number(x) and x > 0 for x in v), _image),
    ConfigField("preprocessing.image.frame_policy", "middle or all", _frame_policy, _image),
    ConfigField("files", "a list of the directory's relative file names",
                lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
)

# Checked only where present: they do not change what a loaded model predicts (head_dropout acts in
# training, negative_label in scoring) or were recorded later (weights).
OPTIONAL_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("model.head_dropout", "a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    ConfigField("model.negative_label", "null or one of model.label_names", lambda v: v is None or isinstance(v, str)),
    ConfigField("model_id", "a string", lambda v: isinstance(v, str)),
    ConfigField("weights", _OBJECT, lambda v: isinstance(v, dict)),
    ConfigField("weights.file", "a file name of the directory", lambda v: isinstance(v, str) and bool(v)),
    ConfigField("weights.sha256", "64 hexadecimal digits",
                lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdefABCDEF" for c in v)),
)

_MISSING = object()


def _lookup(doc: dict, path: str) -> Any:
    node: Any = doc
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _missing_message(path: str) -> str:
    if path == "preprocessing":
        return (f"{EPEE_CONFIG_NAME} has no preprocessing section: the tokenizer or image settings the model was "
                "trained with are unknown, and running with default settings would silently differ from them; "
                "save the directory again with `epee train` (or epee.modeldir.save_model_dir)")
    return f"{EPEE_CONFIG_NAME} has no {path}, which the loader needs; save the directory again with `epee train`"


def validate_config(doc: Any) -> None:
    """Refuse an epee_config.json the loader could not use as written: a missing entry of
    :data:`REQUIRED_FIELDS`, an entry of the wrong type or value, or sections that disagree.

    Pure (the document only, no files): the loader and the pipelines' start-up check both call it,
    so what is refused before a job starts is exactly what a worker would fail on. Raises
    ``ValueError`` naming the field; the message never quotes the document's values."""
    if not isinstance(doc, dict):
        raise ValueError(f"{EPEE_CONFIG_NAME} is not a JSON object")
    for spec, required in [(f, True) for f in REQUIRED_FIELDS] + [(f, False) for f in OPTIONAL_FIELDS]:
        if not spec.applies(doc):
            continue
        value = _lookup(doc, spec.path)
        if value is _MISSING:
            if required:
                raise ValueError(_missing_message(spec.path))
            continue
        if not spec.ok(value):
            raise ValueError(f"{EPEE_CONFIG_NAME}: {spec.path} must be {spec.expected}")
    model, prep = doc["model"], doc["preprocessing"]
    if model.get("negative_label") is not None and model["negative_label"] not in model["label_names"]:
        raise ValueError(f"{EPEE_CONFIG_NAME}: model.negative_label must be one of model.label_names")
    if _image(doc) != (prep["data_task"] == "image"):
        raise ValueError(f"{EPEE_CONFIG_NAME}: preprocessing.data_task must be image exactly when preprocessing.input is")
    if ("sequence" if _image(doc) else prep["data_task"]) != model["task"]:  # an image model's heads classify
        raise ValueError(f"{EPEE_CONFIG_NAME}: preprocessing.data_task disagrees with model.task")
    if _image(doc) and not len(prep["image"]["mean"]) == len(prep["image"]["std"]) == prep["image"]["num_channels"]:
        raise ValueError(f"{EPEE_CONFIG_NAME}: preprocessing.image.mean and .std need one value per channel")
    # the frozen configs' own rules as well (unknown keys among them), in case they grow ahead of the list
    for section, build in (("model", lambda: EarlyExitConfig.from_dict(model)), ("preprocessing", lambda: preprocessing_settings(prep))):
        try:
            build()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{EPEE_CONFIG_NAME}: its {section} section is not valid ({type(exc).__name__}: "
                             "unknown keys or values out of range)") from None


def preprocessing_settings(prep: dict) -> TextSettings | ImageSettings:
    """The preprocessing settings of a validated ``preprocessing`` section (text or image)."""
    if prep["input"] == "image":
        from .images import ImageSettings

        return ImageSettings.from_dict(prep["image"])
    return TextSettings.from_dict(prep["text"])


def backbone_num_layers(config: Any) -> int:
    """The number of transformer layers in a backbone's config.json (BERT, ALBERT and ViT name it
    num_hidden_layers, GPT-2 n_layer); ``ValueError`` naming the field where it is missing."""
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError("config.json has no model_type (not a transformers backbone config)")
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    if not _int_at_least(1)(layers):
        raise ValueError("config.json has no num_hidden_layers (or n_layer) that is an integer >= 1")
    return layers


def read_config(directory: Path) -> dict:
    """A local model directory's epee_config.json, validated (:func:`validate_config`), and its
    backbone's config.json checked for the layer count (:func:`backbone_num_layers`)."""
    doc = json.loads((directory / EPEE_CONFIG_NAME).read_text())
    validate_config(doc)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model directory {directory} has no config.json")
    backbone_num_layers(json.loads((directory / "config.json").read_text()))
    return doc
