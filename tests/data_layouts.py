"""Builders of the datasets' real on-disk layouts with a few tiny images, for tests.

Each image is black with a white rectangle over each of its boxes, so a test can find a box in the pixels.
"""

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = (96, 64)  # width, height


def draw_boxes(path: Path, boxes=(), size=IMAGE_SIZE) -> Path:
    """A black image with a white rectangle over each XYXY box (0-based, x2 and y2 excluded), saved by suffix."""
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for x1, y1, x2, y2 in boxes:
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill="white")  # PIL includes both corners
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)  # quality: JPEG's, ignored by PNG
    return path


def make_image_folder(root: Path, classes=("n01440764", "n01443537"), per_class=2, splits=("train", "val")) -> Path:
    """ImageNet-style ``root/<split>/<class>/<image>.JPEG``."""
    for split in splits:
        for name in classes:
            for index in range(per_class):
                draw_boxes(root / split / name / f"{name}_{index}.JPEG", [(8, 8, 24, 24)])
    return root


@dataclass
class CubImage:
    """One CUB image as its lines give it: 1-based class id, split flag, ``x y width height``."""

    class_id: int
    train: bool
    box: tuple[float, float, float, float]
    size: tuple[int, int] = IMAGE_SIZE


CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
CUB_IMAGES = (
    CubImage(1, True, (24, 16, 48, 32)),
    CubImage(2, False, (0, 0, 96, 64)),
    CubImage(3, True, (10.0, 5.0, 30.0, 40.0)),
    CubImage(2, True, (60, 30, 20, 20)),
)


def make_cub(root: Path, images=CUB_IMAGES, classes=CUB_CLASSES) -> Path:
    """``root/CUB_200_2011`` as the official archive extracts it; image ids are 1, 2, ... in ``images`` order."""
    folder = root / "CUB_200_2011"
    tables = {name: [] for name in ("images", "image_class_labels", "train_test_split", "bounding_boxes")}
    for image_id, image in enumerate(images, 1):
        class_folder = classes[image.class_id - 1]
        relative = f"{class_folder}/{class_folder[4:]}_{image_id:04d}_{1000 + image_id}.jpg"
        x, y, width, height = image.box
        draw_boxes(folder / "images" / relative, [(x, y, x + width, y + height)], image.size)
        tables["images"].append(f"{image_id} {relative}")
        tables["image_class_labels"].append(f"{image_id} {image.class_id}")
        tables["train_test_split"].append(f"{image_id} {int(image.train)}")
        tables["bounding_boxes"].append(f"{image_id} {float(x)} {float(y)} {float(width)} {float(height)}")
    tables["classes"] = [f"{class_id} {name}" for class_id, name in enumerate(classes, 1)]
    for name, lines in tables.items():
        (folder / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
    return folder


@dataclass
class VocObject:
    """One ``<object>``: class name, ``xmin ymin xmax ymax`` (1-based, inclusive) and the difficult flag."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False


@dataclass
class VocImage:
    """One VOC image: its id, the ImageSets split listing it, its objects."""

    image_id: str
    split: str
    objects: tuple[VocObject, ...]
    size: tuple[int, int] = IMAGE_SIZE


VOC_IMAGES = (
    VocImage("2008_000008", "train", (VocObject("dog", (25, 17, 48, 32)),)),
    VocImage(
        "2008_000015",
        "train",
        (
            VocObject("dog", (1, 1, 20, 20)),
            VocObject("cat", (61, 31, 96, 64), difficult=True),
            VocObject("dog", (30, 40, 50, 60), difficult=True),
        ),
    ),
    VocImage(
        "2008_000019",
        "val",
        (VocObject("person", (11, 11.5, 40, 45.7)), VocObject("tvmonitor", (50, 5, 90, 30))),
    ),
)


def voc_annotation(image: VocImage) -> str:
    """The XML text of an annotation, laid out as VOC 2012's files are."""
    width, height = image.size
    objects = "".join(
        f"""
\t<object>
\t\t<name>{obj.name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<occluded>0</occluded>
\t\t<bndbox>
\t\t\t<xmin>{obj.box[0]}</xmin>
\t\t\t<ymin>{obj.box[1]}</ymin>
\t\t\t<xmax>{obj.box[2]}</xmax>
\t\t\t<ymax>{obj.box[3]}</ymax>
\t\t</bndbox>
\t\t<difficult>{int(obj.difficult)}</difficult>
\t</object>"""
        for obj in image.objects
    )
    return f"""<annotation>
\t<folder>VOC2012</folder>
\t<filename>{image.image_id}.jpg</filename>
\t<source>
\t\t<database>The VOC2008 Database</database>
\t\t<annotation>PASCAL VOC2008</annotation>
\t\t<image>flickr</image>
\t</source>
\t<size>
\t\t<width>{width}</width>
\t\t<height>{height}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>{objects}
</annotation>
"""


def make_voc(root: Path, images=VOC_IMAGES) -> Path:
    """``root/VOCdevkit/VOC2012`` with JPEGImages, Annotations and ImageSets/Main/{train,val,trainval}.txt."""
    folder = root / "VOCdevkit" / "VOC2012"
    (folder / "Annotations").mkdir(parents=True)
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    for image in images:
        pixel_boxes = [(xmin - 1, ymin - 1, xmax, ymax) for xmin, ymin, xmax, ymax in (o.box for o in image.objects)]
        draw_boxes(folder / "JPEGImages" / f"{image.image_id}.jpg", pixel_boxes, image.size)
        (folder / "Annotations" / f"{image.image_id}.xml").write_text(voc_annotation(image))
    for split in ("train", "val"):
        ids = [image.image_id for image in images if image.split == split]
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (folder / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i.image_id}\n" for i in images))
    return folder


def write_idx(path: Path, array: np.ndarray) -> Path:
    """``array`` (uint8) in idx format: magic 0x0000 0x08 ndim, big-endian int32 sizes, the bytes; gzip for .gz."""
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_fashion_mnist(folder: Path, train=6, test=4, compressed=True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four Fashion-MNIST idx files in ``folder`` (gzipped, as Debian ships them); their arrays by split."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        suffix = ".gz" if compressed else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[split] = images, labels
    return arrays
