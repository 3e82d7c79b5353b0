"""Every written record maps one-to-one to its Parquet schema: the same field names in the same
order, and each field's Python type to the Arrow type its column holds."""

import dataclasses
import types
import typing

import pyarrow as pa
import pytest

from transforms.records import (
    DEAD_LETTER_SCHEMA, EXIT_STATS_SCHEMA, INPUTS_SCHEMA, PREDICTION_SCHEMA, DeadLetter, ExitStats, InputFile,
    PredictionRecord,
)
from transforms.writers import OUTPUT_SCHEMAS

PAIRS = {"predictions": (PredictionRecord, PREDICTION_SCHEMA), "dead_letters": (DeadLetter, DEAD_LETTER_SCHEMA),
         "exit_stats": (ExitStats, EXIT_STATS_SCHEMA), "inputs": (InputFile, INPUTS_SCHEMA)}


def arrow_matches(hint, arrow: pa.DataType) -> bool:
    """Whether a column of ``arrow`` holds values of the Python type ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: a nullable column of X
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return arrow_matches(inner, arrow)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return pa.types.is_list(arrow) and arrow_matches(item, arrow.value_type)
    return {str: pa.types.is_string, int: pa.types.is_integer, float: pa.types.is_floating,
            dict: pa.types.is_struct}[hint](arrow)


def test_every_written_output_has_a_record():
    assert set(PAIRS) == set(OUTPUT_SCHEMAS)
    assert all(OUTPUT_SCHEMAS[k] is schema for k, (_, schema) in PAIRS.items())


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_record_fields_are_the_schema_columns(kind):
    record, schema = PAIRS[kind]
    hints = typing.get_type_hints(record)
    fields = [f.name for f in dataclasses.fields(record)]
    assert fields == schema.names
    wrong = [(name, hints[name], schema.field(name).type) for name in fields
             if not arrow_matches(hints[name], schema.field(name).type)]
    assert not wrong


def test_a_record_row_round_trips_through_its_schema():
    row = InputFile("s3://b/notes.jsonl", 12, None, "processed", 3, "r1").to_row()
    assert pa.Table.from_pylist([row], schema=INPUTS_SCHEMA).to_pylist() == [row]
