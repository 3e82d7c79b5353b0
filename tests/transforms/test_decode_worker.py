"""The isolated DICOM decoder: a light child process fed batches of files, a hang or a crash
costs one file and the rest go to a fresh child; the pipelined decoder keeps input order."""

from pathlib import Path

import numpy as np
import pytest

from transforms.decode_worker import DecodeOutcome, IsolatedDecoder, PipelinedDecoder, decode_bytes


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


def _good() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def test_a_hang_and_a_crash_inside_one_batch_cost_those_two_files_only():
    good = _good()
    batch = [good, b"HANG" + b"\0" * 10, good, b"CRASH" + b"\0" * 10, good]
    d = IsolatedDecoder(timeout_s=2, decode_path="tests.hostile_corpus:hanging_decode")
    try:
        outcomes = d.decode_many([(x, "middle", 1 << 30) for x in batch])
        assert [o.reason for o in outcomes] == [None, "decode_timeout", None, "decoder_crashed", None]
        expected = decode_bytes(good, "middle", 1 << 30).pixels
        assert all(np.array_equal(outcomes[i].pixels, expected) for i in (0, 2, 4))
        assert d.restarts == 2
        # the batch went out as one message, then its rest twice more (after the hang, after the crash)
        assert d.batches == 3
    finally:
        d.close()


def test_a_child_lost_before_it_names_a_file_makes_the_batch_go_one_file_at_a_time(monkeypatch):
    d = IsolatedDecoder(timeout_s=2)
    sent = []

    def run_batch(batch, deliver):  # dies on any batch of several files, and on the single file b"bad"
        sent.append(len(batch))
        if len(batch) > 1 or batch[0][0] == b"bad":
            return 0, -1, DecodeOutcome(reason="decoder_crashed", message="lost")
        deliver(0, DecodeOutcome(pixels=batch[0][0]))
        return 1, -1, None

    monkeypatch.setattr(d, "_run_batch", run_batch)
    outcomes = d.decode_many([(x, "middle", 0) for x in (b"a", b"bad", b"c")])
    assert [(o.pixels, o.reason) for o in outcomes] == [(b"a", None), (None, "decoder_crashed"), (b"c", None)]
    assert sent == [3, 1, 1, 1]


def test_pipelined_decoder_answers_every_file_in_order_across_processes():
    good = _good()
    files = [good if i % 3 else b"not a dicom file" for i in range(40)] + [b"HANG" + b"\0" * 10, good]
    d = PipelinedDecoder(timeout_s=2, decode_path="tests.hostile_corpus:hanging_decode", processes=2, max_batch=8)
    try:
        futures = [d.submit(x, "middle", 1 << 30) for x in files]
        got = [f.result(timeout=60) for f in futures]
        for data, outcome in zip(files[:40] + files[41:], got[:40] + got[41:]):
            want = decode_bytes(data, "middle", 1 << 30)
            assert outcome.reason == want.reason
            assert (outcome.pixels is None) == (want.pixels is None)
            if want.pixels is not None:
                assert np.array_equal(outcome.pixels, want.pixels)
        assert got[40].reason == "decode_timeout"
        assert sum(dec.batches for dec in d.decoders) < len(files)  # files went out in batches
        procs = [dec._proc for dec in d.decoders]
    finally:
        d.close()
    assert all(p is None or p.poll() is not None for p in procs)


def test_pipelined_decoder_refuses_nonsense_sizes():
    with pytest.raises(ValueError, match="processes"):
        PipelinedDecoder(timeout_s=1, processes=0)
    with pytest.raises(ValueError, match="max_batch"):
        PipelinedDecoder(timeout_s=1, max_batch=0)


@pytest.mark.parametrize("part_bytes,batches", [(1, 1), (1 << 30, 2)])
def test_outcomes_leave_the_child_in_parts_so_a_crash_later_in_the_batch_costs_no_resend(part_bytes, batches):
    """With parts of any size the two good files' outcomes are out before the third file kills
    the child: nothing is sent again. Held to the end of the batch, they die with the child and
    go to a new one."""
    good = _good()
    d = IsolatedDecoder(timeout_s=30, decode_path="tests.hostile_corpus:hanging_decode", part_bytes=part_bytes)
    arrived = []
    try:
        outcomes = d.decode_many([(x, "middle", 1 << 30) for x in (good, good, b"CRASH" + b"\0" * 10)],
                                 lambda i, o: arrived.append(i))
    finally:
        d.close()
    assert [o.reason for o in outcomes] == [None, None, "decoder_crashed"]
    assert sorted(arrived) == [0, 1, 2]
    assert d.batches == batches


