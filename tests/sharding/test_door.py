"""The canvas over HTTP: the PNG codec, the body parser, the door's answers, the cap a replica
applies, and router.http (the gateway's hand-over) on the simulated network."""

import struct
import zlib

import numpy as np
import orjson
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from dmlsys.node import Directory, Node
from dmlsys.sharding import png
from dmlsys.sharding.canvas import LABELS, canvas_app, make_canvas, parse_http, score
from dmlsys.sharding.door import answer, check_input, input_bytes
from dmlsys.sharding.errors import BadRequest, InputTooLarge
from dmlsys.wire import sim

from tests.sharding.helpers import Cluster

# -- PNG ----------------------------------------------------------------------------------------

shapes = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)
# Mostly black, like a canvas: Paeth rows then mix runs decoded as Sub with runs decoded pixel by pixel.
canvases = st.one_of(hnp.arrays(np.uint8, shapes),
                     hnp.arrays(np.uint8, shapes, elements=st.sampled_from([0, 0, 0, 0, 1, 128, 255])))


@settings(max_examples=60, deadline=None)
@given(canvases)
def test_png_round_trip(img):
    assert np.array_equal(png.decode(png.encode(img)), img)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _filtered_png(img: np.ndarray, kinds: list[int]) -> bytes:
    """A PNG whose row y uses filter kinds[y] (the spec's definitions, written out plainly)."""
    h, w = img.shape
    raw = bytearray()
    for y in range(h):
        raw.append(kinds[y])
        for x in range(w):
            a = int(img[y, x - 1]) if x else 0
            b = int(img[y - 1, x]) if y else 0
            c = int(img[y - 1, x - 1]) if x and y else 0
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][kinds[y]]
            raw.append((int(img[y, x]) - pred) & 0xFF)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (png.SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))


@settings(max_examples=80, deadline=None)
@given(canvases, st.data())
def test_png_every_filter_type_decodes(img, data):
    kinds = data.draw(st.lists(st.integers(0, 4), min_size=img.shape[0], max_size=img.shape[0]))
    assert np.array_equal(png.decode(_filtered_png(img, kinds)), img)


def test_png_refuses_what_it_does_not_read_by_name():
    good = png.encode(np.zeros((4, 4), np.uint8))
    with pytest.raises(BadRequest, match="signature"):
        png.decode(b"GIF89a" + good)
    rgb = good.replace(struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0), struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
    with pytest.raises(BadRequest, match="colour type 2") as e:
        png.decode(rgb)
    assert e.value.status == 415
    # A tiny file that claims a huge image is refused before anything is inflated.
    with pytest.raises(BadRequest, match="cap") as e:
        png.decode(png.encode(np.zeros((64, 64), np.uint8)), max_pixels=1000)
    assert e.value.status == 413
    bomb = _filtered_png(np.zeros((8, 8), np.uint8), [0] * 8)
    lie = bomb.replace(struct.pack(">II", 8, 8), struct.pack(">II", 4, 4), 1)  # 8x8 of data for a 4x4 header
    with pytest.raises(BadRequest, match="needs"):
        png.decode(lie)
    with pytest.raises(BadRequest, match="truncated"):
        png.decode(good[:-20])


# -- the :tag body ------------------------------------------------------------------------------


def test_parse_http_takes_png_json_rows_and_json_objects_with_options():
    img = (np.arange(35, dtype=np.uint8) * 7).reshape(5, 7)
    assert np.array_equal(parse_http(png.encode(img), "image/png")["canvas"], img)
    assert np.array_equal(parse_http(orjson.dumps(img.tolist()), "application/json")["canvas"], img)
    request = parse_http(orjson.dumps({"canvas": img.tolist(), "cell": 3}), "application/json; charset=utf-8",
                         {"margin": "2"})
    assert (request["cell"], request["margin"]) == (3, 2)
    for body, kind, status, words in ((b"[[1, 2], [3]]", "application/json", 400, "equally long rows"),
                                      (b"[[1, 256]]", "application/json", 400, "0-255"),
                                      (b"{", "application/json", 400, "not JSON"),
                                      (b"[[1]]", "text/csv", 415, "image/png or application/json")):
        with pytest.raises(BadRequest, match=words) as e:
            parse_http(body, kind)
        assert e.value.status == status
    with pytest.raises(BadRequest, match="cell must be >= 1"):
        parse_http(orjson.dumps([[1]]), "application/json", {"cell": "0"})


