"""The course's sharded-services scenario on Fashion-MNIST: tag the garments on a huge canvas.

A "high-resolution" request is a large grey canvas (say 5,600 × 5,600) with a few thousand
Fashion-MNIST images pasted at random, not grid-aligned, positions, none overlapping and at
least ``gap`` pixels apart (``make_canvas``, which also returns the ground truth). Tagging finds
each garment and its class.

Tiling (``tiles``): the canvas is partitioned into square *cores* of ``cell`` pixels; each tile
is its core grown by ``margin`` on every side (clipped at the canvas edge), so neighbouring tiles
overlap by 2·margin. We overlap, rather than cut on a grid, because a garment cut in half by a
tile edge can be neither found nor classified by either half: with overlap, every garment lies
whole inside some tile.

Clean-up (``keep``): a tile keeps a detection when it is whole in the tile (its pixels touch no
tile edge that is not also a canvas edge) and its centre lies in the tile's core. Why that counts
every garment exactly once, for a garment of side G = 28 and centre c = start + G/2:

* *At most once*: the cores partition the canvas, so exactly one core holds c, and only that
  tile may keep it. (Every tile computes the same c from the same pixels.)
* *Never dropped when whole in some tile* (whole: its pixels touch none of the tile's inner
  edges, so start > b0 - margin and end < b1 + margin along each axis). Say it is whole in tile
  B. If margin <= G/2, then c = start + G/2 > b0 - margin + G/2 >= b0, and likewise c < b1: c is
  in B's core and B keeps it. If margin > G/2 (our default is G/2 + 2), the tile A whose core
  holds c has a0 <= c < a1 along each axis, so the garment spans [c - G/2, c + G/2), inside
  (a0 - margin, a1 + margin): it is whole in A, and A keeps it.
* With margin > G/2 every garment is whole in the tile of its centre's core, so nothing is lost
  to tiling at all. ``tests/sharding/test_canvas.py`` checks these claims with hypothesis.

Detection (``detect``) is deliberately simple: pixels above a threshold, dilated by ``join``
pixels so the pieces of one garment (a sandal's straps) merge while garments ``gap`` > 2·join
apart do not, then connected components (scipy.ndimage, which JAX already depends on). A
component's bounding box centre is the garment's centre (Fashion-MNIST centres each product in
its 28 × 28 frame), and the 28 × 28 crop around it is what the classifier sees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

G = 28  # a garment's side in pixels
HALF = G // 2


# -- the canvas ---------------------------------------------------------------------------------


def make_canvas(images: np.ndarray, labels: np.ndarray, *, size: int = 5600, count: int = 3000, gap: int = 8,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` × ``size`` uint8 canvas with ``count`` images pasted at random positions, no two
    closer than ``gap`` pixels; and the truth, rows of (top, left, label, image index).

    Raises ValueError when the canvas is too crowded to place them (after many tries)."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((size, size), np.uint8)
    # Occupancy on a grid of cells at least G + gap wide: a new box only needs checking against
    # the boxes in its own and the 8 neighbouring cells.
    cell = G + gap
    grid: dict[tuple[int, int], list[tuple[int, int]]] = {}
    truth = []
    tries, limit = 0, 50 * count
    while len(truth) < count:
        tries += 1
        if tries > limit:
            raise ValueError(f"placed only {len(truth)} of {count} garments on a {size}x{size} canvas with gap {gap}")
        y, x = (int(v) for v in rng.integers(0, size - G + 1, size=2))
        gy, gx = y // cell, x // cell
        clash = False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for (oy, ox) in grid.get((gy + dy, gx + dx), ()):
                    if abs(oy - y) < G + gap and abs(ox - x) < G + gap:
                        clash = True
                        break
        if clash:
            continue
        i = int(rng.integers(0, len(images)))
        canvas[y:y + G, x:x + G] = images[i]
        grid.setdefault((gy, gx), []).append((y, x))
        truth.append((y, x, int(labels[i]), i))
    return canvas, np.array(truth, dtype=np.int64).reshape(-1, 4)


# -- tiling and clean-up (pure geometry) ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Tile:
    """One tile: rows [y0, y1) and columns [x0, x1) of the canvas, and its core inside them."""

    row: int
    col: int
    y0: int
    x0: int
    y1: int
    x1: int
    core: tuple[int, int, int, int]  # (cy0, cx0, cy1, cx1)

    @property
    def key(self) -> str:
        return f"tile-{self.row}-{self.col}"


def tiles(height: int, width: int, cell: int, margin: int = HALF + 2) -> list[Tile]:
    """Cores of ``cell`` pixels covering the canvas (the last row/column may be smaller), each
    grown by ``margin`` and clipped to the canvas."""
    if cell < 1 or margin < 0:
        raise ValueError(f"need cell >= 1 and margin >= 0, got cell={cell}, margin={margin}")
    out = []
    for r, cy0 in enumerate(range(0, height, cell)):
        for c, cx0 in enumerate(range(0, width, cell)):
            cy1, cx1 = min(cy0 + cell, height), min(cx0 + cell, width)
            out.append(Tile(r, c, max(0, cy0 - margin), max(0, cx0 - margin), min(height, cy1 + margin),
                            min(width, cx1 + margin), (cy0, cx0, cy1, cx1)))
    return out


def cut(box: tuple[int, int, int, int], tile: Tile, height: int, width: int) -> bool:
    """Whether pixels spanning ``box`` = (top, left, bottom, right), exclusive ends, in canvas
    coordinates, touch an edge of the tile that is not an edge of the canvas: the thing may go on
    past the tile, so the tile cannot know it whole."""
    top, left, bottom, right = box
    return ((top <= tile.y0 and tile.y0 > 0) or (left <= tile.x0 and tile.x0 > 0)
            or (bottom >= tile.y1 and tile.y1 < height) or (right >= tile.x1 and tile.x1 < width))


def keep(center: tuple[int, int], is_cut: bool, tile: Tile) -> bool:
    """The clean-up rule: whole in the tile, and centred in its core (see the module docstring)."""
    cy0, cx0, cy1, cx1 = tile.core
    return not is_cut and cy0 <= center[0] < cy1 and cx0 <= center[1] < cx1


# -- detection and tagging on one tile -----------------------------------------------------------


def detect(pixels: np.ndarray, *, threshold: int = 0, join: int = 3) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (top, left, bottom, right; exclusive ends, tile coordinates) of the things
    on a tile: pixels above ``threshold``, pieces within 2·``join`` pixels of each other merged."""
    from scipy import ndimage  # a dependency of JAX's; imported only where tiles are tagged

    mask = pixels > threshold
    if join:
        mask_joined = ndimage.binary_dilation(mask, iterations=join)
    else:
        mask_joined = mask
    labelled, _ = ndimage.label(mask_joined)
    labelled[~mask] = 0  # boxes of the real pixels, not of the dilation
    return [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(labelled) if s is not None]


