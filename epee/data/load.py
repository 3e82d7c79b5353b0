"""The entry point: a file or directory of ``task`` examples, images included."""

from __future__ import annotations

import io
import os

import numpy as np

from .events import token_example
from .example import Example
from .relations import load_ddi, relation_example
from .tables import _field, _suffix, open_uri, read_records

def load_npz_images(uri: str, split: str | None = None) -> list[Example]:
    with open_uri(uri, "rb") as fh:
        data = np.load(io.BytesIO(fh.read()), allow_pickle=False)
        keys = set(data.files)
        prefix = f"{split}_" if split and f"{split}_images" in keys else ""
        if f"{prefix}images" not in keys or f"{prefix}labels" not in keys:
            raise ValueError(f"{uri}: expected arrays '{prefix}images' and '{prefix}labels', found {sorted(keys)}")
        images, labels = data[f"{prefix}images"], data[f"{prefix}labels"].reshape(len(data[f"{prefix}images"]), -1)
    return [
        Example(id=f"{split or 'npz'}-{i:06d}", image=images[i], label=str(int(labels[i][0])))
        for i in range(len(images))
    ]


def load_image_table(uri: str, path_field: str, label_field: str, data: bytes | None = None) -> list[Example]:
    """A table of image paths (relative to the table) and, optionally, labels; an empty or
    missing label is None (labelled uses check for it: epee.workflows.data.load)."""
    from ..images import load_image_file

    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    out = []
    for n, row in enumerate(read_records(uri, data), start=1):
        where = f"{uri}: row {n}"
        rel = str(_field(row, path_field, where))
        full = rel if ("://" in rel or os.path.isabs(rel)) else f"{base}/{rel}"
        label = row.get(label_field)
        out.append(Example(id=rel, image=load_image_file(full), label=None if label in (None, "") else str(label)))
    return out


# -- entry point -----------------------------------------------------------------------------------
def load_examples(
    uri: str,
    task: str,
    *,
    text_field: str = "text",
    label_field: str = "label",
    id_field: str | None = None,
    image_field: str = "path",
    split: str | None = None,
    label_map: dict[str, str] | None = None,
    negative_label: str = "negative",
    data: bytes | None = None,
) -> list[Example]:
    """Read ``uri`` as examples of ``task`` ("sequence", "relation", "token" or "image");
    ``data``: a table's bytes, already read (``uri`` then only names it and anchors relative
    image paths)."""
    if task == "relation" and os.path.isdir(uri):
        examples = load_ddi(uri, negative_label=negative_label)
    elif task == "image" and _suffix(uri) == ".npz":
        examples = load_npz_images(uri, split)
    elif task == "image":
        examples = load_image_table(uri, image_field, label_field, data)
    else:
        examples = []
        for n, row in enumerate(read_records(uri, data), start=1):
            where = f"{uri}: row {n}"
            ex_id = str(row[id_field]) if id_field and row.get(id_field) not in (None, "") else f"row-{n}"
            if task == "sequence":
                label = row.get(label_field)
                examples.append(
                    Example(id=ex_id, text=str(_field(row, text_field, where)),
                            label=None if label in (None, "") else str(label))
                )
            elif task == "relation":
                examples.append(relation_example(row, where, text_field, label_field, ex_id))
            elif task == "token":
                examples.append(token_example(row, where, text_field, ex_id))
            else:
                raise ValueError(f"task ({task!r}) must be one of sequence, relation, token, image")
    if label_map:
        examples = [
            ex if ex.label is None else Example(**{**ex.__dict__, "label": label_map.get(ex.label, ex.label)})
            for ex in examples
        ]
    return examples
