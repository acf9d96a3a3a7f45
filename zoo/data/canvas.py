"""Fashion-MNIST on a cluttered canvas: a localisation dataset with exact boxes, generated on the fly.

``FashionCanvas`` places one Fashion-MNIST item at a random position and scale on a black ``size`` x ``size``
canvas among fragments of other items (clutter), so every image has a class and a ground-truth box, as CUB's.
``FashionCanvasMulti`` places 2-3 items of distinct classes, apart from each other, and labels the image with a
multi-hot vector, as VOC's. Both read Fashion-MNIST through ``FashionMNISTIdx`` (the Debian package's idx files,
by default) or ``FashionMNIST`` (torchvision's layout, ``source="torchvision"``), and a canvas of a split only
uses that split's items.

Canvas ``index`` of a split is drawn from ``numpy.random.default_rng`` seeded by ``SeedSequence([seed, split
code, index])`` (train 0, test 1), so it is the same, byte for byte, in any process and order of reading. That
sequence spawns two generators: one for the objects (items, sizes, places), one for the clutter, so changing the
amount of clutter leaves the objects where they were.

How a canvas is made:

- objects: the first is Fashion-MNIST item ``index % n`` of the split (with the default ``count`` every item is
  the object of one canvas); the others, for the multi-object variant, are random items of other classes, all
  the classes of a canvas distinct. Each is resized (bilinear) to a square of a random side (a fraction ``scale``
  of the canvas: 24-56 px at 96 px for one object, 20-40 px for several) and placed wholly inside the canvas, at
  a random place where its box stays ``GAP`` pixels away from the earlier objects' boxes (``RANDOM_TRIES``
  random places, then a random one among all those that do); an object that fits nowhere is shrunk by
  ``SHRINK`` and placed again, and dropped after ``MAX_SHRINKS`` (never seen at the default sizes; the first
  object always fits);
- clutter: ``clutter`` fragments (2-5 by default), each a square crop of 25-40 % of the side of another random
  item of the split, centred on one of its non-zero pixels, resized as an object would be, dimmed to 35-70 % of
  its intensity and pasted at a random place; fragments combine by the maximum of intensities;
- the objects are then drawn on top through their silhouettes (their non-zero pixels): the object's pixels are
  exactly its own, and the clutter stays everywhere else, including inside the object's box.

An object's box is the tight box of its non-zero pixels as placed (XYXY, x2 and y2 one past the last pixel, the
package's convention), not the square pasted. The image is RGB (the grey canvas on three channels).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image

from .base import ImageDataset, Sample, make_target
from .classification import FashionMNIST, FashionMNISTIdx

__all__ = ["CanvasObject", "FashionCanvas", "FashionCanvasMulti", "Fragment", "Scene"]

SPLIT_CODES = {"train": 0, "test": 1}
SOURCES = ("idx", "torchvision")
SINGLE_SCALE = (0.25, 0.5834)  # an object's side as a fraction of the canvas's: 24-56 px at 96
MULTI_SCALE = (0.21, 0.42)  # 20-40 px at 96, so that three fit apart
FRAGMENT_SIDE = (0.25, 0.40)  # a fragment's side as a fraction of its item's (28 px)
FRAGMENT_GAIN = (90, 180)  # a fragment's intensity, in 256ths of its item's: 35-70 %
CLUTTER = (2, 5)
GAP = 2  # pixels between the boxes of two objects
RANDOM_TRIES = 10  # random places tried for an object before searching them all
SHRINK = 0.85  # an object that fits nowhere is shrunk by this factor ...
MAX_SHRINKS = 4  # ... at most this many times, then dropped
MIN_SIZE = 16


class CanvasObject(NamedTuple):
    """An object of a canvas: its Fashion-MNIST item (index in the split), class, square placed, and tight box."""

    item: int
    label: int
    x: int
    y: int
    side: int
    box: tuple[int, int, int, int]


class Fragment(NamedTuple):
    """A clutter fragment: its item, the crop of the 28x28 item (XYXY), where it went and its side, its gain /256."""

    item: int
    crop: tuple[int, int, int, int]
    x: int
    y: int
    side: int
    gain: int


class Scene(NamedTuple):
    """A canvas before it becomes a sample: the grey pixels [size, size] (uint8), its objects and fragments."""

    pixels: np.ndarray
    objects: list[CanvasObject]
    fragments: list[Fragment]


def as_range(value: int | Sequence[int], name: str, low: int) -> tuple[int, int]:
    """``value`` as an inclusive range: an int n is (n, n); a pair is kept; both ends at least ``low``."""
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or not all(isinstance(end, int | np.integer) for end in pair):
        raise ValueError(f"{name}={value!r}: expected an int or a pair of ints (low, high)")
    if not low <= pair[0] <= pair[1]:
        raise ValueError(f"{name}={value!r}: expected {low} <= low <= high")
    return int(pair[0]), int(pair[1])


def resized(pixels: np.ndarray, side: int) -> np.ndarray:
    """The square grey ``pixels`` resized to ``side`` x ``side`` (bilinear, antialiased when shrinking)."""
    if pixels.shape == (side, side):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR))


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """XYXY box of the True pixels of ``mask`` (x2, y2 one past the last), None if there are none."""
    rows, cols = mask.any(1), mask.any(0)
    if not rows.any():
        return None
    y1, x1 = int(rows.argmax()), int(cols.argmax())
    y2, x2 = len(rows) - int(rows[::-1].argmax()), len(cols) - int(cols[::-1].argmax())
    return x1, y1, x2, y2


def apart(box: Sequence[int], others: Sequence[Sequence[int]], gap: int) -> bool:
    """Whether ``box`` stays at least ``gap`` pixels away from each of ``others`` (XYXY)."""
    x1, y1, x2, y2 = box
    return all(
        x2 + gap <= ox1 or ox2 + gap <= x1 or y2 + gap <= oy1 or oy2 + gap <= y1 for ox1, oy1, ox2, oy2 in others
    )


class FashionCanvas(ImageDataset):
    """Fashion-MNIST items on a cluttered ``size`` x ``size`` canvas, with exact boxes (see the module's text).

    ``objects``: the number of items per canvas, an int or an inclusive range (low, high); with one object at
    most, ``label`` is the class index (int), else a float multi-hot tensor [10] over ``classes``.
    ``count``: canvases per split (default: the split's number of Fashion-MNIST items). ``seed``: an int >= 0.
    ``scale``: the range of an object's side as fractions of ``size`` (default 0.25-0.58 for one object,
    0.21-0.42 for several). ``clutter``: fragments per canvas, an int or a range (default 2-5; 0 for none).
    ``source``: "idx" reads ``root`` with ``FashionMNISTIdx`` (e.g. ``FASHION_MNIST_DEBIAN_DIR``), "torchvision"
    with ``FashionMNIST``, which ``download=True`` fetches.
    """

    layout = f"with source='idx' (default) {FashionMNISTIdx.layout}; with source='torchvision' {FashionMNIST.layout}"
    classes = tvd.FashionMNIST.classes
    downloadable = True

    def __init__(
        self,
        root,
        split: str,
        transforms=None,
        size: int = 96,
        objects: int | Sequence[int] = 1,
        count: int | None = None,
        seed: int = 0,
        source: str = "idx",
        scale: Sequence[float] | None = None,
        clutter: int | Sequence[int] = CLUTTER,
        download: bool = False,
    ):
        super().__init__(split, transforms)
        if not isinstance(size, int | np.integer) or size < MIN_SIZE:
            raise ValueError(f"size={size!r}: expected an int >= {MIN_SIZE}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected an int >= 0")
        if source not in SOURCES:
            raise ValueError(f"source={source!r}: expected one of {', '.join(SOURCES)}")
        if download and source != "torchvision":
            raise ValueError("download=True fetches torchvision's copy of Fashion-MNIST: it needs source='torchvision'")
        self.size, self.seed, self.source = int(size), int(seed), source
        self.objects = as_range(objects, "objects", 1)
        if self.objects[1] > len(self.classes):
            raise ValueError(f"objects={objects!r}: at most {len(self.classes)} objects (one per class)")
        self.multi_label = self.objects[1] > 1
        self.clutter = as_range(clutter, "clutter", 0)
        scale = scale if scale is not None else (MULTI_SCALE if self.multi_label else SINGLE_SCALE)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale={scale!r}: expected a pair 0 < low <= high <= 1 (fractions of size)")
        self.sides = (max(2, round(scale[0] * size)), max(2, round(scale[1] * size)))
        if not download:
            self.require(Path(root))
        if source == "idx":
            reader = FashionMNISTIdx(root, split)
            self.images, self.labels = reader.images, reader.labels
        else:
            reader = FashionMNIST(root, split, download=download)
            self.images, self.labels = reader.source.data.numpy(), reader.source.targets.numpy()
        if not len(self.labels):
            raise ValueError(f"{root}: no Fashion-MNIST item in the {split} split")
        blank = np.flatnonzero(self.images.reshape(len(self.images), -1).max(1) == 0)
        if blank.size:
            raise ValueError(f"{root}: Fashion-MNIST {split} item {blank[0]} is blank, it has no box")
        self.by_class = [np.flatnonzero(self.labels == label) for label in range(len(self.classes))]
        self.count = len(self.labels) if count is None else count
        if not isinstance(self.count, int | np.integer) or self.count < 0:
            raise ValueError(f"count={count!r}: expected an int >= 0")

    def __len__(self) -> int:
        return self.count

    def generators(self, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        """The generators of canvas ``index``: objects, clutter."""
        sequence = np.random.SeedSequence([self.seed, SPLIT_CODES[self.split], index])
        return tuple(np.random.default_rng(child) for child in sequence.spawn(2))

    def scene(self, index: int) -> Scene:
        """Canvas ``index``: its grey pixels, objects and clutter fragments."""
        if not 0 <= index < self.count:
            raise IndexError(f"canvas {index} out of range: {type(self).__name__} has {self.count} in {self.split}")
        object_rng, clutter_rng = self.generators(index)
        items = self.choose_items(index, object_rng)
        placed = self.place(items, object_rng)
        pixels = np.zeros((self.size, self.size), np.uint8)
        fragments = self.paste_clutter(pixels, {item for item, *_ in placed}, clutter_rng)
        objects = []
        for item, x, y, side, item_pixels, (bx1, by1, bx2, by2) in placed:
            region = pixels[y : y + side, x : x + side]
            silhouette = item_pixels > 0
            region[silhouette] = item_pixels[silhouette]
            box = (x + bx1, y + by1, x + bx2, y + by2)
            objects.append(CanvasObject(item, int(self.labels[item]), x, y, side, box))
        return Scene(pixels, objects, fragments)

    def choose_items(self, index: int, rng: np.random.Generator) -> list[int]:
        """Item ``index % n`` and, for several objects, random items of other classes, distinct from each other."""
        first = index % len(self.labels)
        wanted = int(rng.integers(self.objects[0], self.objects[1] + 1))
        if wanted == 1:
            return [first]
        others = [label for label, items in enumerate(self.by_class) if items.size and label != self.labels[first]]
        labels = rng.permutation(others)[: wanted - 1]
        return [first] + [int(self.by_class[label][rng.integers(self.by_class[label].size)]) for label in labels]

    def place(self, items: list[int], rng: np.random.Generator) -> list[tuple]:
        """Each item resized and placed: (item, x, y, side, resized pixels, tight box in them); see the module."""
        placed, boxes = [], []
        for item in items:
            side = int(rng.integers(self.sides[0], self.sides[1] + 1))
            for _ in range(MAX_SHRINKS + 1):
                pixels = resized(self.images[item], side)
                inner = tight_box(pixels > 0)
                where = self.find_place(inner, side, boxes, rng) if inner else None
                if where:
                    x, y = where
                    placed.append((item, x, y, side, pixels, inner))
                    boxes.append((x + inner[0], y + inner[1], x + inner[2], y + inner[3]))
                    break
                side = max(2, round(side * SHRINK))
        return placed

    def find_place(self, inner, side: int, boxes: list, rng: np.random.Generator) -> tuple[int, int] | None:
        """Where a square of ``side`` whose object has the tight box ``inner`` keeps its box ``GAP`` pixels from
        ``boxes``: a random place among ``RANDOM_TRIES``, else a random one among all that do, else None."""
        for _ in range(RANDOM_TRIES):
            x, y = (int(value) for value in rng.integers(0, self.size - side + 1, 2))
            if apart((x + inner[0], y + inner[1], x + inner[2], y + inner[3]), boxes, GAP):
                return x, y
        ys, xs = np.mgrid[0 : self.size - side + 1, 0 : self.size - side + 1]
        x1, y1, x2, y2 = xs + inner[0], ys + inner[1], xs + inner[2], ys + inner[3]
        free = np.ones(xs.shape, bool)
        for ox1, oy1, ox2, oy2 in boxes:
            free &= (x2 + GAP <= ox1) | (ox2 + GAP <= x1) | (y2 + GAP <= oy1) | (oy2 + GAP <= y1)
        candidates = np.flatnonzero(free)
        if not candidates.size:
            return None
        chosen = int(candidates[rng.integers(candidates.size)])
        return int(xs.flat[chosen]), int(ys.flat[chosen])

    def paste_clutter(self, pixels: np.ndarray, exclude: set[int], rng: np.random.Generator) -> list[Fragment]:
        """Paste the fragments of other items onto ``pixels`` (maximum of intensities); they are returned."""
        fragments = []
        count = int(rng.integers(self.clutter[0], self.clutter[1] + 1))
        for _ in range(count):
            item = int(rng.integers(len(self.labels)))
            for _ in range(8):  # another item than the objects', where the split has one
                if item not in exclude:
                    break
                item = int(rng.integers(len(self.labels)))
            source = self.images[item]
            height, width = source.shape
            crop = max(2, round(min(height, width) * rng.uniform(*FRAGMENT_SIDE)))
            ys, xs = np.nonzero(source)
            centre = int(rng.integers(ys.size))
            y0 = min(max(int(ys[centre]) - crop // 2, 0), height - crop)
            x0 = min(max(int(xs[centre]) - crop // 2, 0), width - crop)
            object_side = int(rng.integers(self.sides[0], self.sides[1] + 1))
            side = min(self.size, max(2, round(crop * object_side / width)))
            gain = int(rng.integers(FRAGMENT_GAIN[0], FRAGMENT_GAIN[1] + 1))
            patch = (resized(np.ascontiguousarray(source[y0 : y0 + crop, x0 : x0 + crop]), side) * np.uint16(gain)) >> 8
            x, y = (int(value) for value in rng.integers(0, self.size - side + 1, 2))
            region = pixels[y : y + side, x : x + side]
            np.maximum(region, patch.astype(np.uint8), out=region)
            fragments.append(Fragment(item, (x0, y0, x0 + crop, y0 + crop), x, y, side, gain))
        return fragments

    def load(self, index: int) -> Sample:
        scene = self.scene(index)
        image = Image.fromarray(np.repeat(scene.pixels[:, :, None], 3, axis=2))
        box_labels = [obj.label for obj in scene.objects]
        if self.multi_label:
            label = torch.zeros(len(self.classes)).index_fill_(0, torch.tensor(box_labels), 1.0)
        else:
            label = box_labels[0]
        return image, make_target(image, label, [obj.box for obj in scene.objects], box_labels)


class FashionCanvasMulti(FashionCanvas):
    """``FashionCanvas`` with 2-3 objects of distinct classes per canvas (``objects=(2, 3)``), multi-hot labels."""

    def __init__(self, root, split: str, transforms=None, size: int = 96, objects=(2, 3), **options):
        super().__init__(root, split, transforms, size=size, objects=objects, **options)
