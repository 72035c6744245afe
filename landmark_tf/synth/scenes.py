"""Procedurally drawn landmark scenes (numpy + Pillow only).

A scene is a list of flat-coloured polygons in "world" coordinates: the landmark's canonical
frame is the unit square, x to the right, y down, with the ground below a horizon line. A
landmark's identity lives in its geometry (how many buildings, their outlines, roofs, window
grids, columns, bands, the far skyline), so that `views.render_view` can change colours and
lighting freely and a model must look at structure to tell two landmarks apart.
"""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np

FRONT, SIDE = 0, 1  # how a polygon is lit: SIDE faces get a per-view shading factor

# The ground reaches this far outside the unit frame so that zoomed-out, rotated views never show
# its edge; `views` keeps its cameras such that these points stay in front of the camera.
WORLD_MIN, WORLD_MAX = -0.6, 1.6


@dataclasses.dataclass(frozen=True)
class Shape:
    """One filled polygon: `points` float64 [K, 2] world coords, `color` float64 [3] RGB 0..1."""

    points: np.ndarray
    color: np.ndarray
    face: int = FRONT


@dataclasses.dataclass(frozen=True)
class Scene:
    """Polygons in drawing order (back to front), packed into arrays for fast projection.

    `points` float64 [P, 2] holds every polygon's vertices one after the other, `starts` int64
    [N] where each of the N polygons begins, `colors` float64 [N, 3] and `faces` int64 [N].
    """

    points: np.ndarray
    starts: np.ndarray
    colors: np.ndarray
    faces: np.ndarray

    @classmethod
    def from_shapes(cls, shapes: list[Shape]) -> Scene:
        sizes = [len(s.points) for s in shapes]
        return cls(
            points=np.concatenate([s.points for s in shapes]).astype(np.float64),
            starts=np.cumsum([0] + sizes[:-1]),
            colors=np.stack([s.color for s in shapes]),
            faces=np.array([s.face for s in shapes]),
        )

    def __len__(self) -> int:
        return len(self.starts)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def ellipse(cx: float, cy: float, rx: float, ry: float, a0=0.0, a1=2 * np.pi, n=20):
    t = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _arch(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """A rectangle [x0, x1] x [y0, y1] with a round top (a window or door shape)."""
    r = (x1 - x0) / 2
    top = ellipse((x0 + x1) / 2, y0 + r, r, r, np.pi, 2 * np.pi, 12)
    return np.concatenate([top, [[x1, y1], [x0, y1]]])


def random_color(rng: np.random.Generator, sat=(0.1, 0.8), val=(0.2, 0.95)) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb, dtype=np.float64)


COLOR_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")


def color_name(rgb: np.ndarray) -> str:
    """A web-title colour word for an RGB 0..1 colour: white/black/grey for low saturation or
    value, else the hue's name (8 equal hue sectors starting at red)."""
    hue, sat, val = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if val < 0.25:
        return "black"
    if sat < 0.2:
        return "white" if val > 0.75 else "grey"
    return COLOR_NAMES[int(((hue + 1 / 16) % 1.0) * len(COLOR_NAMES))]


