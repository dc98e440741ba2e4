"""The canvas scenario's pure pieces: tiling and clean-up count every garment once; tagging on
the simulated network finds every garment and crops it exactly."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.sharding.canvas import G, HALF, canvas_app, cleanup, cut, make_canvas, score, tiles
from dmlsys.train.data import DataNotFound, load
from dmlsys.wire import sim

from tests.sharding.helpers import Cluster

FAST = settings(max_examples=100, deadline=None)


def report(tiling, garments, h, w):
    """What an exact per-tile detector reports: each garment box clipped to each tile it meets."""
    rows = []
    for t in tiling:
        for y, x in garments:
            top, left, bottom, right = max(y, t.y0), max(x, t.x0), min(y + G, t.y1), min(x + G, t.x1)
            if top < bottom and left < right:
                box = (top, left, bottom, right)
                rows.append([(top + bottom) // 2, (left + right) // 2, 0, int(cut(box, t, h, w)), *t.core])
    return rows


def whole_in(t, y, x, h, w):
    box = (y, x, y + G, x + G)
    return t.y0 <= y and t.x0 <= x and y + G <= t.y1 and x + G <= t.x1 and not cut(box, t, h, w)


garments_st = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), max_size=25, unique=True)


@FAST
@given(st.integers(G, 300), st.integers(G, 300), st.integers(5, 200), st.integers(0, 40), garments_st)
def test_cleanup_keeps_every_garment_whole_in_some_tile_exactly_once(h, w, cell, margin, raw):
    garments = sorted({(y % (h - G + 1), x % (w - G + 1)) for y, x in raw})
    tiling = tiles(h, w, cell, margin)
    kept = [(cy, cx) for cy, cx, _ in cleanup(report(tiling, garments, h, w))]
    centres = [(y + HALF, x + HALF) for y, x in garments]
    for (y, x), c in zip(garments, centres):
        if any(whole_in(t, y, x, h, w) for t in tiling):
            assert kept.count(c) >= 1, f"garment at {(y, x)} was whole in a tile but dropped"
        if margin > HALF:  # overlap wide enough: nothing is lost to tiling at all
            assert kept.count(c) >= 1
    for c in set(kept):  # never twice; and a kept centre is a real garment's (never half of one)
        assert c in centres and kept.count(c) <= centres.count(c)


@FAST
@given(st.integers(1, 200), st.integers(1, 200), st.integers(4, 150), st.integers(0, 30))
def test_tile_cores_partition_the_canvas_and_tiles_contain_their_cores(h, w, cell, margin):
    cover = np.zeros((h, w), np.int32)
    for t in tiles(h, w, cell, margin):
        cy0, cx0, cy1, cx1 = t.core
        cover[cy0:cy1, cx0:cx1] += 1
        assert t.y0 <= cy0 < cy1 <= t.y1 and t.x0 <= cx0 < cx1 <= t.x1
    assert (cover == 1).all()


def blocks(n_kinds: int = 10):
    """Synthetic garments whose pixels fill their 28 x 28 frame: kind k is all value 20k + 10."""
    images = np.stack([np.full((G, G), 20 * k + 10, np.uint8) for k in range(n_kinds)])
    return images, np.arange(n_kinds, dtype=np.uint8)


def by_brightness(crops: np.ndarray) -> np.ndarray:
    """The oracle for ``blocks``: right only if the crop is exactly one whole garment."""
    flat = crops.reshape(len(crops), -1)
    return np.where(flat.min(axis=1) == flat.max(axis=1), (flat[:, 0].astype(int) - 10) // 20, -1)


def test_make_canvas_keeps_garments_apart_and_its_truth_matches_the_pixels():
    images, labels = blocks()
    img, truth = make_canvas(images, labels, size=400, count=60, gap=8, seed=3)
    assert len(truth) == 60
    for y, x, label, i in truth:
        assert (img[y:y + G, x:x + G] == images[i]).all() and labels[i] == label
    for a in range(len(truth)):
        for b in range(a + 1, len(truth)):
            assert max(abs(truth[a, 0] - truth[b, 0]), abs(truth[a, 1] - truth[b, 1])) >= G + 8
    assert (img > 0).sum() == 60 * G * G  # nothing else on the canvas


@pytest.mark.parametrize("cell", [400, 150, 97])
def test_tagging_a_canvas_tile_by_tile_finds_each_garment_once_with_its_class(cell):
    images, labels = blocks()
    img, truth = make_canvas(images, labels, size=400, count=60, seed=4)
    app = canvas_app(by_brightness)
    parts = app.split({"canvas": img, "cell": cell})
    answer = app.cleanup(app.merge([app.handle(k, p, None)[0] for k, p in parts]))
    s = score(np.array(answer), truth, tolerance=0)
    assert s["precision"] == s["recall"] == s["tag_precision"] == s["tag_recall"] == 1.0


def test_on_fashion_mnist_every_garment_is_found_once():
    try:
        ds = load(limit=0, test_limit=1000)
    except DataNotFound:
        pytest.skip("Fashion-MNIST is not installed")
    img, truth = make_canvas(ds.test_images, ds.test_labels, size=900, count=150, seed=5)
    app = canvas_app(lambda crops: np.zeros(len(crops), int))
    parts = app.split({"canvas": img, "cell": 300})
    answer = app.cleanup(app.merge([app.handle(k, p, None)[0] for k, p in parts]))
    s = score(np.array(answer), truth, tolerance=2)
    assert s["precision"] == 1.0 and s["recall"] == 1.0


def test_a_canvas_tagged_through_the_router_on_the_simulated_network(tmp_path):
    images, labels = blocks()
    img, truth = make_canvas(images, labels, size=400, count=60, seed=6)

    async def scenario():
        c = Cluster(8, ["s0", "s1"], lambda: canvas_app(by_brightness), tmp_path)
        await c.start()
        answer = await c.router.run({"canvas": img, "cell": 100})  # 16 tiles, as arrays on the wire
        assert min(c.shard(s).counters["handled"] for s in ("s0", "s1")) > 0
        await c.stop()
        return answer

    s = score(np.array(sim.run(scenario())), truth, tolerance=0)
    assert s["precision"] == s["recall"] == s["tag_recall"] == 1.0
