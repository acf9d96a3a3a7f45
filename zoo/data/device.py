"""Decoding and augmenting JPEG files on the device that consumes them (nvJPEG on a GPU).

The DataLoader's workers then only read each file and draw its sample's random parameters; the main process
decodes the whole batch at once and crops, flips and normalises it there. A reader after ``defer_decoding()``
yields ``EncodedImage``s (``base.read_encoded``). ``DeviceTransforms`` wraps the torchvision v2 ``Compose`` that
the CPU path runs (``transforms.train_transform`` or ``eval_transform``): in the worker, it draws the random
parameters from the global random state exactly as that ``Compose`` draws them, so that the same (seed, epoch,
index) gives the same crop and flip on both paths, and it moves the target's boxes as the ``Compose`` does.
``collate`` gathers the images into an ``EncodedBatch``, which ``.to(device)`` decodes and transforms: Accelerate's
prepared DataLoaders and the harness call ``.to(device)`` on every batch, so the training and evaluation loops are
the same on both paths.

A file that is not a complete JPEG in RGB or greyscale (a PNG named .JPEG, a CMYK JPEG, one cut short) is decoded
in the worker as the CPU path decodes it (``open_image``: a file that fails to decode stops the run with an OSError
naming it); a JPEG that the device's decoder refuses is an OSError naming its file.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["DECODERS", "DeviceTransforms", "EncodedBatch", "EncodedImage", "decoding_transforms"]

DECODERS = ("auto", "workers", "device")  # where images are decoded: see decoding_transforms
Operation = tuple[str, dict]  # a torchvision.transforms.v2.functional function's name and its arguments


@dataclass
class EncodedImage:
    """One sample's image before decoding: the JPEG file's bytes (``pixels is None``), or, for a file the device
    does not decode, its RGB pixels decoded in the worker; then the geometric operations to apply to it."""

    path: str
    height: int
    width: int
    data: torch.Tensor | None = None  # uint8 [n]: the file
    pixels: torch.Tensor | None = None  # uint8 [3, H, W]
    operations: list[Operation] = field(default_factory=list)  # set by DeviceTransforms
    normalize: tuple[list[float], list[float]] = ([], [])  # mean and std, set by DeviceTransforms


class DeviceTransforms:
    """The ``Compose`` of the CPU path, split: ``__call__`` (in the worker) draws the random parameters and moves
    the boxes; ``EncodedBatch.to`` applies the same operations to the decoded pixels.

    Supported steps: ``ToImage``, ``RGB``, ``Resize``, ``CenterCrop``, ``RandomResizedCrop``,
    ``RandomHorizontalFlip``, ``ClampBoundingBoxes``, then ``ToDtype(float32, scale=True)`` and ``Normalize`` last.
    """

    GEOMETRIC = (v2.Resize, v2.CenterCrop, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ClampBoundingBoxes)

    def __init__(self, compose: v2.Compose):
        steps = list(compose.transforms)
        if len(steps) < 2 or not isinstance(steps[-2], v2.ToDtype) or not isinstance(steps[-1], v2.Normalize):
            raise ValueError("decoding on the device needs a Compose that ends in ToDtype(float32, scale=True) and "
                             f"Normalize, got {compose}")
        to_dtype, normalize = steps[-2:]
        if to_dtype.dtype != torch.float32 or not to_dtype.scale:
            raise ValueError(f"decoding on the device needs ToDtype(torch.float32, scale=True), got {to_dtype}")
        for step in steps[:-2]:
            if not isinstance(step, (v2.ToImage, v2.RGB, *self.GEOMETRIC)):
                raise ValueError(f"{type(step).__name__} cannot run on the device (supported: ToImage, RGB, "
                                 f"{', '.join(kind.__name__ for kind in self.GEOMETRIC)}); decode in the workers")
        self.steps = [step for step in steps[:-2] if isinstance(step, self.GEOMETRIC)]
        self.mean, self.std = list(normalize.mean), list(normalize.std)

    def __call__(self, image: EncodedImage, target: dict) -> tuple[EncodedImage, dict]:
        boxes, operations = target["boxes"], []
        for step in self.steps:
            if isinstance(step, v2.RandomHorizontalFlip):
                if torch.rand(1) >= step.p:  # as v2's random transforms draw it
                    continue
                name, options = "horizontal_flip", {}
            elif isinstance(step, v2.RandomResizedCrop):  # the boxes' canvas is the image's current size
                name, options = "resized_crop", dict(step.make_params([boxes]), size=step.size,
                                                     interpolation=step.interpolation, antialias=step.antialias)
            elif isinstance(step, v2.Resize):
                name, options = "resize", dict(size=step.size, interpolation=step.interpolation,
                                               max_size=step.max_size, antialias=step.antialias)
            elif isinstance(step, v2.CenterCrop):
                name, options = "center_crop", dict(output_size=step.size)
            else:
                boxes = F.clamp_bounding_boxes(boxes, clamping_mode=step.clamping_mode)
                continue
            boxes = getattr(F, name)(boxes, **options)
            operations.append((name, options))
        image.operations, image.normalize = operations, (self.mean, self.std)
        return image, {**target, "boxes": boxes}


@dataclass
class EncodedBatch:
    """A batch of ``EncodedImage``s; ``to(device)`` decodes it there and returns the float images [B, 3, H, W]."""

    images: Sequence[EncodedImage]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        decoded = iter(decode_files(self.images, device))
        pixels = [next(decoded) if image.pixels is None else image.pixels.to(device, non_blocking=non_blocking)
                  for image in self.images]
        images = [transformed(tensor, image.operations) for tensor, image in zip(pixels, self.images, strict=True)]
        mean, std = self.images[0].normalize
        return F.normalize(F.to_dtype(torch.stack(images), torch.float32, scale=True), mean, std)

    def __len__(self) -> int:
        return len(self.images)


def transformed(pixels: torch.Tensor, operations: Sequence[Operation]) -> torch.Tensor:
    """``pixels`` after each of ``operations`` (``torchvision.transforms.v2.functional``), in order."""
    for name, options in operations:
        pixels = getattr(F, name)(pixels, **options)
    return pixels


@cache
def jpeg_decoder(library: str | None = None) -> Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]:
    """A batched JPEG decoder to RGB uint8 [3, H, W] images: TorchCodec's (``pip install torchcodec``) where it
    loads, else torchvision's (deprecated since torchvision 0.29 in favour of TorchCodec's); ``library`` picks one.
    Both give libjpeg-turbo's pixels on a CPU and nvJPEG's, decoding the whole list in one call, on a GPU."""
    if library in (None, "torchcodec"):
        try:
            from torchcodec.decoders import decode_jpeg

            return partial(decode_jpeg, mode="RGB")
        except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch
            if library == "torchcodec":
                raise
    from torchvision.io import ImageReadMode, decode_jpeg

    return partial(decode_jpeg, mode=ImageReadMode.RGB)


def decode_files(images: Sequence[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    """The pixels of the images that hold a JPEG file, decoded together on ``device`` (``jpeg_decoder``); a file
    the decoder refuses is an OSError naming it."""
    files = [image for image in images if image.pixels is None]
    if not files:
        return []
    decoder = jpeg_decoder()
    try:
        return decoder([image.data for image in files], device=device)
    except RuntimeError:
        for image in files:  # one at a time, to name the file
            try:
                decoder([image.data], device=device)
            except RuntimeError as error:
                raise OSError(f"could not decode the image {image.path} on {device}: {error}") from error
        raise


def decoding_transforms(decode: str, dataset, transforms: v2.Compose,
                        device: torch.device) -> v2.Compose | DeviceTransforms:
    """``transforms`` for ``dataset``, decoded where ``decode`` says: "workers" (the DataLoader's processes, on the
    CPU), "device" (``DeviceTransforms``, the dataset told to ``defer_decoding()``: decoded as each batch moves to
    ``device``) or "auto" (device on a GPU when the dataset reads image files and the transforms can run there,
    else workers). "device" where it cannot be is a ValueError saying why."""
    if decode not in DECODERS:
        raise ValueError(f"decode {decode!r} is not one of {', '.join(DECODERS)}")
    if decode == "device" or (decode == "auto" and device.type == "cuda"):
        try:
            on_device = DeviceTransforms(transforms)
            dataset.defer_decoding()
            return on_device
        except ValueError as error:
            if decode == "device":
                raise ValueError(f"decode: device is impossible here: {error}") from None
    if hasattr(dataset, "defer_decoding"):
        dataset.defer_decoding(False)
    return transforms
