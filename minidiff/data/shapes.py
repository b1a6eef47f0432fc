"""Captioned shapes: one coloured circle, square or triangle on black, drawn from exact attributes,
with the caption ``a {size} {color} {shape} {position}``; and the analytic checker that reads the
attributes back from any image (a real one, or a text-to-image model's sample).

    data = load_shapes(8000, seed=0)                 # CaptionedDataset, 32x32 RGB in [-1, 1]
    data.captions[0]                                 # 'a large blue triangle at the top right'
    data.attributes["color"][0]                      # 2: an index into COLORS
    read_attributes(data.images[:4])                 # the same attributes, read from the pixels

Everything is generated (no download) from ``seed``: the training and held-out splits draw from
independent generators spawned from it, so they never share a draw. The digits get captions too
(``caption_digits``: "a handwritten seven").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .dataset import Dataset
from .images import from_uint8, to_uint8

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 70, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (7.0, 9.0), "large": (13.0, 16.0)}  # bounding-box side in pixels at 32x32
POSITIONS = {
    "at the top left": (8.0, 8.0),
    "at the top right": (24.0, 8.0),
    "at the bottom left": (8.0, 24.0),
    "at the bottom right": (24.0, 24.0),
    "in the center": (16.0, 16.0),
}
JITTER = 2.0  # the centre moves by up to this many pixels each way (at 32x32)
BASE_SIZE = 32  # the resolution the numbers above are given at; they scale with the image
ATTRIBUTES = ("size", "color", "shape", "position")
CHOICES = {
    "size": tuple(SIZES),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
}
SUPERSAMPLE = 4  # sub-pixel samples per pixel side: the anti-aliasing is a 4x4 box filter
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# every word a caption of this module can hold (the vocabulary of a tokenizer of captions)
WORDS = tuple(
    dict.fromkeys(["a", "handwritten", *SIZES, *COLORS, *SHAPES, *" ".join(POSITIONS).split(), *DIGIT_NAMES])
)


@dataclass(frozen=True, eq=False)
class CaptionedDataset(Dataset):
    """A Dataset whose images each have a caption and, for generated data, the attributes they
    were drawn from: ``attributes[name]`` is an int64 (N,) array of indices into
    ``CHOICES[name]``, and ``geometry`` holds float64 (N,) arrays ``side``, ``cx``, ``cy`` (pixels
    at the image's resolution)."""

    captions: tuple[str, ...] = ()
    attributes: dict = field(default_factory=dict)
    geometry: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if len(self.captions) != len(self.images):
            raise ValueError(
                f"Dataset {self.name!r}: {len(self.captions)} captions for {len(self.images)} images"
            )
        for name, values in {**self.attributes, **self.geometry}.items():
            if np.shape(values) != (len(self.images),):
                raise ValueError(
                    f"Dataset {self.name!r}: attribute {name!r} has shape {np.shape(values)}, "
                    f"expected ({len(self.images)},)"
                )

    def subset(self, indices, name: str | None = None) -> CaptionedDataset:
        indices = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels[indices]
        return CaptionedDataset(
            self.images[indices],
            labels,
            self.num_classes,
            name or self.name,
            self.class_names,
            captions=tuple(self.captions[i] for i in indices),
            attributes={k: v[indices] for k, v in self.attributes.items()},
            geometry={k: v[indices] for k, v in self.geometry.items()},
        )

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, captions={len(self.captions)})"


# -- captions ---------------------------------------------------------------------------------------


def caption(size=None, color=None, shape=None, position=None) -> str:
    """``a {size} {color} {shape} {position}``; an attribute given as None is left out (a missing
    shape reads "shape": "a red shape at the top left")."""
    words = ["a", size, color, shape or "shape", position]
    return " ".join(w for w in words if w)