def test_pipelined_batches_stop_at_their_byte_budget():
    good = _good()
    d = PipelinedDecoder(timeout_s=30, max_batch_bytes=1)  # every file is over it: one file per batch
    try:
        assert all(f.result(timeout=60).reason is None for f in [d.submit(good, "middle", 1 << 30) for _ in range(6)])
        assert d.decoders[0].batches == 6
    finally:
        d.close()


def test_large_images_cross_the_pipe_as_raw_bytes_unchanged():
    import socket
    from multiprocessing.connection import Connection

    from transforms.decode_worker import RAW_BYTES, _RawPixels, _receive_part, _send_part

    rng = np.random.default_rng(0)
    big = [rng.integers(0, 4096, (600, 500)).astype(">u2"),  # big-endian, as some DICOM pixel data are
           rng.standard_normal((3, 300, 200)).astype(np.float64)[:, ::2],  # not contiguous
           (rng.random((700, 400, 3)) > 0.5)]
    small = rng.standard_normal((28, 28)).astype(np.float32)
    assert all(a.nbytes >= RAW_BYTES for a in big) and small.nbytes < RAW_BYTES
    sent = [DecodeOutcome(pixels=a.copy()) for a in big] + [DecodeOutcome(pixels=small), DecodeOutcome(reason="x")]
    a, b = socket.socketpair()
    left, right = Connection(a.detach()), Connection(b.detach())
    import threading

    writer = threading.Thread(target=_send_part, args=(left, sent))  # large messages fill the socket buffer
    writer.start()
    got = _receive_part(right)
    writer.join()
    assert sum(isinstance(o.pixels, _RawPixels) for o in sent) == 3  # the sender's outcomes stood in for them
    for want, outcome in zip(big + [small], got):
        assert outcome.pixels.dtype == want.dtype and np.array_equal(outcome.pixels, want)
    assert got[-1].pixels is None and got[-1].reason == "x"
    left.close()
    right.close()


def test_concurrent_first_submits_start_one_thread_per_child():
    """SharedDecoders hands one pool to many DoFn threads: their first submits race to start the
    pool's threads, and exactly one thread per child may result."""
    import threading

    good = _good()
    d = PipelinedDecoder(timeout_s=30, processes=2)
    barrier = threading.Barrier(8)
    futures: list = []

    def first_submit():
        barrier.wait()
        futures.append(d.submit(good, "middle", 1 << 30))

    callers = [threading.Thread(target=first_submit) for _ in range(8)]
    try:
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        assert all(f.result(timeout=60).reason is None for f in futures) and len(futures) == 8
        names = [t.name for t in threading.enumerate() if t.name.startswith("dicom-decoder-")]
        assert sorted(names) == ["dicom-decoder-0", "dicom-decoder-1"]
    finally:
        d.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("dicom-decoder-")]


def test_shared_decoders_give_one_pool_per_setting_and_the_last_release_closes_it():
    from transforms.decode_worker import SharedDecoders

    good = _good()
    a = SharedDecoders.acquire(30, "transforms.decode_worker:decode_bytes", 1)
    b = SharedDecoders.acquire(30.0, "transforms.decode_worker:decode_bytes", 1)
    other = SharedDecoders.acquire(30, "transforms.decode_worker:decode_bytes", 2)
    try:
        assert a is b and other is not a and SharedDecoders.users(a) == 2 and SharedDecoders.users(other) == 1
        assert a.submit(good, "middle", 1 << 30).result(timeout=60).reason is None
        child = a.decoders[0]._proc
        SharedDecoders.release(b)
        assert child.poll() is None and SharedDecoders.users(a) == 1  # a still uses it
        assert a.submit(good, "middle", 1 << 30).result(timeout=60).reason is None
        SharedDecoders.release(a)
        assert SharedDecoders.users(a) == 0 and child.wait(timeout=30) is not None  # closed with its last user
        c = SharedDecoders.acquire(30, "transforms.decode_worker:decode_bytes", 1)
        assert c is not a  # a closed pool is never handed out again
        SharedDecoders.release(c)
        SharedDecoders.release(c)  # a second release of a closed pool does nothing
    finally:
        SharedDecoders.release(other)
    assert SharedDecoders.users(other) == 0
