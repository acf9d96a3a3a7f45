"""Bad input to the dataset readers: list entries that lead outside the dataset, boxes beyond the evaluation crop."""

import builtins
import io
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from data_layouts import VOC_IMAGES, CubImage, VocImage, VocObject, draw_boxes, make_cub, make_voc, voc_annotation
from torchvision import tv_tensors
from torchvision.ops import box_area

from zoo.data import CUB200, VOC2012, VOC_CLASSES
from zoo.data.transforms import eval_transform

CONFIG = {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875,
          "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # fmt: skip
CUB_SIZE = (500, 375)  # width, height: a typical CUB image
RESIZED = (341, 256)  # shorter side to 224 / 0.875 = 256, the longer side int(500 * 256 / 375)
CROP_CORNER = (58, 16)  # left, top of the 224 x 224 centre crop: round((341 - 224) / 2), (256 - 224) / 2


@contextmanager
def files_opened():
    """The resolved path of every file opened in the block (by ``open`` or ``io.open``, as PIL and pathlib do)."""
    paths, real_open = [], io.open

    def spy(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike):
            paths.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", spy)
        patch.setattr(io, "open", spy)
        yield paths


def read_every_sample(dataset):
    return [dataset[index] for index in range(len(dataset))]


def refusal(list_file: Path, number: int, entry: str) -> str:
    """The start of the ValueError refusing ``entry``, line ``number`` of ``list_file``."""
    return re.escape(f"{list_file}:{number}: refused {entry!r}")


@pytest.mark.parametrize(
    ("entry", "symlink"),
    [
        ("../../../outside.jpg", False),
        ("{outside}/outside.jpg", False),  # absolute
        ("001.Black_footed_Albatross/../../../../outside.jpg", False),
        ("001.Black_footed_Albatross/..", False),  # a name starting with "."
        ("escape/outside.jpg", True),  # images/escape: a symbolic link to the folder outside
    ],
    ids=["parent", "absolute", "parent-within", "dot-name", "symlink"],
)
def test_cub_image_entry_leading_outside_is_refused_before_any_read(tmp_path, entry, symlink):
    planted = draw_boxes(tmp_path / "outside.jpg", [(24, 16, 48, 32)])
    folder = make_cub(tmp_path / "root")
    if symlink:
        (folder / "images" / "escape").symlink_to(tmp_path, target_is_directory=True)
    entry = entry.format(outside=tmp_path)
    listed = "001.Black_footed_Albatross/Black_footed_Albatross_0001_1001.jpg"
    (folder / "images.txt").write_text((folder / "images.txt").read_text().replace(listed, entry, 1))
    with files_opened() as opened, pytest.raises(ValueError, match=refusal(folder / "images.txt", 1, entry)):
        read_every_sample(CUB200(tmp_path / "root", "train"))
    assert planted.resolve() not in opened


@pytest.mark.parametrize(
    ("image_id", "symlink"),
    [
        ("../../../../x", False),
        ("{outside}/x", False),  # absolute
        ("2008_000008/../../../../../x", False),
        ("..", False),  # names starting with "."
        (".x", False),
        ("escape", True),  # JPEGImages/escape.jpg, Annotations/escape.xml: symbolic links to the files outside
    ],
    ids=["parent", "absolute", "parent-within", "dot-dot", "dot-name", "symlink"],
)
def test_voc_image_id_leading_outside_is_refused_before_any_read(tmp_path, image_id, symlink):
    planted_image = draw_boxes(tmp_path / "x.jpg", [(24, 16, 48, 32)])
    planted_annotation = tmp_path / "x.xml"
    planted_annotation.write_text(voc_annotation(VOC_IMAGES[0]))
    folder = make_voc(tmp_path / "root")
    if symlink:
        (folder / "JPEGImages" / "escape.jpg").symlink_to(planted_image)
        (folder / "Annotations" / "escape.xml").symlink_to(planted_annotation)
    image_id = image_id.format(outside=tmp_path)
    split_file = folder / "ImageSets" / "Main" / "train.txt"
    split_file.write_text(split_file.read_text().replace("2008_000008", image_id, 1))
    with files_opened() as opened, pytest.raises(ValueError, match=refusal(split_file, 1, image_id)):
        read_every_sample(VOC2012(tmp_path / "root", "train"))
    assert not {planted_image.resolve(), planted_annotation.resolve()} & set(opened)


def after_eval_crop(box):
    """An XYXY box of a 500x375 image as ``eval_transform`` should leave it: scaled to 341x256, shifted by the
    crop's corner, clipped to the 224 x 224 crop."""
    (width, height), (left, top) = RESIZED, CROP_CORNER
    scale = (width / CUB_SIZE[0], height / CUB_SIZE[1]) * 2
    shift = (left, top) * 2
    return [min(max(value * factor - offset, 0), 224) for value, factor, offset in zip(box, scale, shift, strict=True)]


@pytest.mark.parametrize(
    ("box", "visible"),
    [
        ((150, 100, 100, 100), True),  # inside the crop, which covers x 85-413, y 23-352 of the image
        ((20, 100, 200, 100), True),  # across the crop's left edge
        ((300, 250, 200, 125), True),  # across its right and bottom edges
        ((0, 100, 60, 100), False),  # wholly left of it
        ((100, 360, 200, 15), False),  # wholly below it
    ],
    ids=["inside", "left-edge", "right-bottom-edges", "outside-left", "outside-below"],
)
def test_cub_box_is_clipped_to_the_eval_crop_and_kept_when_outside(tmp_path, box, visible):
    make_cub(tmp_path, images=(CubImage(2, True, box, size=CUB_SIZE),))
    image, target = CUB200(tmp_path, "train", eval_transform(CONFIG))[0]
    x, y, width, height = box
    assert image.shape == (3, 224, 224) and target["boxes"].canvas_size == (224, 224)
    assert torch.allclose(target["boxes"], torch.tensor([after_eval_crop((x, y, x + width, y + height))]), atol=1e-3)
    assert (box_area(target["boxes"]) > 0).tolist() == [visible]
    assert target["box_labels"].tolist() == [1]


def test_voc_boxes_outside_the_eval_crop_stay_aligned_with_their_labels_and_flags(tmp_path):
    objects = (  # xmin ymin xmax ymax, 1-based inclusive
        VocObject("dog", (151, 101, 250, 200)),
        VocObject("cat", (1, 101, 60, 200), difficult=True),  # wholly left of the crop
        VocObject("person", (21, 101, 220, 200)),  # across its left edge
        VocObject("tvmonitor", (101, 361, 300, 375)),  # wholly below it
    )
    make_voc(tmp_path, images=(VocImage("2008_000008", "train", objects, size=CUB_SIZE),))
    _, target = VOC2012(tmp_path, "train", eval_transform(CONFIG))[0]
    expected = [after_eval_crop((x1 - 1, y1 - 1, x2, y2)) for x1, y1, x2, y2 in (obj.box for obj in objects)]
    assert torch.allclose(target["boxes"], torch.tensor(expected), atol=1e-3)
    assert (box_area(target["boxes"]) > 0).tolist() == [True, False, True, False]
    assert target["box_labels"].tolist() == [VOC_CLASSES.index(obj.name) for obj in objects]
    assert target["difficult"].tolist() == [False, True, False, False]


@pytest.mark.parametrize("clamping_mode", ["soft", "hard", None])
def test_eval_transform_clips_boxes_whatever_their_own_clamping_mode(clamping_mode):
    """A target built elsewhere may carry boxes that no transform clamps by itself (``clamping_mode=None``)."""
    image = tv_tensors.Image(torch.zeros(3, CUB_SIZE[1], CUB_SIZE[0], dtype=torch.uint8))
    boxes = [(20, 100, 220, 200), (0, 100, 60, 200), (100, 360, 300, 375)]
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY",
                                          canvas_size=CUB_SIZE[::-1], clamping_mode=clamping_mode),
        "box_labels": torch.arange(3),
    }  # fmt: skip
    _, target = eval_transform(CONFIG)(image, target)
    assert torch.allclose(target["boxes"], torch.tensor([after_eval_crop(box) for box in boxes]), atol=1e-3)
    assert target["box_labels"].tolist() == [0, 1, 2]