def crop(canvas_or_tile: np.ndarray, center: tuple[int, int]) -> np.ndarray:
    """The G × G window centred on ``center`` (zero-padded past the edges)."""
    h, w = canvas_or_tile.shape
    out = np.zeros((G, G), canvas_or_tile.dtype)
    y0, x0 = center[0] - HALF, center[1] - HALF
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y0 + G), min(w, x0 + G)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = canvas_or_tile[sy0:sy1, sx0:sx1]
    return out


def tag_tile(pixels: np.ndarray, tile: Tile, height: int, width: int,
             classify: Callable[[np.ndarray], np.ndarray]) -> list[list[int]]:
    """What one shard does with its tile: find and classify everything on it. Rows of
    [centre_y, centre_x, class, cut, core top, core left, core bottom, core right] in canvas
    coordinates; a cut thing is not classified (class -1). The router's ``cleanup`` decides."""
    rows, crops = [], []
    for top, left, bottom, right in detect(pixels):
        box = (top + tile.y0, left + tile.x0, bottom + tile.y0, right + tile.x0)
        center = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
        is_cut = cut(box, tile, height, width)
        rows.append([center[0], center[1], -1, int(is_cut), *tile.core])
        if not is_cut:
            crops.append((len(rows) - 1, crop(pixels, (center[0] - tile.y0, center[1] - tile.x0))))
    if crops:
        classes = classify(np.stack([c for _, c in crops]))
        for (i, _), k in zip(crops, classes):
            rows[i][2] = int(k)
    return rows


def cleanup(rows: list[list[int]]) -> list[list[int]]:
    """The clean-up after merge: each garment once, from the tile whose core holds its centre,
    never from a tile that cut it. Rows of [centre_y, centre_x, class]."""
    out = []
    for cy, cx, k, is_cut, cy0, cx0, cy1, cx1 in rows:
        if not is_cut and cy0 <= cy < cy1 and cx0 <= cx < cx1:
            out.append([cy, cx, k])
    return out


