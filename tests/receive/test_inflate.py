"""Deflated data sets are inflated to disk a megabyte at a time, bounded, and exactly.

A deflate stream holds output in zlib's window that comes out only when asked again with
no new input: the last chunk of input can be consumed while megabytes of output are still
to come (a stream of zeros does that). Each of these streams must inflate to what was
deflated, whatever its length.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from dicom_node.receive.handlers import INFLATE_CHUNK, InstanceRefused, _inflate
from dicom_node.receive.spool import StorageLimits
from dicom_node.store import InstanceStore

PREFIX = b"\x00" * 132  # stands for the spool's preamble and File Meta, skipped by offset


def deflated(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.fixture
def store(tmp_path) -> InstanceStore:
    return InstanceStore(tmp_path / "data", fsync=False)


@pytest.mark.parametrize("head", range(0, 2000, 37))
def test_streams_of_every_length_inflate_exactly(store, tmp_path, head):
    # A few hundred bytes of elements, then megabytes of zeros: as a deflate bomb, or an
    # image of a constant. With 185 of them, zlib has consumed all of the input while
    # 185 bytes of output still wait in its window (found sending the benchmark's bomb).
    original = b"h" * head + bytes(4 * INFLATE_CHUNK)
    spool = tmp_path / "spool"
    spool.write_bytes(PREFIX + deflated(original))
    target = tmp_path / "inflated"
    _inflate(spool, len(PREFIX), target, limits=StorageLimits(1 << 30, 0), store=store)
    assert target.read_bytes() == original


def test_a_stream_cut_short_is_refused(store, tmp_path):
    spool = tmp_path / "spool"
    spool.write_bytes(PREFIX + deflated(bytes(2 * INFLATE_CHUNK) + b"x" * 1000)[:-200])
    with pytest.raises(InstanceRefused, match="deflate stream ends early"):
        _inflate(spool, len(PREFIX), tmp_path / "inflated", limits=StorageLimits(1 << 30, 0), store=store)


def test_a_stream_inflating_past_the_cap_stops_there(store, tmp_path):
    spool = tmp_path / "spool"
    spool.write_bytes(PREFIX + deflated(bytes(64 * INFLATE_CHUNK)))
    target = tmp_path / "inflated"
    with pytest.raises(InstanceRefused, match="node.max_dataset_megabytes"):
        _inflate(spool, len(PREFIX), target, limits=StorageLimits(8 * INFLATE_CHUNK, 0), store=store)
    assert Path(target).stat().st_size <= 8 * INFLATE_CHUNK
