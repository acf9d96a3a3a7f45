"""The sample format shared by every reader, the readers' base class, and the DataLoader helpers."""

import io
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import get_size, pil_to_tensor

from .device import EncodedBatch, EncodedImage

Target = dict[str, Any]
Sample = tuple[Image.Image | tv_tensors.Image | EncodedImage, Target]
PER_BOX_KEYS = ("box_labels", "difficult")
PLAIN_NAME = "[A-Za-z0-9_-][A-Za-z0-9_.-]*"
PLAIN_NAME_RULE = "letters, digits, '_', '-' and '.', not starting with '.'"
JPEG_MODES = ("RGB", "L")  # the JPEGs a device decodes into RGB as PIL's convert("RGB") does
END_OF_IMAGE = b"\xff\xd9"


def open_image(path: Path) -> Image.Image:
    """The RGB image at ``path``; a file that fails to decode is an OSError naming it (the run stops there
    rather than train on a silently shrunken dataset)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise OSError(f"could not decode the image {path}: {error}") from error


def read_encoded(path: Path) -> EncodedImage:
    """The file at ``path`` undecoded, for a device to decode (``zoo.data.device``), when it is a complete JPEG in
    RGB or greyscale; any other file (a PNG named .JPEG, a CMYK JPEG, one cut short) decoded by ``open_image``."""
    data = Path(path).read_bytes()  # once: the header is parsed from these bytes
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, mode, (width, height) = image.format, image.mode, image.size
    except OSError as error:
        raise OSError(f"could not decode the image {path}: {error}") from error
    if fmt != "JPEG" or mode not in JPEG_MODES or END_OF_IMAGE not in data[-64:]:
        pixels = pil_to_tensor(open_image(path))
        return EncodedImage(str(path), pixels.shape[-2], pixels.shape[-1], pixels=pixels)
    return EncodedImage(str(path), height, width, data=torch.frombuffer(bytearray(data), dtype=torch.uint8))


def image_size(image: Image.Image | torch.Tensor | EncodedImage) -> tuple[int, int]:
    """(height, width) of a decoded or an encoded image."""
    return (image.height, image.width) if isinstance(image, EncodedImage) else tuple(get_size(image))


def make_target(image, label, boxes=(), box_labels=(), difficult: Sequence[bool] | None = None) -> Target:
    """The target of ``image``: its label, its XYXY pixel boxes on the image's canvas and the class of each box."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    target = {
        "label": label,
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image_size(image)),
        "box_labels": torch.as_tensor(box_labels, dtype=torch.int64).reshape(-1),
    }
    if difficult is not None:
        target["difficult"] = torch.as_tensor(difficult, dtype=torch.bool).reshape(-1)
    return target


def check_boxes(boxes: Sequence[Sequence[float]], canvas_size: Sequence[int], sources: Sequence[str]) -> None:
    """Refuse a box of negative width or height, or one reaching outside the (H, W) canvas; ``sources`` name each."""
    height, width = canvas_size
    for (x1, y1, x2, y2), source in zip(boxes, sources, strict=True):
        if x2 < x1 or y2 < y1:
            raise ValueError(f"{source}: box [{x1}, {y1}, {x2}, {y2}] has a negative width or height")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise ValueError(f"{source}: box [{x1}, {y1}, {x2}, {y2}] lies outside the {width}x{height} image")


def sample_indices(count: int, size: int, seed: int) -> list[int]:
    """``size`` of the indices ``0 .. count - 1`` drawn at random from ``seed`` (all of them when ``size >= count``),
    in order: a limit that spans the classes of a dataset stored class by class, the same in every process and
    run (``zoo-train --limit``, ``zoo-eval --limit``)."""
    if size >= count:
        return list(range(count))
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size].sort().values.tolist()


def collate(batch: Sequence[Sample]) -> tuple[torch.Tensor | EncodedBatch, Target]:
    """DataLoader ``collate_fn``: images [B, C, H, W] and labels stacked, the other entries kept as lists of B.

    The transforms must turn images into tensors of one size (e.g. ``v2.ToImage()`` after a resize or crop), or
    be ``DeviceTransforms``: their images form an ``EncodedBatch``, which ``.to(device)`` decodes there.
    """
    images, targets = zip(*batch, strict=True)
    labels = torch.stack([torch.as_tensor(target["label"]) for target in targets])
    per_image = {key: [target[key] for target in targets] for key in targets[0] if key != "label"}
    images = EncodedBatch(images) if isinstance(images[0], EncodedImage) else torch.stack(images)
    return images, {"label": labels, **per_image}


def per_box_entries(inputs: tuple[Any, Target]) -> tuple[torch.Tensor, ...]:
    """The target's per-box tensors beside the boxes (``box_labels``, ``difficult`` where present)."""
    return tuple(inputs[1][key] for key in PER_BOX_KEYS if key in inputs[1])


def sanitize_boxes(min_size: float = 1.0) -> v2.SanitizeBoundingBoxes:
    """``v2.SanitizeBoundingBoxes`` for this sample format: drops boxes a crop emptied, with their per-box entries."""
    return v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=per_box_entries)


