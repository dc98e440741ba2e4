"""The predict message's bytes survive the wire whatever their size, and never swell a header."""

from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.serving import messages
from dmlsys.wire.codec import DEFAULT_LIMITS, Kind, Message, decode, encode

sizes = st.one_of(st.integers(0, 64), st.integers(messages.INLINE_MAX - 8, messages.INLINE_MAX + 8),
                  st.integers(0, 3 * messages.INLINE_MAX))


@settings(max_examples=60, deadline=None)
@given(sizes, st.integers(0, 255))
def test_carried_bytes_arrive_whole_and_large_ones_outside_the_header(size, fill):
    data = bytes([fill]) * size
    frames = encode(Message(Kind.REQUEST, 1, "model.predict", "gw", {"json": messages.carry(data), "max_instances": 4},
                            1.0))
    got = decode([bytes(f) for f in frames]).body["json"]
    assert messages.received(got) == data
    assert len(frames[0]) <= min(size, messages.INLINE_MAX) + 128


def test_a_full_predict_many_of_the_largest_inline_bodies_is_under_the_header_limit():
    item = {"json": messages.carry(b" " * messages.INLINE_MAX), "max_instances": 2**31}
    frames = encode(Message(Kind.REQUEST, 2**40, "model.predict_many", "g" * 64, {"items": [item] * messages.MAX_ITEMS},
                            1e9))
    assert len(frames) == 1 and len(frames[0]) <= DEFAULT_LIMITS.max_header_bytes * 3 // 4


def test_received_refuses_what_was_not_carried():
    import numpy as np

    for value in (None, 3, "text", np.zeros(3, np.float32), np.zeros((2, 2), np.uint8)):
        assert messages.received(value) is None
