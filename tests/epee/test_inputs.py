"""EncodedSample travels between Beam stages as numpy arrays and comes back the same."""

import pickle

import pytest
import torch

from epee import EarlyExitEngine, EngineConfig
from epee.inputs import EncodedSample
from tests.conftest import FAMILY_TASKS, make_samples
from tests.epee.test_engine import assert_same_predictions, epee_model


def assert_same_sample(a: EncodedSample, b: EncodedSample) -> None:
    for name in ("input_ids", "token_type_ids", "pixel_values", "token_mask"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and torch.equal(x, y), name
    assert a.entity_positions == b.entity_positions


@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_pickled_samples_come_back_equal_and_predict_the_same(family, task):
    samples = make_samples(family, task, n=12)
    blob = pickle.dumps(samples, pickle.HIGHEST_PROTOCOL)
    assert b"_rebuild_tensor" not in blob and b"torch.storage" not in blob  # arrays, not torch.save
    back = pickle.loads(blob)
    for a, b in zip(samples, back):
        assert_same_sample(a, b)
    model = epee_model(family, task, samples)
    engine = EarlyExitEngine(model, EngineConfig(batch_size=5))
    assert_same_predictions(engine.run(back).predictions, engine.run(samples).predictions)


def test_unpickled_tensors_are_writable_and_the_checks_still_run():
    s = EncodedSample(input_ids=torch.tensor([101, 7, 102]), token_mask=torch.tensor([False, True, False]))
    back = pickle.loads(pickle.dumps(s))
    back.input_ids[1] = 9  # its own memory, not the pickle's buffer
    assert s.input_ids[1] == 7 and back.input_ids[1] == 9
    from epee.inputs import _rebuild_sample

    with pytest.raises(ValueError, match="token_mask has shape"):  # a rebuilt sample is validated as a new one
        _rebuild_sample(s.input_ids.numpy(), None, None, None, s.token_mask.numpy()[:2])


def test_beam_coder_round_trip():
    from apache_beam.coders.typecoders import registry

    s = EncodedSample(input_ids=torch.tensor([101, 5, 102]), token_type_ids=torch.zeros(3, dtype=torch.long))
    coder = registry.get_coder(object)  # what RunInference's batches of samples are encoded with
    (back,) = coder.decode(coder.encode([s]))
    assert_same_sample(s, back)
