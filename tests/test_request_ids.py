"""Issue 17: request ids drawn from a pool of `os.urandom` bytes are still random version 4 UUIDs,
and a forked process (the bridge's workers) never repeats its parent's."""

from __future__ import annotations

import os
import uuid

from gitfaas import subjects
from gitfaas.subjects import check_request_id, new_request_id

COUNT = 10_000
# The 6 bits a version 4 UUID fixes: the version nibble and the two variant bits.
FIXED_BITS = (0xF << 76) | (0x3 << 62)


def test_ten_thousand_ids_are_distinct_version_4_uuids_in_their_usual_text() -> None:
    ids = [new_request_id() for _ in range(COUNT)]
    assert len(set(ids)) == COUNT
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4, text
        assert parsed.variant == uuid.RFC_4122, text
        assert str(parsed) == text, "lower case, 8-4-4-4-12"
        assert check_request_id(text) == text


def test_every_other_bit_is_random() -> None:
    """The version and variant masks change 6 bits and no other: over 10,000 ids each of the other 122
    bits is seen both set and clear (a bit stuck by a wrong mask or a short read would not be)."""
    values = [uuid.UUID(new_request_id()).int for _ in range(COUNT)]
    ever_set = ever_clear = 0
    for value in values:
        ever_set |= value
        ever_clear |= ~value
    random_bits = ((1 << 128) - 1) & ~FIXED_BITS
    assert ever_set & random_bits == random_bits
    assert ever_clear & random_bits == random_bits


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    # Just after the pool is refilled, so that without the reset at fork the child would draw exactly the
    # parent's next ids (at the end of a pool both would refill from os.urandom and differ anyway).
    new_request_id()
    for _ in range(1000):
        if getattr(subjects, "_random_at", 16) == 16:
            break
        new_request_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id to the pipe, then leave without running pytest's teardown
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, "".join(new_request_id() for _ in range(4)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        parent_ids = "".join(new_request_id() for _ in range(4))
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child_ids = b"".join(chunks).decode()
    assert len(child_ids) == len(parent_ids) == 4 * 36
    children = {child_ids[i:i + 36] for i in range(0, len(child_ids), 36)}
    parents = {parent_ids[i:i + 36] for i in range(0, len(parent_ids), 36)}
    assert all(uuid.UUID(text).version == 4 for text in children | parents)
    assert not children & parents, "the child drew the same bytes as its parent"
