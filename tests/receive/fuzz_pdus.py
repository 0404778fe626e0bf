"""A seeded mutator of raw PDUs; the PDU builders and client are dicom_node.bench.pdus."""

from __future__ import annotations

import random
import struct

# The fuzz tests use the builders under this module's name (raw.p_data, raw.RawClient...).
from dicom_node.bench.pdus import (  # noqa: F401
    ASSOCIATE_AC,
    COMMAND_LAST,
    DATASET_FRAGMENT,
    DATASET_LAST,
    RawClient,
    Reply,
    abort_pdu,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    command_set,
    encode,
    item,
    p_data,
    pdu,
    release_rq,
)

# --------------------------------------------------------------------------- the mutator


INTERESTING_32 = (0, 1, 2, 0x7F, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)
INTERESTING_16 = (0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFE, 0xFFFF)


def mutate(data: bytes, rng: random.Random, *, rounds: int | None = None) -> bytes:
    """A few random edits of `data`: bit flips, byte runs, lengths set to edge values,
    truncation, insertion, duplication. Deterministic for a seeded `rng`."""
    out = bytearray(data)
    for _ in range(rounds or rng.randint(1, 4)):
        if not out:
            out += rng.randbytes(rng.randint(1, 16))
            continue
        where = rng.randrange(len(out))
        kind = rng.randrange(7)
        if kind == 0:
            out[where] ^= 1 << rng.randrange(8)
        elif kind == 1:
            run = rng.randint(1, 8)
            out[where : where + run] = rng.randbytes(run)
        elif kind == 2:
            out[where : where + 4] = struct.pack(rng.choice("<>") + "L", rng.choice(INTERESTING_32))
        elif kind == 3:
            out[where : where + 2] = struct.pack(rng.choice("<>") + "H", rng.choice(INTERESTING_16))
        elif kind == 4:
            del out[where:]
        elif kind == 5:
            out[where:where] = rng.randbytes(rng.randint(1, 64))
        else:
            end = min(len(out), where + rng.randint(1, 256))
            out[where:where] = out[where:end]
    return bytes(out)