def test_labels_are_the_trainers():
    from dmlsys.train.models import LABELS as TRAIN_LABELS

    assert list(LABELS) == list(TRAIN_LABELS)


def test_a_capped_replica_refuses_the_canvas_naming_the_cap():
    check_input(1000, 1000, where="replica max_input_bytes")
    with pytest.raises(InputTooLarge, match="over replica max_input_bytes = 1000 bytes") as e:
        check_input(31_360_000, 1000, where="replica max_input_bytes")
    assert (e.value.status, e.value.size, e.value.limit) == (413, 31_360_000, 1000)
    assert "router" in str(e.value)
    # What the gateway compares with the cap, without decoding: a PNG's pixels, else the body's length.
    assert input_bytes(png.encode(np.zeros((300, 700), np.uint8)), "image/png") == 210_000
    assert input_bytes(b"[[0, 1]]", "application/json") == 8


# -- the door's answers, and router.http, on the simulated network -------------------------------


def _canvas_cluster(tmp_path, max_body_bytes: int = 1 << 20):
    import dataclasses

    def app():
        return canvas_app(lambda crops: np.zeros(len(crops), np.int64))  # every garment "T-shirt/top"

    c = Cluster(3, ["s0", "s1"], app, tmp_path)
    c.router.config = dataclasses.replace(c.router.config, max_body_bytes=max_body_bytes)
    return c


def test_answer_tags_a_canvas_and_refuses_by_name(tmp_path):
    images = np.zeros((20, 28, 28), np.uint8)
    images[:, 4:24, 6:22] = 200
    img, truth = make_canvas(images, np.zeros(20, np.int64), size=300, count=20, seed=2)

    async def scenario():
        c = _canvas_cluster(tmp_path, max_body_bytes=50_000)
        await c.start()
        status, doc = await answer(c.router, "canvas", "tag", png.encode(img), "image/png", {"cell": "100"}, 10.0)
        assert status == 200 and (doc["count"], doc["parts"], doc["shards"]) == (20, 9, 2)
        found = np.array([[g["y"], g["x"], g["class"]] for g in doc["garments"]])
        assert score(found, truth, tolerance=2)["recall"] == 1.0 and doc["garments"][0]["label"] == "T-shirt/top"
        status, doc = await answer(c.router, "canvas", "tag", orjson.dumps(img.tolist()), "application/json")
        assert status == 413 and "max_body_bytes = 50000" in doc["error"]
        assert (await answer(c.router, "mnist", "tag", b"", "image/png"))[0] == 404
        status, doc = await answer(c.router, "canvas", "predict", b"", "image/png")
        assert status == 404 and ":tag" in doc["error"]
        assert (await answer(c.router, "canvas", "tag", b"\x89PNG", "image/png"))[0] == 400

        # The gateway's hook: the same request by RPC, the body as a uint8 array frame.
        gateway = Node("gateway", c.net.transport("gateway"), role="gateway", directory=Directory(c.members))
        await gateway.start()
        reply = await gateway.call("router", "router", "http", {
            "model": "canvas", "verb": "tag", "content_type": "image/png", "params": {"cell": "100"},
            "body": np.frombuffer(png.encode(img), np.uint8)}, timeout=10.0)
        assert reply["status"] == 200 and reply["json"]["count"] == 20
        await gateway.stop(0)
        await c.stop()

    sim.run(scenario())


def test_a_part_that_cannot_be_served_is_a_503_naming_part_and_shard(tmp_path):
    img = np.zeros((200, 200), np.uint8)

    async def scenario():
        c = _canvas_cluster(tmp_path)
        await c.start()
        for name in ("s0", "s1"):
            c.net.crash(name)
            c.shards[name].kill()
        status, doc = await answer(c.router, "canvas", "tag", png.encode(img), "image/png", {"cell": "100"}, 5.0)
        assert status == 503 and doc["shard"] in ("s0", "s1") and f"part {doc['part']} " in doc["error"]
        assert "garments" not in doc
        await c.stop()

    sim.run(scenario())
