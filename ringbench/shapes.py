"""Deterministic synthetic shapes: the embedded default data of every stage.

One renderer serves all three stages, so that a user with nothing on disk can run the whole suite:

* pretraining and linear/few-shot classification: :class:`SyntheticShapes`, one object per image,
  class = (shape, colour, texture), ``NUM_CLASSES = 8 * 8 * 4 = 256`` classes;
* detection, instance segmentation and keypoints: :func:`render_scene`, several objects per image
  with category = shape, a pixel mask and five keypoints per object (written out as COCO files by
  the Detectron2 glue).

Everything is a pure function of an explicit ``numpy.random.Generator``; the dataset seeds one per
``(seed, split, index)``, so the same image comes back on any machine and in any worker.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
COLOURS = {
    "red": (220, 50, 47),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 40),
    "green": (60, 170, 60),
    "cyan": (40, 190, 200),
    "blue": (40, 80, 210),
    "purple": (140, 60, 190),
    "white": (235, 235, 235),
}
TEXTURES = ("solid", "stripes", "checker", "dots")
NUM_SHAPES = len(SHAPES)
NUM_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)

# Keypoints in the object's own frame (unit radius, y down); they turn with the object.
KEYPOINT_NAMES = ("center", "top", "bottom", "left", "right")
_KEYPOINT_UV = np.array([[0.0, 0.0], [0.0, -0.8], [0.0, 0.8], [-0.8, 0.0], [0.8, 0.0]])
KEYPOINT_FLIP_MAP = (("left", "right"),)
KEYPOINT_SKELETON = ((1, 2), (1, 3), (1, 4), (1, 5))  # 1-based, as COCO's "skeleton"
# OKS sigmas. The centre is well defined; the four others turn with the object (up to 30 degrees),
# which a symmetric shape (circle, ring) does not show, so they get COCO's loosest sigma and more.
KEYPOINT_SIGMAS = (0.05, 0.1, 0.1, 0.1, 0.1)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def class_spec(label: int) -> tuple[str, str, str]:
    """``label`` in ``[0, NUM_CLASSES)`` -> ``(shape, colour, texture)``."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} outside [0, {NUM_CLASSES})")
    shape, rest = divmod(label, len(COLOURS) * len(TEXTURES))
    colour, texture = divmod(rest, len(TEXTURES))
    return SHAPES[shape], list(COLOURS)[colour], TEXTURES[texture]


def class_label(shape: str, colour: str, texture: str) -> int:
    return (SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour)) * len(TEXTURES) + TEXTURES.index(texture)


