"""Random photographs of a procedural scene: camera warp, lighting, clutter, occlusion, noise.

Two views of one landmark share only the scene's geometry; the camera (zoom, shift, rotation,
perspective), the sky, the light on side faces, the colour balance (hue rotation, saturation,
per-channel cast, brightness, contrast, a lighting ramp), the people/trees/posts in front, the
occluding boxes, blur, noise and JPEG quality are all drawn afresh for every view.
"""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from landmark_tf.synth import scenes

_UNIT_SQUARE = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
_BLUE_TOP, _BLUE_BOTTOM = np.array([0.35, 0.55, 0.85]), np.array([0.75, 0.85, 0.95])


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """How different two photos of one landmark are. `scaled(0)` gives identical views."""

    zoom: tuple[float, float] = (0.7, 1.0)  # side of the camera's square, in scene frames
    shift: float = 0.1  # max offset of the camera centre from the scene centre
    rotation_deg: float = 6.0
    perspective: float = 0.08  # max displacement of each camera corner, in camera sides
    sky: float = 0.75  # how far the sky's two colours move from a plain blue, 0..1
    hue_shift: float = 0.15  # max hue rotation, in turns
    saturation: tuple[float, float] = (0.55, 1.3)
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.7, 1.2)
    color_cast: float = 0.15  # max relative change of each RGB channel's gain
    light_ramp: float = 0.25  # max brightness change across the image (shadows)
    side_light: tuple[float, float] = (0.5, 1.1)  # shading factor of side faces
    clutter: int = 3  # max trees, posts and people in front of the landmark
    occluders: int = 2  # max plain boxes/ellipses over the image
    occluder_size: float = 0.3  # max side of an occluder, in image sides
    noise_std: float = 6.0  # max standard deviation of pixel noise, in 0..255 units
    blur_radius: float = 0.8  # max box-blur radius, in output pixels
    jpeg_quality: tuple[int, int] = (75, 95)
    supersample: int = 2  # polygons are drawn this much larger, then downsampled (antialiasing)

    def scaled(self, difficulty: float) -> ViewConfig:
        """Every knob moved from "no change" towards its value by the factor `difficulty`."""
        f = float(difficulty)
        spread = self.jpeg_quality[1] - self.jpeg_quality[0]
        jpeg_low = max(round(self.jpeg_quality[1] - spread * f), 1)

        def around(r, centre):  # factors stay >= 0: difficulty > 1 must not invert colours
            return tuple(max(centre + (v - centre) * f, 0.0) for v in r)

        return dataclasses.replace(
            self,
            zoom=tuple(max(v, 0.2) for v in around(self.zoom, 1.0)),
            shift=self.shift * f, rotation_deg=self.rotation_deg * f,
            perspective=self.perspective * f, hue_shift=self.hue_shift * f,
            saturation=around(self.saturation, 1.0), brightness=around(self.brightness, 1.0),
            contrast=around(self.contrast, 1.0), color_cast=self.color_cast * f,
            light_ramp=self.light_ramp * f, side_light=around(self.side_light, 1.0),
            clutter=round(self.clutter * f), occluders=round(self.occluders * f),
            noise_std=self.noise_std * f, blur_radius=self.blur_radius * f,
            sky=min(self.sky * f, 1.0), jpeg_quality=(jpeg_low, self.jpeg_quality[1]),
        )


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 float64 projective map taking 4 points `src` [4, 2] to `dst` [4, 2]."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    return np.append(np.linalg.solve(np.array(a), np.array(b)), 1.0).reshape(3, 3)


