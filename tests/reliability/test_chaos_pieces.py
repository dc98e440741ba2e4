"""The chaos suite's own pieces, without a cluster: its fuzzer only makes messages the codec
refuses with WireError (or decodes), and its load accounting tells failed from lost."""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import chaos
import pytest

from dmlsys.wire.codec import WireError, decode


def test_every_fuzzed_message_is_decoded_or_refused_with_a_wire_error():
    kinds = {"decoded": 0, "refused": 0}
    for frames in chaos.fuzz_messages(random.Random(7), 2_000):
        try:
            decode(frames)
            kinds["decoded"] += 1
        except WireError:
            kinds["refused"] += 1
    assert kinds["refused"] > 1_000 and kinds["decoded"] > 50  # both sides of the decoder are exercised


def test_a_header_nested_a_thousand_deep_is_refused_with_a_wire_error():
    # Found by the fuzzer: nested ~1000-1024 deep passes msgpack's stack limit (1024) but a plain
    # repr of it in the error message passed Python's (1000): RecursionError, not WireError.
    with pytest.raises(WireError):
        decode([b"\x91" * 1010 + b"\xc0"])


def test_the_fuzzer_is_seeded():
    a = [f for m in chaos.fuzz_messages(random.Random(3), 50) for f in m[:1]]
    b = [f for m in chaos.fuzz_messages(random.Random(3), 50) for f in m[:1]]
    assert [bytes(x) for x in a] == [bytes(x) for x in b]


def test_the_load_summary_counts_failed_lost_and_the_time_to_recover():
    load = chaos.Load("127.0.0.1", 1)
    load.records = [(0.0, 0.1, "ok", "200"), (1.0, 1.2, "failed", "connect: ConnectionRefusedError"),
                    (1.5, 2.5, "lost", "ConnectionResetError"), (3.0, 3.1, "ok", "200")]
    s = load.summary(fault_at=1.0)
    assert (s["sent"], s["ok"], s["failed"], s["lost"], s["recover_s"]) == (4, 2, 1, 1, 1.5)
    load.records.append((4.0, 4.5, "failed", "503 no ready replica"))  # still failing at the end
    assert load.summary(fault_at=1.0)["recover_s"] is None
