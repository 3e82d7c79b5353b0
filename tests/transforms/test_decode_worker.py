"""The isolated DICOM decoder: a light child process, one file per round trip, a hang or a crash
costs one file and the next file gets a fresh child."""

from pathlib import Path

import numpy as np
import pytest

from transforms.decode_worker import IsolatedDecoder


def test_the_decoder_process_imports_neither_torch_nor_beam_nor_the_parent_main():
    # importing the parent's main module (what multiprocessing's spawn does) cost 3-4 s per start
    d = IsolatedDecoder(timeout_s=30, decode_path="tests.hostile_corpus:heavy_modules_decode")
    try:
        assert d.decode(b"", "middle", 0).pixels == []
    finally:
        d.close()


def test_hang_and_crash_cost_one_file_and_the_next_file_decodes():
    from pydicom.data import get_testdata_file

    good = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    d = IsolatedDecoder(timeout_s=2, decode_path="tests.hostile_corpus:hanging_decode")
    try:
        first = d.decode(good, "middle", 1 << 30)
        assert first.reason is None and first.pixels.shape == (128, 128)
        assert d.decode(b"HANG" + b"\0" * 10, "middle", 1 << 30).reason == "decode_timeout"
        again = d.decode(good, "middle", 1 << 30)
        assert again.reason is None and np.array_equal(again.pixels, first.pixels)
        assert d.decode(b"CRASH" + b"\0" * 10, "middle", 1 << 30).reason == "decoder_crashed"
        assert d.decode(good, "middle", 1 << 30).reason is None
        assert d.restarts == 2
        proc = d._proc
    finally:
        d.close()
    assert proc.poll() is not None  # close() leaves no child behind


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        IsolatedDecoder(timeout_s=0)
