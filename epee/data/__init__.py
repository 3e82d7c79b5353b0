"""Labelled data for training, calibration and evaluation: readers for the documented formats.

Formats (see the README's "Data formats" section for examples):

* tables: JSONL, CSV or Parquet, local or ``s3://`` / ``gs://``, one example per row;
* relation extraction: a text with its two entities either as character offsets
  (``e1_start, e1_end, e2_start, e2_end``, end exclusive) or as inline markers in the text
  (``<< e1 >> ... [[ e2 ]]`` as ChemProt, ``[E1] e1 [/E1] ... [E2] e2 [/E2]``, or
  ``<e1>e1</e1> ... <e2>e2</e2>``); or a directory of DDI 2013 XML files;
* event extraction: the PHEE JSONL layout (``context`` + ``annotations`` with character offsets
  of trigger and arguments), or rows with ``text`` and ``spans: [{"type", "start", "end"}]``;
* images: a NumPy ``.npz`` (``images``/``labels`` or ``<split>_images``/``<split>_labels``), or a
  table with an image ``path`` column (DICOM, PNG or ``.npy``, relative to the table) and a label.

The package, one job a module: :mod:`.example` (the :class:`Example` record), :mod:`.tables`
(JSONL, CSV and Parquet rows, local or remote), :mod:`.relations` and :mod:`.events` (one row to
one example of those tasks), :mod:`.load` (:func:`load_examples`, images included), :mod:`.splits`
(train/dev split, subsampling).

Error messages name rows and fields, never the text in them: the text may be a clinical note.
"""

from __future__ import annotations

from .events import PHEE_MAIN_ARGUMENTS, phee_example, token_example
from .example import Example, Span
from .load import load_examples, load_image_table, load_npz_images
from .relations import load_ddi, relation_example, strip_entity_markers
from .splits import iter_labels, split_examples, subsample
from .tables import open_uri, read_label_map, read_records

__all__ = [
    "PHEE_MAIN_ARGUMENTS", "Example", "Span", "iter_labels", "load_ddi", "load_examples", "load_image_table",
    "load_npz_images", "open_uri", "phee_example", "read_label_map", "read_records", "relation_example",
    "split_examples", "strip_entity_markers", "subsample", "token_example",
]