def _contrast(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A colour clearly lighter or darker than `base`, so facade details survive colour jitter."""
    dark = base.mean() > 0.5
    return random_color(rng, val=(0.05, 0.3) if dark else (0.7, 1.0))


def make_scene(rng: np.random.Generator, words: list[str] | None = None) -> Scene:
    """A landmark: ground, optional far skyline, 1-4 buildings, optional foreground structure.

    `words`, when given, receives what the scene shows (the main building's colour, roof and
    facade, a road, mountains or skyline, the foreground structure), for synthetic file titles;
    recording them draws nothing from `rng`, so the pixels are the same with or without it.
    """
    words = [] if words is None else words
    horizon = rng.uniform(0.6, 0.8)
    shapes = [Shape(rect(WORLD_MIN, horizon, WORLD_MAX, WORLD_MAX), random_color(rng))]
    if rng.random() < 0.5:
        road = [[0.5 - 0.03, horizon], [0.5 + 0.03, horizon], [1.1, WORLD_MAX], [-0.1, WORLD_MAX]]
        shapes.append(Shape(np.array(road) + [rng.uniform(-0.3, 0.3), 0], random_color(rng)))
        words.append("road")
    if rng.random() < 0.7:
        shapes += _far_silhouette(rng, horizon, words)
    boxes = _layout(rng, horizon)
    for i, box in enumerate(boxes):  # the main building is the last box: only it is described
        shapes += _building(rng, *box, words=words if i == len(boxes) - 1 else None)
    if rng.random() < 0.4:
        shapes += _foreground(rng, horizon, words)
    return Scene.from_shapes(shapes)


def make_distractor(rng: np.random.Generator, words: list[str] | None = None) -> Scene:
    """An image of no landmark: half are unique landmark-like scenes, half open landscapes.
    `words` as in `make_scene`."""
    words = [] if words is None else words
    if rng.random() < 0.5:
        return make_scene(rng, words)
    words.append("landscape")
    horizon = rng.uniform(0.45, 0.8)
    shapes = [Shape(rect(WORLD_MIN, horizon, WORLD_MAX, WORLD_MAX), random_color(rng))]
    for _ in range(rng.integers(1, 4)):
        shapes += _far_silhouette(rng, horizon + rng.uniform(0, 0.2), words)
    for _ in range(rng.integers(0, 6)):
        x, y, s = rng.uniform(-0.1, 1.1), rng.uniform(horizon, 1.0), rng.uniform(0.05, 0.25)
        shapes += tree(rng, x, y, s)
        words.append("trees")
    return Scene.from_shapes(shapes)


EVERYDAY_KINDS = ("room", "food", "portrait", "document", "closeup")


def make_everyday(rng: np.random.Generator, words: list[str] | None = None) -> Scene:
    """An image of no landmark that does not look like one: a room, a plate of food, a person,
    a page of text or a close-up of an object, filling the frame (no sky, horizon or building).

    Most of GLDv2's test set is such images (people, food, interiors, objects; Weyand et al.
    2020, sec. 3), unlike `make_distractor`'s landmark-like scenes. `words` as in `make_scene`.
    """
    words = [] if words is None else words
    kind = str(rng.choice(EVERYDAY_KINDS))
    words.append(kind)
    lo, hi = WORLD_MIN, WORLD_MAX
    back = random_color(rng, sat=(0.0, 0.5), val=(0.3, 0.95))
    shapes = [Shape(rect(lo, lo, hi, hi), back)]  # covers every view: no sky shows
    if kind == "room":
        floor = rng.uniform(0.55, 0.8)
        shapes.append(Shape(rect(lo, floor, hi, hi), random_color(rng, val=(0.2, 0.7))))
        for _ in range(rng.integers(2, 6)):  # furniture and frames on the wall
            x, w, h = rng.uniform(-0.1, 0.9), rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4)
            y = floor - h if rng.random() < 0.5 else rng.uniform(0.05, floor - h)
            shapes.append(Shape(rect(x, y, x + w, y + h), random_color(rng)))
    elif kind == "food":
        cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.7), rng.uniform(0.3, 0.5)
        shapes.append(Shape(ellipse(cx, cy, r, r * 0.8, n=32), random_color(rng, sat=(0, 0.1))))
        for _ in range(rng.integers(3, 9)):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, r * 0.6)
            s = rng.uniform(0.04, 0.12)
            item = ellipse(cx + d * np.cos(a), cy + d * np.sin(a) * 0.8, s,
                           s * rng.uniform(0.5, 1.0))
            shapes.append(Shape(item, random_color(rng, sat=(0.5, 1))))
    elif kind == "portrait":
        cx, skin = rng.uniform(0.3, 0.7), random_color(rng, sat=(0.2, 0.6), val=(0.35, 0.95))
        shapes.append(Shape(np.array([[cx - 0.4, hi], [cx - 0.3, 0.7], [cx + 0.3, 0.7],
                                      [cx + 0.4, hi]]), random_color(rng)))
        shapes.append(Shape(ellipse(cx, 0.45, 0.17, 0.22, n=32), skin))
        shapes.append(Shape(ellipse(cx, 0.3, 0.19, 0.1, np.pi, 2 * np.pi), random_color(
            rng, val=(0.05, 0.5))))
        for dx in (-0.07, 0.07):
            shapes.append(Shape(ellipse(cx + dx, 0.43, 0.025, 0.018), np.zeros(3)))
    elif kind == "document":
        x0, x1 = rng.uniform(-0.1, 0.2), rng.uniform(0.8, 1.1)
        shapes.append(Shape(rect(x0, -0.1, x1, 1.1), random_color(rng, sat=(0, 0.1),
                                                                   val=(0.85, 1.0))))
        ink = random_color(rng, val=(0.0, 0.3))
        for y in np.arange(rng.uniform(0.0, 0.1), 1.05, rng.uniform(0.05, 0.09)):
            end = x1 - 0.05 - rng.uniform(0, 0.3) * (rng.random() < 0.3)
            shapes.append(Shape(rect(x0 + 0.05, y, end, y + 0.02), ink))
    else:  # a close-up: a few large overlapping blobs and stripes of one object
        for _ in range(rng.integers(2, 6)):
            cx, cy, rx, ry = rng.uniform(0, 1), rng.uniform(0, 1), *rng.uniform(0.15, 0.6, 2)
            blob = ellipse(cx, cy, rx, ry, n=24) if rng.random() < 0.6 else rect(
                cx - rx, cy - ry / 4, cx + rx, cy + ry / 4)
            shapes.append(Shape(blob, random_color(rng)))
    return Scene.from_shapes(shapes)


def _far_silhouette(rng: np.random.Generator, horizon: float,
                    words: list[str] | None = None) -> list[Shape]:
    """Mountains (a jagged ridge) or a distant skyline of blocks, paler than the foreground."""
    color = random_color(rng, sat=(0.05, 0.4), val=(0.45, 0.85))
    words = [] if words is None else words
    if rng.random() < 0.5:
        words.append("mountains")
        xs = np.linspace(WORLD_MIN, WORLD_MAX, rng.integers(5, 12))
        ys = horizon - rng.uniform(0.03, 0.3, len(xs))
        feet = [[WORLD_MAX, horizon], [WORLD_MIN, horizon]]
        ridge = np.concatenate([np.stack([xs, ys], 1), feet])
        return [Shape(ridge, color)]
    words.append("skyline")
    edges = np.cumsum(rng.uniform(0.03, 0.12, 40)) + WORLD_MIN
    edges = edges[edges < WORLD_MAX]
    tops = horizon - rng.uniform(0.03, 0.2, len(edges))
    blocks = zip(edges[:-1], edges[1:], tops, strict=False)
    return [Shape(rect(a, t, b, horizon + 0.01), color) for a, b, t in blocks]


def _layout(rng: np.random.Generator, horizon: float) -> list[tuple[float, ...]]:
    """Building boxes (x0, top, x1, base): side buildings first, the main one last (in front)."""
    width, height = rng.uniform(0.22, 0.48), rng.uniform(0.25, 0.5)
    cx = rng.uniform(0.35, 0.65)
    main = (cx - width / 2, horizon - height, cx + width / 2, horizon + rng.uniform(0.0, 0.05))
    boxes = []
    for _ in range(rng.choice(4, p=[0.25, 0.35, 0.25, 0.15])):
        w, h = rng.uniform(0.07, 0.22), rng.uniform(0.1, 0.55)
        x = rng.uniform(0.02, 0.98 - w)
        boxes.append((x, horizon - h, x + w, horizon + rng.uniform(-0.02, 0.04)))
    return boxes + [main]


def _building(rng, x0: float, top: float, x1: float, base: float,
              words: list[str] | None = None) -> list[Shape]:
    body = random_color(rng)
    words = [] if words is None else words
    words.append(color_name(body))
    shapes = []
    if rng.random() < 0.5:
        d = rng.uniform(0.03, 0.08) * rng.choice([-1, 1])
        xe = x1 if d > 0 else x0
        side = [[xe, base], [xe + d, base - abs(d) * 0.6], [xe + d, top - abs(d) * 0.6], [xe, top]]
        shapes.append(Shape(np.array(side), body, SIDE))
    shapes.append(Shape(rect(x0, top, x1, base), body))
    shapes += _roof(rng, x0, top, x1, body, words)
    shapes += _facade(rng, x0, top, x1, base, body, words)
    return shapes


def _roof(rng, x0: float, top: float, x1: float, body: np.ndarray, words: list[str]) -> list[Shape]:
    w, cx = x1 - x0, (x0 + x1) / 2
    color = _contrast(rng, body) if rng.random() < 0.5 else random_color(rng)
    kind = rng.choice(["flat", "gable", "dome", "spire", "stepped", "battlements"])
    words.append(str(kind))
    if kind == "flat":
        return [Shape(rect(x0 - 0.01, top - 0.025, x1 + 0.01, top), color)]
    if kind == "gable":
        peak = top - rng.uniform(0.2, 0.6) * w
        return [Shape(np.array([[x0 - 0.01, top], [x1 + 0.01, top], [cx, peak]]), color)]
    if kind == "dome":
        rx = w * rng.uniform(0.25, 0.5)
        drum = top - rng.uniform(0.0, 0.06)
        dome = ellipse(cx, drum, rx, rx * rng.uniform(0.6, 1.4), np.pi, 2 * np.pi)
        return [Shape(rect(cx - rx, drum, cx + rx, top), body), Shape(dome, color)]
    if kind == "spire":
        half, h = w * rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.3)
        return [Shape(np.array([[cx - half, top], [cx + half, top], [cx, top - h]]), color)]
    if kind == "stepped":
        steps, shapes = rng.integers(1, 4), []
        for i in range(1, steps + 1):
            inset, h = w * 0.15 * i, rng.uniform(0.03, 0.08)
            shapes.append(Shape(rect(x0 + inset, top - h, x1 - inset, top), body))
            top -= h
        return shapes
    n = rng.integers(3, 8)
    edges = np.linspace(x0, x1, 2 * n)
    h = rng.uniform(0.015, 0.04)
    merlons = zip(edges[::2], edges[1::2], strict=True)
    return [Shape(rect(a, top - h, b, top + 0.001), body) for a, b in merlons]


def _facade(rng, x0: float, top: float, x1: float, base: float, body: np.ndarray,
            words: list[str]) -> list[Shape]:
    """Windows, columns, bands or tiles, plus maybe a door and a round window."""
    detail = _contrast(rng, body)
    w, h = x1 - x0, base - top
    kind = rng.choice(["windows", "columns", "bands", "tiles", "windows"])
    words.append(str(kind))
    shapes = []
    if kind == "windows":
        rows, cols = rng.integers(1, 7), rng.integers(1, 7)
        fx, fy = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
        maker = [rect, _arch, rect][rng.integers(3)]
        for r in range(rows):
            for c in range(cols):
                cx, cy = x0 + w * (c + 0.5) / cols, top + h * 0.8 * (r + 0.5) / rows
                dx, dy = fx * w / cols / 2, fy * h * 0.8 / rows / 2
                shapes.append(Shape(maker(cx - dx, cy - dy, cx + dx, cy + dy), detail))
    elif kind == "columns":
        n, f = rng.integers(3, 9), rng.uniform(0.3, 0.6)
        for i in range(n):
            cx, half = x0 + w * (i + 0.5) / n, f * w / n / 2
            shapes.append(Shape(rect(cx - half, top + 0.02, cx + half, base), detail))
    elif kind == "bands":
        n = rng.integers(2, 7)
        for i in range(n):
            y = top + h * (i + 0.5) / n
            shapes.append(Shape(rect(x0, y - h / n / 4, x1, y + h / n / 4), detail))
    else:
        nx, ny = rng.integers(2, 6), rng.integers(3, 8)
        for i in range(nx):
            for j in range(i % 2, ny, 2):
                a, b = x0 + w * i / nx, top + h * j / ny
                shapes.append(Shape(rect(a, b, a + w / nx, b + h / ny), detail))
    if rng.random() < 0.6:
        dw, dh = w * rng.uniform(0.15, 0.35), h * rng.uniform(0.15, 0.4)
        cx = x0 + w * rng.choice([0.5, rng.uniform(0.25, 0.75)])
        shapes.append(Shape(_arch(cx - dw / 2, base - dh, cx + dw / 2, base), _contrast(rng, body)))
    if rng.random() < 0.3:
        r = w * rng.uniform(0.08, 0.18)
        shapes.append(Shape(ellipse((x0 + x1) / 2, top + h * 0.2, r, r), _contrast(rng, body)))
    return shapes


def _foreground(rng, horizon: float, words: list[str]) -> list[Shape]:
    """A colonnade, an obelisk or a fence in front of the buildings."""
    color, base = random_color(rng), horizon + rng.uniform(0.04, 0.12)
    kind = rng.choice(["colonnade", "obelisk", "fence"])
    words.append(str(kind))
    if kind == "obelisk":
        x, w, h = rng.uniform(0.15, 0.85), rng.uniform(0.02, 0.05), rng.uniform(0.25, 0.45)
        tip = [[x - w, base - h], [x + w, base - h], [x, base - h - 2 * w]]
        return [Shape(rect(x - w, base - h, x + w, base), color), Shape(np.array(tip), color)]
    x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2))
    n = rng.integers(3, 10)
    h = rng.uniform(0.1, 0.25) if kind == "colonnade" else rng.uniform(0.03, 0.08)
    posts = [rect(x - 0.008, base - h, x + 0.008, base) for x in np.linspace(x0, x1, n)]
    shapes = [Shape(p, color) for p in posts]
    shapes.append(Shape(rect(x0 - 0.01, base - h - 0.02, x1 + 0.01, base - h), color))
    return shapes


def tree(rng: np.random.Generator, x: float, y: float, size: float) -> list[Shape]:
    """A trunk and a round or pointed crown standing at (x, y); used by scenes and as clutter."""
    trunk = random_color(rng, sat=(0.3, 0.7), val=(0.15, 0.45))
    crown = random_color(rng, sat=(0.3, 0.9), val=(0.2, 0.7))
    tw = size * 0.08
    shapes = [Shape(rect(x - tw, y - size * 0.5, x + tw, y), trunk)]
    if rng.random() < 0.5:
        shapes.append(Shape(ellipse(x, y - size * 0.7, size * 0.3, size * 0.35), crown))
    else:
        cone = [[x - size * 0.3, y - size * 0.35], [x + size * 0.3, y - size * 0.35], [x, y - size]]
        shapes.append(Shape(np.array(cone), crown))
    return shapes