# -- a small classifier the shards can run --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SoftmaxTagger:
    """Multinomial logistic regression on raw pixels (Fashion-MNIST's published baseline is about
    0.84 test accuracy): small enough to train in seconds with numpy and to ship to every shard."""

    w: np.ndarray  # (784, 10) float32
    b: np.ndarray  # (10,) float32

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, *, epochs: int = 5, batch: int = 1000, lr: float = 1.0,
            seed: int = 0) -> SoftmaxTagger:
        rng = np.random.default_rng(seed)
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        y = np.eye(10, dtype=np.float32)[labels]
        w, b = np.zeros((x.shape[1], 10), np.float32), np.zeros(10, np.float32)
        for epoch in range(epochs):
            step = lr / (1 + epoch)
            for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // batch)):
                z = x[idx] @ w + b
                p = np.exp(z - z.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                g = (p - y[idx]) / len(idx)
                w -= step * (x[idx].T @ g)
                b -= step * g.sum(axis=0)
        return cls(w, b)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        x = crops.reshape(len(crops), -1).astype(np.float32) / 255.0
        return np.argmax(x @ self.w + self.b, axis=1)

    def save(self, path) -> None:
        np.savez(path, w=self.w, b=self.b)

    @classmethod
    def load(cls, path) -> SoftmaxTagger:
        with np.load(path, allow_pickle=False) as f:
            return cls(f["w"], f["b"])


# -- the sharded app ------------------------------------------------------------------------------


LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
          "Ankle boot")  # dmlsys.train.models.LABELS, copied: that module imports JAX (a test keeps them equal)
MAX_SIDE = 16384  # pixels, either side of a canvas sent over HTTP


def parse_http(body: bytes, content_type: str, params: dict[str, str] | None = None) -> dict:
    """A ``:tag`` request body -> the app's request. ``image/png``: an 8-bit greyscale PNG (see
    :mod:`dmlsys.sharding.png`); ``application/json``: the canvas as an array of rows of 0-255
    integers, or ``{"canvas": rows, "cell": n, "margin": m}``. ``params`` (the query) may set
    ``cell`` and ``margin`` too. Raises ``BadRequest`` naming what is wrong."""
    from dmlsys.sharding import png
    from dmlsys.sharding.errors import BadRequest

    options: dict[str, Any] = {}
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "image/png":
        img = png.decode(body, max_pixels=MAX_SIDE * MAX_SIDE)
    elif kind in ("application/json", ""):
        import orjson

        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"the body is not JSON: {e}") from None
        if isinstance(doc, dict):
            options = {k: doc[k] for k in ("cell", "margin") if k in doc}
            doc = doc.get("canvas")
        try:
            img = np.asarray(doc)
        except (ValueError, TypeError):
            img = None
        if img is None or img.ndim != 2 or img.dtype.kind not in "iu" or not img.size:
            raise BadRequest("a JSON canvas is a non-empty array of equally long rows of integers 0-255 (or "
                             "{\"canvas\": rows, \"cell\": n})")
        if img.min() < 0 or img.max() > 255:
            raise BadRequest(f"canvas pixels are 0-255, found {img.min()}..{img.max()}")
        if max(img.shape) > MAX_SIDE:
            raise BadRequest(f"a {img.shape[0]}x{img.shape[1]} canvas is over {MAX_SIDE} pixels a side", status=413)
        img = img.astype(np.uint8)
    else:
        raise BadRequest(f"a canvas is sent as image/png or application/json, not {content_type!r}", status=415)
    options.update({k: v for k, v in (params or {}).items() if k in ("cell", "margin")})
    request: dict[str, Any] = {"canvas": img}
    for key, low in (("cell", 1), ("margin", 0)):
        if key in options:
            try:
                request[key] = int(options[key])
            except (TypeError, ValueError):
                raise BadRequest(f"{key} is an integer number of pixels, got {options[key]!r}") from None
            if request[key] < low:
                raise BadRequest(f"{key} must be >= {low}, got {request[key]}")
    return request


def render_http(rows: list[list[int]]) -> dict:
    """The answer as JSON: every garment once, its centre and class."""
    return {"count": len(rows), "garments": [{"y": y, "x": x, "class": k, "label": LABELS[k] if 0 <= k < 10 else None}
                                             for y, x, k in rows]}