class Line(NamedTuple):
    """One line of a whitespace-separated text table: where it is (``file:line``) and its fields."""

    source: str
    fields: list[str]


def read_table(path: Path, columns: int) -> Iterator[Line]:
    """The non-blank lines of ``path``, each checked to have ``columns`` fields."""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = text.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise ValueError(f"{path}:{number}: expected {columns} columns, found {len(fields)}: {text!r}")
        yield Line(f"{path}:{number}", fields)


def listed_path(folder: Path, entry: str, source: str, form: str = "<name>", suffix: str = "") -> Path:
    """``folder / (entry + suffix)`` for an ``entry`` of a list file, ``source`` its ``file:line``.

    ``form`` names the entry's parts, one per "/" (e.g. ``"<class folder>/<image>"``), and so fixes their number.
    Each part must be a plain name (``PLAIN_NAME``: no "..", no separator, so the entry is relative), and the
    path, symbolic links followed, must lie inside ``folder``; anything else is a ValueError naming ``source`` and
    the entry, so that no list file makes a reader open a file outside its dataset.
    """
    if not re.fullmatch("/".join([PLAIN_NAME] * (form.count("/") + 1)), entry):
        raise ValueError(f"{source}: refused {entry!r}: expected {form}, each part a name of {PLAIN_NAME_RULE}")
    path = folder / f"{entry}{suffix}"
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{source}: refused {entry!r}: {path} leads outside {folder} through a symbolic link")
    return path


def parse(source: str, text: str, kind: Callable[[str], Any]) -> Any:
    """``kind(text)``, or a ValueError naming ``source`` (a ``file:line`` or an XML element)."""
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {text!r} is not a valid {kind.__name__}") from None


class ImageDataset(Dataset, ABC):
    """Base of every reader: checks the split and applies ``transforms`` jointly to the image and its target.

    A subclass sets ``splits``, ``layout`` (the expected files, for error messages) and ``classes``, and
    implements ``__len__`` and ``load`` (the untransformed sample). A reader of image files (``image_files``) opens
    them with ``read_image``; ``defer_decoding()`` makes it yield them undecoded (``read_encoded``), for
    ``zoo.data.device.DeviceTransforms``.
    """

    splits: tuple[str, ...] = ("train", "test")
    layout: str
    classes: Sequence[str]
    downloadable = False
    image_files = False

    def __init__(self, split: str, transforms: Callable | None = None):
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r} for {type(self).__name__}: expected one of {self.splits}")
        self.split = split
        self.transforms = transforms
        self.encoded = False

    def read_image(self, path: Path) -> Image.Image | EncodedImage:
        """The image file at ``path``: decoded (``open_image``), or undecoded after ``defer_decoding()``."""
        return read_encoded(path) if self.encoded else open_image(path)

    def defer_decoding(self, deferred: bool = True) -> None:
        """Yield image files undecoded from now on (decoded again with ``deferred=False``); a reader that does not
        read files refuses (ValueError)."""
        if deferred and not self.image_files:
            raise ValueError(f"{type(self).__name__} does not read image files: it cannot leave decoding to the "
                             "device (decode in the workers)")
        self.encoded = deferred

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> Sample:
        """The sample before ``transforms``."""

    def __getitem__(self, index: int) -> Sample:
        image, target = self.load(index)
        return (image, target) if self.transforms is None else self.transforms(image, target)

    def require(self, path: Path, listed_at: str = "") -> Path:
        """``path`` if it exists, else a FileNotFoundError naming it (and the line that listed it) and the layout."""
        if not path.exists():
            where = f" (listed at {listed_at})" if listed_at else ""
            raise FileNotFoundError(f"{path} not found{where}; {type(self).__name__} expects {self.layout}")
        return path


def check_indices(data: ImageDataset, indices: Sequence[int]) -> Sequence[int]:
    """``indices``, unless empty or outside the samples of ``data``: then a ValueError naming them."""
    if not indices or not all(0 <= index < len(data) for index in indices):
        raise ValueError(f"indices must be 1 or more of the {len(data)} samples of {type(data).__name__} "
                         f"{data.split}, got {list(indices)[:8]}")
    return indices


def box_share(data: ImageDataset, indices: Sequence[int] | None = None) -> float:
    """The mean share of the image that its box covers, over the samples ``indices`` of ``data`` (all by default;
    an evaluation's own, e.g. ``sample_indices`` for a limited one), each holding one box (as CUB's and the
    single-object canvases'): the rate at which a point drawn uniformly at random falls into the box, i.e. the
    chance level of the standard pointing game (thesis eq. 1.21)."""
    shares = []
    for index in check_indices(data, range(len(data)) if indices is None else indices):
        boxes = data.load(index)[1]["boxes"]
        if len(boxes) != 1:
            raise ValueError(f"sample {index} has {len(boxes)} boxes: a box share needs exactly one per image")
        (x1, y1, x2, y2), (height, width) = boxes[0].tolist(), boxes.canvas_size
        shares.append((x2 - x1) * (y2 - y1) / (width * height))
    return sum(shares) / len(shares)