def project(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Applies homography `h` to float [K, 2] points; returns float64 [K, 2]."""
    p = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ h.T
    return p[:, :2] / p[:, 2:]


def random_camera(rng: np.random.Generator, cfg: ViewConfig) -> np.ndarray:
    """Homography from world coordinates to image coordinates in [0, 1]^2."""
    zoom = rng.uniform(*cfg.zoom)
    centre = 0.5 + rng.uniform(-cfg.shift, cfg.shift, 2)
    t = np.radians(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * zoom
    jitter = rng.uniform(-cfg.perspective, cfg.perspective, (4, 2)) * zoom
    while True:
        h = homography(centre + corners @ rot.T + jitter, _UNIT_SQUARE)
        if _in_front(h):
            return h
        jitter = jitter / 2  # a strong tilt put part of the world behind the camera: tilt less


def _in_front(h: np.ndarray, margin: float = 0.25) -> bool:
    """True when all the scene lies well in front of the camera: the projective depth, linear
    in world (x, y), stays above `margin` times its value at the frame centre at the corners."""
    lo, hi = scenes.WORLD_MIN, scenes.WORLD_MAX
    corners = np.array([[lo, lo, 1], [hi, lo, 1], [hi, hi, 1], [lo, hi, 1]])
    depth = corners @ h[2]
    return bool(np.all(depth > margin * (np.array([0.5, 0.5, 1.0]) @ h[2])))


def _sky(rng: np.random.Generator, size: int, change: float) -> Image.Image:
    """A vertical gradient between two colours, `change` of the way from blue to random ones."""
    top = _BLUE_TOP + change * (scenes.random_color(rng) - _BLUE_TOP)
    bottom = _BLUE_BOTTOM + change * (scenes.random_color(rng) - _BLUE_BOTTOM)
    t = np.linspace(0.0, 1.0, size)[:, None]
    column = ((top * (1 - t) + bottom * t) * 255).round().astype(np.uint8)
    return Image.fromarray(column[:, None, :]).resize((size, size), Image.NEAREST)


def _draw(draw: ImageDraw.ImageDraw, points: np.ndarray, scene: scenes.Scene, colors) -> None:
    """Fills the scene's polygons, given their vertices in pixels and uint8 [N, 3] colours."""
    for xy, rgb in zip(np.split(points, scene.starts[1:]), colors.tolist(), strict=True):
        draw.polygon(xy.ravel().tolist(), fill=tuple(rgb))


def _to_uint8(colors: np.ndarray) -> np.ndarray:
    return np.clip(colors * 255, 0, 255).round().astype(np.uint8)


def _clutter(rng: np.random.Generator, cfg: ViewConfig) -> list[scenes.Shape]:
    """Trees, posts and people in image coordinates, standing in the lower part of the view."""
    shapes = []
    for _ in range(rng.integers(0, cfg.clutter + 1)):
        x, y = rng.uniform(-0.05, 1.05), rng.uniform(0.75, 1.05)
        kind = rng.integers(3)
        if kind == 0:
            shapes += scenes.tree(rng, x, y, rng.uniform(0.2, 0.55))
        elif kind == 1:
            h, c = rng.uniform(0.3, 0.6), scenes.random_color(rng, val=(0.05, 0.5))
            shapes.append(scenes.Shape(scenes.rect(x - 0.008, y - h, x + 0.008, y), c))
            shapes.append(scenes.Shape(scenes.ellipse(x, y - h, 0.025, 0.02), c))
        else:
            h, c = rng.uniform(0.12, 0.25), scenes.random_color(rng)
            shapes.append(scenes.Shape(scenes.rect(x - h * 0.15, y - h * 0.8, x + h * 0.15, y), c))
            head = scenes.random_color(rng, sat=(0.2, 0.6), val=(0.3, 0.9))
            shapes.append(scenes.Shape(scenes.ellipse(x, y - h * 0.9, h * 0.1, h * 0.1), head))
    for _ in range(rng.integers(0, cfg.occluders + 1)):
        w, h = rng.uniform(0.08, cfg.occluder_size, 2)
        x, y = rng.uniform(-0.1, 1.0, 2)
        box = scenes.rect(x, y, x + w, y + h)
        if rng.random() < 0.5:
            box = scenes.ellipse(x + w / 2, y + h / 2, w / 2, h / 2)
        shapes.append(scenes.Shape(box, scenes.random_color(rng)))
    return shapes


@functools.lru_cache(maxsize=8)
def _centred_grid(size: int) -> np.ndarray:
    """float32 [size, size, 2] pixel (x, y) positions scaled to -0.5..0.5."""
    yx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    return np.stack([yx[1], yx[0]], axis=-1)


def _photometric(rng: np.random.Generator, rgb: np.ndarray, cfg: ViewConfig) -> np.ndarray:
    """Colour balance, exposure, a lighting ramp and sensor noise on float32 [S, S, 3] 0..255."""
    t = rng.uniform(-cfg.hue_shift, cfg.hue_shift) * 2 * np.pi
    k = np.full((3, 3), 1 / 3)  # projection onto the grey axis
    skew = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3)
    hue = k + np.cos(t) * (np.eye(3) - k) + np.sin(t) * skew  # rotation about the grey axis
    s = rng.uniform(*cfg.saturation)
    sat = k + s * (np.eye(3) - k)
    cast = np.diag(1 + rng.uniform(-cfg.color_cast, cfg.color_cast, 3))
    colour = (cast @ sat @ hue).T
    # Contrast about the mean, folded into the colour matrix: x' = c * x + (1 - c) * mean.
    contrast = rng.uniform(*cfg.contrast)
    mean = (rgb.reshape(-1, 3).mean(axis=0) @ colour).mean()
    out = rgb @ (contrast * colour).astype(np.float32)
    out += np.float32((1 - contrast) * mean)
    direction = rng.normal(size=2)
    grid = _centred_grid(rgb.shape[0]) @ (direction / np.linalg.norm(direction)).astype(np.float32)
    gain = rng.uniform(*cfg.brightness) * (1 + rng.uniform(0, cfg.light_ramp) * 2 * grid)
    out *= gain[..., None].astype(np.float32)
    sigma = rng.uniform(0, cfg.noise_std)
    if sigma > 0:
        # Uniform noise of standard deviation sigma: 7x cheaper to draw than Gaussian noise.
        out += (rng.random(out.shape, dtype=np.float32) - 0.5) * np.float32(sigma * 12**0.5)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def render_view(scene: scenes.Scene, rng: np.random.Generator, size: int, cfg: ViewConfig):
    """One random photo of `scene`: uint8 [size, size, 3]."""
    big = size * cfg.supersample
    camera = random_camera(rng, cfg)
    shade = np.where(scene.faces == scenes.SIDE, rng.uniform(*cfg.side_light), 1.0)
    image = _sky(rng, big, cfg.sky)
    draw = ImageDraw.Draw(image)
    colors = _to_uint8(scene.colors * shade[:, None])
    _draw(draw, project(camera, scene.points) * big, scene, colors)
    clutter = _clutter(rng, cfg)
    if clutter:
        front = scenes.Scene.from_shapes(clutter)
        _draw(draw, front.points * big, front, _to_uint8(front.colors))
    image = image.reduce(cfg.supersample)  # box filter: each output pixel averages ss x ss
    radius = rng.uniform(0, cfg.blur_radius)
    if radius > 0.2:
        image = image.filter(ImageFilter.BoxBlur(radius))  # 5x cheaper than GaussianBlur
    return _photometric(rng, np.asarray(image, dtype=np.float32), cfg)


def encode_jpeg(rng: np.random.Generator, pixels: np.ndarray, cfg: ViewConfig) -> bytes:
    """JPEG bytes of uint8 [H, W, 3] `pixels` at a random quality within the config's range."""
    buf = io.BytesIO()
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
