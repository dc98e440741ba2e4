"""The coalescer's callback path (``send_then``): every predict hears exactly once, however its
message ends, and one caller's failure does not keep the reply from its turn-mates."""

import asyncio

from dmlsys.node import RemoteError, RpcTimeout
from dmlsys.serving.coalescing import Coalescer


class FakeNode:
    """``call`` answers each item by its body after ``delay`` seconds, or raises ``fail``."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.delay, self.fail, self.messages = delay, fail, []

    async def call(self, peer, service, method, body, timeout):
        self.messages.append((peer, method, body))
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        items = body["items"] if method == "predict_many" else [body]
        results = [{"error": "BadInput", "message": "no"} if b == "bad" else {"version": 1, "body": b} for b in items]
        return {"results": results} if method == "predict_many" else results[0]


def run(node, sends, settle: float = 0.05):
    """``sends``: (replica, body, timeout); the calls each ``done`` got, in order of sends."""
    async def go():
        c = Coalescer(node)
        heard = [[] for _ in sends]
        for i, (replica, body, timeout) in enumerate(sends):
            c.send_then(replica, body, timeout, lambda i, reply, error: heard[i].append((reply, error)), i)
        assert not any(heard)  # never called from send_then itself
        await asyncio.sleep(settle)
        await c.stop()
        return c, heard

    return asyncio.run(go())


def test_one_turn_to_one_replica_is_one_message_and_each_hears_its_own_reply():
    node = FakeNode()
    c, heard = run(node, [("r0", "a", 1.0), ("r0", "bad", 1.0), ("r1", "c", 1.0), ("r0", "d", 1.0)])
    assert sorted((p, m) for p, m, _ in node.messages) == [("r0", "predict_many"), ("r1", "predict")]
    assert (c.messages, c.items) == (2, 4)
    assert [h[0][0] and h[0][0]["body"] for h in heard] == ["a", None, "c", "d"]
    assert isinstance(heard[1][0][1], RemoteError) and all(len(h) == 1 for h in heard)


def test_an_item_with_a_shorter_timeout_expires_alone_and_hears_once():
    node = FakeNode(delay=0.05)
    _, heard = run(node, [("r0", "slow-ok", 1.0), ("r0", "impatient", 0.01)], settle=0.1)
    assert heard[0] == [({"version": 1, "body": "slow-ok"}, None)]
    [(reply, error)] = heard[1]  # its timer fired; the message's reply, later, is dropped for it
    assert reply is None and isinstance(error, RpcTimeout)


def test_a_failed_message_fails_every_item_once():
    boom = RpcTimeout("r0", "model.predict_many", 1.0)
    _, heard = run(FakeNode(fail=boom), [("r0", "a", 1.0), ("r0", "b", 1.0)])
    assert heard == [[(None, boom)], [(None, boom)]]


def test_a_callback_that_raises_does_not_keep_the_reply_from_its_turn_mates():
    async def go():
        c = Coalescer(FakeNode())
        got = []

        def broken(arg, reply, error):
            raise RuntimeError("caller bug")

        c.send_then("r0", "a", 1.0, broken, None)
        c.send_then("r0", "b", 1.0, lambda arg, reply, error: got.append(reply["body"]), None)
        fut = c.send("r0", "c", 1.0)  # the future API rides on the same path
        assert (await fut)["body"] == "c"
        await asyncio.sleep(0)
        return got

    assert asyncio.run(go()) == ["b"]


class JunkNode(FakeNode):
    """A replica that answers what it should not: ``results`` as given, for every message."""

    def __init__(self, results) -> None:
        super().__init__()
        self.results = results

    async def call(self, peer, service, method, body, timeout):
        return {"results": self.results} if method == "predict_many" else self.results


def test_a_malformed_answer_fails_each_of_its_predicts_once_and_never_passes_as_a_reply():
    for results in ("not a list", [1, "x", None], [{"version": 1, "body": b"ok"}], {"results": 3}):
        _, heard = run(JunkNode(results), [("r0", "a", 1.0), ("r0", "b", 1.0)])
        assert all(len(h) == 1 for h in heard), results
        outcomes = [(reply, type(error).__name__) for [(reply, error)] in heard]
        if results == [{"version": 1, "body": b"ok"}]:  # one result for two items: the second has none
            assert outcomes == [({"version": 1, "body": b"ok"}, "NoneType"), (None, "RemoteError")]
        else:
            assert all(reply is None and error != "NoneType" for reply, error in outcomes), outcomes