def canvas_app(classify: Callable[[np.ndarray], np.ndarray]):
    """The ``ShardedApp`` that tags a canvas: request ``{"canvas": uint8 (H, W), "cell": int,
    "margin": int}``; answer rows of [centre_y, centre_x, class], each garment once. Over HTTP:
    ``POST /v1/models/canvas:tag`` (``parse_http``, ``render_http``)."""
    from dmlsys.sharding.app import HttpDoor, ShardedApp

    def split(request: dict) -> list[tuple[str, Any]]:
        img = request["canvas"]
        h, w = img.shape
        return [(t.key, {"pixels": np.ascontiguousarray(img[t.y0:t.y1, t.x0:t.x1]),
                         "tile": [t.row, t.col, t.y0, t.x0, t.y1, t.x1, *t.core], "shape": [h, w]})
                for t in tiles(h, w, int(request.get("cell", 1400)), int(request.get("margin", HALF + 2)))]

    def handle(key: str, part: dict, state: Any) -> tuple[Any, Any]:
        r, c, y0, x0, y1, x1, *core = part["tile"]
        tile = Tile(r, c, y0, x0, y1, x1, tuple(core))
        return tag_tile(part["pixels"], tile, part["shape"][0], part["shape"][1], classify), None

    def merge(results: list) -> list:
        return [row for rows in results for row in rows]

    return ShardedApp("canvas", split, handle, merge, cleanup, http=HttpDoor("tag", parse_http, render_http))


class _LazyTagger:
    """The classifier a shard loads on its first tile (the router, which only splits and merges,
    never does); trained on Fashion-MNIST and saved to ``path`` if the file does not exist yet."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tagger: SoftmaxTagger | None = None

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        if self._tagger is None:
            self._tagger = load_or_fit(self.path)
        return self._tagger(crops)


def load_or_fit(path: str) -> SoftmaxTagger:
    """The tagger saved at ``path``; if there is none, fit one on the Fashion-MNIST training set
    (seconds) and save it there atomically, so shards starting together agree on it."""
    import os
    from pathlib import Path

    target = Path(path)
    if not target.exists():
        from dmlsys.train import data

        ds = data.load()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.npz")
        SoftmaxTagger.fit(ds.train_images, ds.train_labels).save(tmp)
        os.replace(tmp, target)
    return SoftmaxTagger.load(target)


def canvas(model: str | None = None):
    """The app for configs (``app = "dmlsys.sharding.canvas:canvas"``, ``app_options = {model =
    "PATH.npz"}``): the classifier is the ``SoftmaxTagger`` saved at ``model`` (default
    ``$DMLSYS_CANVAS_MODEL``), fitted and saved there on first use when the file is missing."""
    import os

    path = model or os.environ.get("DMLSYS_CANVAS_MODEL")
    if not path:
        from dmlsys.sharding.errors import AppError

        raise AppError("the canvas app needs a classifier file: app_options = {model = \"PATH.npz\"} (fitted and "
                       "saved there on first use) or $DMLSYS_CANVAS_MODEL")
    return canvas_app(_LazyTagger(path))


# -- scoring --------------------------------------------------------------------------------------


def score(found: np.ndarray, truth: np.ndarray, tolerance: int = 3) -> dict[str, Any]:
    """Precision and recall of ``found`` rows (centre_y, centre_x, class) against ``truth`` rows
    (top, left, label, ...): a detection matches the one garment whose centre is within
    ``tolerance`` pixels on both axes; "tagged" also needs the class right."""
    found = np.asarray(found, dtype=np.int64).reshape(-1, 3)
    centres = {(int(t[0]) + HALF, int(t[1]) + HALF): int(t[2]) for t in truth}
    matched, tagged, used = 0, 0, set()
    for y, x, k in found.tolist():
        hit = None
        for dy in range(-tolerance, tolerance + 1):
            for dx in range(-tolerance, tolerance + 1):
                if (y + dy, x + dx) in centres and (y + dy, x + dx) not in used:
                    hit = (y + dy, x + dx)
                    break
            if hit:
                break
        if hit is not None:
            used.add(hit)
            matched += 1
            tagged += centres[hit] == k
    n_found, n_truth = len(found), len(truth)
    return {"found": n_found, "truth": n_truth, "detected": matched,
            "precision": matched / n_found if n_found else 1.0, "recall": matched / n_truth if n_truth else 1.0,
            "tag_precision": tagged / n_found if n_found else 1.0,
            "tag_recall": tagged / n_truth if n_truth else 1.0}