def captions_of(attributes: dict, keep: dict | None = None) -> list[str]:
    """The caption of each image from its attribute indices; ``keep[name]`` (bool (N,)) says
    which images keep that attribute in their caption (all do where it is not given)."""
    n = len(next(iter(attributes.values())))
    keep = keep or {}
    out = []
    for i in range(n):
        parts = {
            name: CHOICES[name][attributes[name][i]] if keep.get(name, np.ones(n, bool))[i] else None
            for name in ATTRIBUTES
        }
        out.append(caption(**parts))
    return out


def drop_attributes(attributes: dict, rng: np.random.Generator, p: float = 0.15) -> list[str]:
    """Training captions: each image's size, colour and position are each left out with
    probability ``p`` (the shape is always named), so partial prompts such as "a red circle"
    are in the training distribution."""
    n = len(attributes["shape"])
    keep = {name: rng.random(n) >= p for name in ("size", "color", "position")}
    return captions_of(attributes, keep)


def caption_digits(dataset: Dataset) -> CaptionedDataset:
    """The digits (or any dataset labelled 0..9) with the captions "a handwritten {digit}"."""
    if dataset.labels is None or dataset.num_classes != 10:
        raise ValueError(f"caption_digits: {dataset.name!r} is not labelled with the ten digits")
    captions = tuple(f"a handwritten {DIGIT_NAMES[y]}" for y in dataset.labels)
    return CaptionedDataset(
        dataset.images, dataset.labels, 10, dataset.name, dataset.class_names, captions=captions
    )


# -- drawing ---------------------------------------------------------------------------------------


