"""Pascal VOC 2012 in its devkit layout: 20 classes, multi-label, boxes with a difficult flag."""

from pathlib import Path
from typing import NamedTuple
from xml.etree import ElementTree

import torch

from .base import ImageDataset, Sample, check_boxes, image_size, listed_path, make_target, parse, read_table

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class VocObject(NamedTuple):
    """One ``<object>`` of an annotation, its box converted to 0-based XYXY."""

    label: int
    box: tuple[float, float, float, float]
    difficult: bool
    source: str


class VocImage(NamedTuple):
    """One image of the split: its annotation and JPEG files, and the split file's line that listed it."""

    annotation: Path
    image: Path
    listed_at: str


def read_annotation(path: Path) -> list[VocObject]:
    """The objects of a VOC annotation file.

    A document type declaration is refused: VOC annotations have none, and without one there is no entity to
    expand (ElementTree never fetches external entities, and expat >= 2.4 also bounds expansion).
    """
    data = path.read_bytes()
    if b"<!DOCTYPE" in data:
        raise ValueError(f"{path}: refused, a VOC annotation has no document type declaration (<!DOCTYPE ...>)")
    try:
        annotation = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise ValueError(f"{path}: malformed XML ({error})") from None
    objects = []
    for number, element in enumerate(annotation.findall("object"), 1):
        source = f"{path}, object {number}"
        name = (element.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"{source}: unknown class {name!r}, not one of the 20 VOC classes")
        bndbox = element.find("bndbox")
        if bndbox is None:
            raise ValueError(f"{source}: no <bndbox>")
        xmin, ymin, xmax, ymax = (
            parse(f"{source}, {tag}", bndbox.findtext(tag), float) for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        difficult = parse(f"{source}, difficult", element.findtext("difficult", "0"), int)
        objects.append(VocObject(VOC_CLASSES.index(name), (xmin - 1, ymin - 1, xmax, ymax), difficult == 1, source))
    return objects


class VOC2012(ImageDataset):
    """Pascal VOC 2012, split ``train``, ``val`` or ``trainval`` by ImageSets/Main/<split>.txt.

    ``label`` is a float multi-hot over ``VOC_CLASSES``: 1 for a class with at least one object kept.
    ``difficult="keep"`` (default) keeps difficult objects, flagged in ``difficult``, so a class whose only
    instances are difficult is labelled 1 (VOC's own classification ground truth marks such a class 0,
    "difficult", and its evaluation ignores it). ``difficult="drop"`` removes them: such a class is labelled 0.
    Every id of the split file must be a plain name whose files lie inside their folders (see ``listed_path``).
    """

    splits = ("train", "val", "trainval")
    image_files = True
    layout = (
        "<root>/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/<split>.txt} "
        "(VOCtrainval_11-May-2012.tar extracted in root)"
    )
    classes = VOC_CLASSES

    def __init__(self, root, split: str, transforms=None, difficult: str = "keep"):
        super().__init__(split, transforms)
        if difficult not in ("keep", "drop"):
            raise ValueError(f"difficult={difficult!r}: expected 'keep' or 'drop'")
        self.keep_difficult = difficult == "keep"
        self.require(Path(root))
        folder = self.require(Path(root) / "VOCdevkit" / "VOC2012")
        self.images = [
            VocImage(
                annotation=listed_path(folder / "Annotations", image_id, listed_at, "<id>", ".xml"),
                image=listed_path(folder / "JPEGImages", image_id, listed_at, "<id>", ".jpg"),
                listed_at=listed_at,
            )
            for listed_at, (image_id,) in read_table(self.require(folder / "ImageSets" / "Main" / f"{split}.txt"), 1)
        ]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Sample:
        record = self.images[index]
        objects = read_annotation(self.require(record.annotation, record.listed_at))
        objects = [obj for obj in objects if self.keep_difficult or not obj.difficult]
        image = self.read_image(self.require(record.image, record.listed_at))
        check_boxes([obj.box for obj in objects], image_size(image), [obj.source for obj in objects])
        box_labels = torch.tensor([obj.label for obj in objects], dtype=torch.int64)
        label = torch.zeros(len(VOC_CLASSES)).index_fill_(0, box_labels, 1.0)
        boxes = [obj.box for obj in objects]
        return image, make_target(image, label, boxes, box_labels, [obj.difficult for obj in objects])