def _convex(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Inside test for a convex polygon whose vertices go by increasing angle in the (u, v) plane."""
    inside = np.ones(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, axis=0)):
        inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= -1e-9
    return inside


def _regular(n: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


_TRIANGLE = _regular(3, 1.0, -math.pi / 2)
_HEXAGON = _regular(6, 0.95, 0.0)
_STAR_A = _regular(3, 1.0, -math.pi / 2)
_STAR_B = _regular(3, 1.0, math.pi / 2)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of object-frame coordinates ``(u, v)`` (unit radius) in ``shape``."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 0.9
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        return _convex(u, v, _TRIANGLE)
    if shape == "diamond":  # an elongated rhombus, so that no rotation turns it into the square
        return np.abs(u) / 0.6 + np.abs(v) <= 1.0
    if shape == "star":
        return _convex(u, v, _STAR_A) | _convex(u, v, _STAR_B)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "hexagon":
        return _convex(u, v, _HEXAGON)
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.3)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Brightness factor in the object frame: 1 on the pattern, 0.4 off it."""
    if texture == "solid":
        on = np.ones(u.shape, dtype=bool)
    elif texture == "stripes":
        on = np.sin(u * 3.0 * math.pi) > 0
    elif texture == "checker":
        on = (np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 0
    elif texture == "dots":
        fu, fv = (u * 2.5) % 1.0 - 0.5, (v * 2.5) % 1.0 - 0.5
        on = fu * fu + fv * fv > 0.06
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.where(on, 1.0, 0.4)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Dim low-frequency colour gradient plus pixel noise (float, 0-255)."""
    corners = rng.uniform(10, 90, size=(2, 2, 3))
    ys = np.linspace(0, 1, height)[:, None, None]
    xs = np.linspace(0, 1, width)[None, :, None]
    top = corners[0, 0] * (1 - xs) + corners[0, 1] * xs
    bottom = corners[1, 0] * (1 - xs) + corners[1, 1] * xs
    image = top * (1 - ys) + bottom * ys
    return image + rng.normal(0, 8, size=(height, width, 3))


def _draw(
    image: np.ndarray, shape: str, colour: str, texture: str, cx: float, cy: float, radius: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one object onto ``image`` in place; return its mask and keypoints ``(K, 3)``."""
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * dx + sin * dy) / radius
    v = (-sin * dx + cos * dy) / radius
    mask = shape_mask(shape, u, v)
    shade = _texture(texture, u, v)[..., None] * np.asarray(COLOURS[colour], dtype=np.float64)
    image[mask] = shade[mask]
    kx = cx + radius * (cos * _KEYPOINT_UV[:, 0] - sin * _KEYPOINT_UV[:, 1])
    ky = cy + radius * (sin * _KEYPOINT_UV[:, 0] + cos * _KEYPOINT_UV[:, 1])
    inside = (kx >= 0) & (kx < width) & (ky >= 0) & (ky < height)
    keypoints = np.stack([kx, ky, np.where(inside, 2.0, 0.0)], axis=1)
    keypoints[~inside, :2] = 0.0
    return mask, keypoints


def _finish(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_classification(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One object of class ``label`` at a random position, scale and rotation: ``uint8 (size, size, 3)``."""
    shape, colour, texture = class_spec(label)
    image = _background(rng, size, size)
    radius = size * rng.uniform(0.26, 0.4)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    _draw(image, shape, colour, texture, cx, cy, radius, rng.uniform(-math.pi, math.pi))
    return _finish(image)


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    max_objects: int = 4,
    min_objects: int = 1,
    min_radius: float = 0.08,
    max_radius: float = 0.2,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """An image with non-overlapping objects, for detection, segmentation and keypoints.

    Returns the image and one dict per object: ``category`` (shape index), ``bbox`` (tight
    ``[x, y, w, h]`` of the mask), ``mask`` (bool ``H x W``), ``keypoints`` (``(5, 3)``: x, y,
    visibility 2, or 0,0,0 outside the image). Radii are fractions of the shorter side; rotations
    stay within +-30 degrees so that "left" and "right" keypoints keep their meaning under flips.
    """
    if min_objects < 1 or max_objects < min_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    image = _background(rng, height, width)
    side = min(height, width)
    wanted = int(rng.integers(min_objects, max_objects + 1))
    placed: list[tuple[float, float, float]] = []
    objects: list[dict[str, Any]] = []
    for _ in range(wanted * 20):
        if len(objects) == wanted:
            break
        radius = side * rng.uniform(min_radius, max_radius)
        cx = rng.uniform(radius, width - radius)
        cy = rng.uniform(radius, height - radius)
        if any(math.hypot(cx - px, cy - py) < 1.05 * (radius + pr) for px, py, pr in placed):
            continue
        category = int(rng.integers(NUM_SHAPES))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        mask, keypoints = _draw(
            image, SHAPES[category], colour, texture, cx, cy, radius, rng.uniform(-math.pi / 6, math.pi / 6)
        )
        if mask.sum() < 4:
            continue
        rows, cols = np.nonzero(mask)
        x0, y0 = float(cols.min()), float(rows.min())
        bbox = [x0, y0, float(cols.max()) + 1 - x0, float(rows.max()) + 1 - y0]
        placed.append((cx, cy, radius))
        objects.append({"category": category, "bbox": bbox, "mask": mask, "keypoints": keypoints})
    return _finish(image), objects


def class_order(num_classes: int) -> np.ndarray:
    """The first ``num_classes`` labels of a fixed permutation, so that a small class subset
    still mixes shapes, colours and textures (rather than 'all circles')."""
    if not 1 <= num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes must be in [1, {NUM_CLASSES}], got {num_classes}")
    return np.random.default_rng(20210503).permutation(NUM_CLASSES)[:num_classes]


if TYPE_CHECKING:
    from torch.utils.data import Dataset as _Dataset
else:
    try:
        from torch.utils.data import Dataset as _Dataset
    except ImportError:  # pragma: no cover - torch is a dependency
        _Dataset = object


class SyntheticShapes(_Dataset):
    """Classification dataset: ``images_per_class`` images of each of ``num_classes`` classes.

    Item ``i`` is ``(PIL image, label)`` with ``label = i % num_classes`` in ``[0, num_classes)``
    (an index into :func:`class_order`); each split draws from its own seed stream, so splits
    never share an image. ``targets`` lists the labels (as torchvision datasets do).
    """

    def __init__(
        self,
        num_classes: int = 64,
        images_per_class: int = 100,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        transform: Any = None,
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {list(_SPLIT_IDS)}, got {split!r}")
        if images_per_class < 1 or image_size < 8:
            raise ValueError("need images_per_class >= 1 and image_size >= 8")
        self.classes = [" ".join(class_spec(int(c))) for c in class_order(num_classes)]
        self._labels = class_order(num_classes)
        self.num_classes = num_classes
        self.images_per_class = images_per_class
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.transform = transform
        self.targets = [i % num_classes for i in range(len(self))]

    def __len__(self) -> int:
        return self.num_classes * self.images_per_class

    def image(self, index: int) -> np.ndarray:
        """The raw ``uint8`` image of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        return render_classification(int(self._labels[index % self.num_classes]), rng, self.image_size)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        img = Image.fromarray(self.image(index))
        if self.transform is not None:
            img = self.transform(img)
        return img, index % self.num_classes