def coverage(shape: str, side: float, cx: float, cy: float, image_size: int = BASE_SIZE) -> np.ndarray:
    """The share of each pixel (H, W) float64 that the shape covers, estimated on a grid of
    SUPERSAMPLE x SUPERSAMPLE points per pixel. Pixel (i, j) spans [j, j+1) x [i, i+1); the
    triangle points up, its base (width ``side``) at cy + side/2, its apex at cy - side/2."""
    s = SUPERSAMPLE
    offsets = (np.arange(s) + 0.5) / s
    points = (np.arange(image_size)[:, None] + offsets[None, :]).reshape(-1)  # sub-pixel centres
    y, x = points[:, None], points[None, :]
    half = side / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        depth = y - (cy - half)  # distance below the apex; the half-width grows by 1/2 per pixel
        inside = (depth >= 0) & (depth <= side) & (np.abs(x - cx) <= depth / 2)
    else:
        raise ValueError(f"coverage: unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(image_size, s, image_size, s).mean(axis=(1, 3))


def draw(
    shape: str, color: str, side: float, cx: float, cy: float, image_size: int = BASE_SIZE
) -> np.ndarray:
    """One uint8 (3, H, W) image: ``color`` times the shape's coverage, on black."""
    if color not in COLORS:
        raise ValueError(f"draw: unknown color {color!r}; expected one of {tuple(COLORS)}")
    cover = coverage(shape, side, cx, cy, image_size)
    rgb = np.asarray(COLORS[color], dtype=np.float64)[:, None, None]
    return np.clip(np.rint(rgb * cover[None]), 0, 255).astype(np.uint8)


def sample_attributes(n: int, rng: np.random.Generator, image_size: int = BASE_SIZE) -> tuple[dict, dict]:
    """(attributes, geometry) of ``n`` random objects: every attribute uniform over its choices,
    the side uniform in its size's range and the centre jittered uniformly, scaled to
    ``image_size``."""
    attributes = {name: rng.integers(0, len(CHOICES[name]), n) for name in ATTRIBUTES}
    scale = image_size / BASE_SIZE
    low = np.array([SIZES[s][0] for s in CHOICES["size"]])[attributes["size"]]
    high = np.array([SIZES[s][1] for s in CHOICES["size"]])[attributes["size"]]
    centres = np.array([POSITIONS[p] for p in CHOICES["position"]])[attributes["position"]]
    jitter = rng.uniform(-JITTER, JITTER, (n, 2))
    geometry = {
        "side": rng.uniform(low, high) * scale,
        "cx": (centres[:, 0] + jitter[:, 0]) * scale,
        "cy": (centres[:, 1] + jitter[:, 1]) * scale,
    }
    return attributes, geometry


SPLITS = ("train", "held_out")


def load_shapes(count: int = 8000, image_size: int = BASE_SIZE, seed: int = 0, split: str = "train"):
    """``count`` captioned shapes at ``image_size`` (32, or 64), as a CaptionedDataset. The
    same (count, image_size, seed, split) always gives the same images; "train" and "held_out"
    draw from independent generators spawned from ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"load_shapes: split must be one of {SPLITS}, got {split!r}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"load_shapes: count must be a positive int, got {count!r}")
    if image_size % 16:
        raise ValueError(f"load_shapes: image_size must be a multiple of 16 (32 or 64), got {image_size!r}")
    generator = np.random.default_rng(np.random.SeedSequence(seed).spawn(len(SPLITS))[SPLITS.index(split)])
    attributes, geometry = sample_attributes(count, generator, image_size)
    pixels = np.empty((count, 3, image_size, image_size), dtype=np.uint8)
    for i in range(count):
        pixels[i] = draw(
            SHAPES[attributes["shape"][i]],
            CHOICES["color"][attributes["color"][i]],
            geometry["side"][i],
            geometry["cx"][i],
            geometry["cy"][i],
            image_size,
        )
    return CaptionedDataset(
        from_uint8(pixels),
        None,
        None,
        "shapes" if split == "train" else f"shapes[{split}]",
        captions=tuple(captions_of(attributes)),
        attributes=attributes,
        geometry=geometry,
    )


def parse_caption(text: str) -> dict:
    """The attributes a caption of this grammar names, as indices into CHOICES (a left-out
    attribute is absent): ``parse_caption("a red circle") == {"color": 0, "shape": 0}``."""
    words = text.lower().split()
    found = {}
    for name in ("size", "color", "shape"):
        hits = [CHOICES[name].index(w) for w in words if w in CHOICES[name]]
        if len(hits) > 1:
            raise ValueError(f"parse_caption: {text!r} names more than one {name}")
        if hits:
            found[name] = hits[0]
    positions = [i for i, p in enumerate(CHOICES["position"]) if p in " ".join(words)]
    if positions:
        found["position"] = positions[0]
    return found


# -- the analytic checker ----------------------------------------------------------------------------

MIN_BRIGHTNESS = 60.0  # below this (of 255) no object is found
_PALETTE = np.array([COLORS[c] for c in CHOICES["color"]], dtype=np.float64)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def read_one(image) -> dict:
    """The attributes of the object in one image (3, H, W) (uint8, or floats in [-1, 1]):
    indices into CHOICES, or -1 where no object is found.

    - colour: the palette colour nearest (RGB distance) to the mean of the brightest pixels;
    - coverage: each pixel projected on that colour, clipped to [0, 1]; the object is the largest
      connected region covered more than half, with its neighbours;
    - size: the larger of the object's height (the largest column sum of coverage) and width
      (the largest row sum): the side of every shape, also when the border cuts it;
    - shape: a triangle where its rows widen going down (the slope of row width on row is over
      0.62; a triangle's is 1, a circle's 0, or up to 0.46 where the border cuts it) and the
      coverage fills under 74% of the height times the width (a triangle's half, and up to
      0.71 when small); else a square where it fills over 93% (a circle pi/4, at most 0.87);
    - position: the nearest of the five centres to the box's centre (the coverage's centroid,
      moved up by side/6 for a triangle, whose centroid sits below its box's centre)."""
    x = np.asarray(image)
    x = x.astype(np.float64) if x.dtype == np.uint8 else to_uint8(x).astype(np.float64)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"read_attributes: expected RGB images (3, H, W), got shape {x.shape}")
    none = {name: -1 for name in ATTRIBUTES}
    size = x.shape[-1]
    scale = size / BASE_SIZE
    brightness = x.max(axis=0)
    if brightness.max() < MIN_BRIGHTNESS:
        return none
    core = brightness >= 0.75 * brightness.max()
    color = int(np.argmin(((_PALETTE - x[:, core].mean(axis=1)) ** 2).sum(axis=1)))
    c = _PALETTE[color]
    cover = np.clip(np.tensordot(c, x, axes=1) / (c @ c), 0.0, 1.0)
    region = _largest_component(cover > 0.5)
    if not region.any():
        return {**none, "color": color}
    # the region grown by a pixel keeps the anti-aliased rim, and nothing farther away
    from scipy import ndimage

    cover = np.where(ndimage.binary_dilation(region, structure=np.ones((3, 3))), cover, 0.0)
    height = float(cover.sum(axis=0).max())  # the tallest column: the side of every shape
    width = float(cover.sum(axis=1).max())  # the widest row (a triangle's base)
    side = max(width, height)  # an object cut by the border keeps one of its two extents
    area = float(cover.sum())
    ys = np.arange(cover.shape[0]) + 0.5
    # each row's width, divided by its largest coverage so that a row the edge crosses counts
    # whole; the taper is how fast the rows widen going down (1 pixel per pixel for a triangle,
    # 0 for a circle or a square, whose rows widen and narrow again)
    peaks = cover.max(axis=1)
    rows = peaks > 0.1
    widths = cover.sum(axis=1)[rows] / peaks[rows]
    dy = ys[rows] - ys[rows].mean()
    taper = float((dy * widths).sum() / max((dy * dy).sum(), 1e-9))
    fill = area / max(width * height, 1e-9)  # a square fills its box, a circle pi/4, a triangle 1/2
    if taper > 0.62 and fill < 0.74:  # (a circle cut by the border tapers too, but fills more)
        shape = SHAPES.index("triangle")
    elif fill > 0.93:
        shape = SHAPES.index("square")
    else:
        shape = SHAPES.index("circle")
    cx = float((cover.sum(axis=0) * (np.arange(size) + 0.5)).sum() / area)
    cy = float((cover.sum(axis=1) * ys).sum() / area)
    if SHAPES[shape] == "triangle":
        cy -= side / 6
    centres = np.array([POSITIONS[p] for p in CHOICES["position"]]) * scale
    position = int(np.argmin(((centres - [cx, cy]) ** 2).sum(axis=1)))
    threshold = (SIZES["small"][1] + SIZES["large"][0]) / 2 * scale  # 11 px at 32x32
    size_index = CHOICES["size"].index("small" if side < threshold else "large")
    return {"size": size_index, "color": color, "shape": shape, "position": position}


