"""ExitHistogram: counts per exit layer -> mean exit layer, speedup, merge."""

import pytest

from epee.histogram import ExitHistogram


def test_mean_and_speedup_from_counts():
    h = ExitHistogram.of_layers([1, 2, 2, 4], num_layers=6)
    assert h.exits_per_layer == [1, 2, 0, 1, 0, 0]
    assert h.samples == 4 and h.layer_sum == 9 and h.num_layers == 6
    assert h.mean_exit_layer == 9 / 4
    assert h.speedup() == 6 / (9 / 4)
    assert h.speedup(12) == 12 / (9 / 4)


def test_empty_histogram_is_zero_not_an_error():
    h = ExitHistogram.of_depth(4)
    assert h.samples == 0 and h.mean_exit_layer == 0.0 and h.speedup() == 0.0
    assert ExitHistogram().num_layers == 0


def test_add_grows_and_merge_sums():
    a = ExitHistogram()
    a.add(3)
    a.add(1, count=2)
    assert a.counts == [2, 0, 1]
    b = ExitHistogram.of_layers([5])
    assert a.merge(b) is a and a.counts == [2, 0, 1, 0, 1]
    assert b.counts == [0, 0, 0, 0, 1]  # the other one is untouched


def test_mean_is_the_integer_ratio_bit_for_bit():
    layers = [1 + (i * 7) % 12 for i in range(1001)]
    assert ExitHistogram.of_layers(layers).mean_exit_layer == sum(layers) / len(layers)


@pytest.mark.parametrize("bad", [0, -1])
def test_layers_are_one_based(bad):
    with pytest.raises(ValueError, match="1-based"):
        ExitHistogram().add(bad)
    with pytest.raises(ValueError, match="num_layers"):
        ExitHistogram.of_depth(bad - 1)


def test_of_tensor_counts_what_of_layers_counts():
    import torch

    layers = torch.tensor([3, 1, 1, 6, 2, 3, 3])
    for depth in (0, 6, 8):
        assert ExitHistogram.of_tensor(layers, depth) == ExitHistogram.of_layers(layers.tolist(), depth)
    assert ExitHistogram.of_tensor(torch.zeros(0, dtype=torch.long), 4) == ExitHistogram.of_depth(4)
    with pytest.raises(ValueError, match="1-based"):
        ExitHistogram.of_tensor(torch.tensor([0, 1]))