def read_attributes(images) -> dict:
    """``read_one`` over a batch (N, 3, H, W): name -> int64 (N,) indices (-1: not found)."""
    images = np.asarray(images) if not hasattr(images, "__cuda_array_interface__") else images.get()
    if images.ndim != 4:
        raise ValueError(f"read_attributes: expected a batch (N, 3, H, W), got shape {images.shape}")
    found = [read_one(image) for image in images]
    return {name: np.array([f[name] for f in found], dtype=np.int64) for name in ATTRIBUTES}


def score(images, wanted: list[dict]) -> dict:
    """How many images show what was asked: ``wanted[i]`` is the attributes (indices, e.g. from
    ``parse_caption``) image i should have; returns the share of images right in each attribute
    asked for (over the images that asked for it), and ``all`` (every asked attribute right)."""
    if len(wanted) != len(images):
        raise ValueError(f"score: {len(wanted)} sets of attributes for {len(images)} images")
    found = read_attributes(images)
    right = {name: [] for name in ATTRIBUTES}
    every = []
    for i, asked in enumerate(wanted):
        ok = [found[name][i] == value for name, value in asked.items()]
        for (name, _), good in zip(asked.items(), ok):
            right[name].append(good)
        every.append(all(ok))
    result = {name: float(np.mean(v)) for name, v in right.items() if v}
    result["all"] = float(np.mean(every))
    return result


def attributes_of(dataset: CaptionedDataset) -> list[dict]:
    """Each image's attributes as the dicts ``score`` takes."""
    return [{name: int(dataset.attributes[name][i]) for name in ATTRIBUTES} for i in range(len(dataset))]
