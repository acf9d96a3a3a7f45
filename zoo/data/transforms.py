"""Preprocessing from a timm data config, as torchvision v2 transforms so boxes follow the image.

``config`` is what ``timm.data.resolve_data_config`` gives (``input_size``, ``interpolation``, ``crop_pct``,
``mean``, ``std``). Grey images (Fashion-MNIST) become RGB.

Boxes in the evaluation preprocessing: the centre crop clips every box to the crop, explicitly
(``v2.ClampBoundingBoxes("hard")`` after it: since torchvision 0.23 a crop clamps only boxes whose own
``clamping_mode`` asks for it, "soft" by default, and a target built elsewhere may carry ``clamping_mode=None``).
No box is dropped: one wholly outside the crop comes out with zero area (``x1 == x2`` or ``y1 == y2``), in its
place beside its ``box_labels`` (and VOC's ``difficult``), so that the harness sees and counts it. Training code
that wants such boxes gone adds ``sanitize_boxes()``.
"""

import torch
from torchvision.transforms import v2

__all__ = ["AUGMENTATIONS", "CONFIG_KEYS", "eval_transform", "train_transform"]

AUGMENTATIONS = ("imagenet", "cifar", "none")
CONFIG_KEYS = ("input_size", "interpolation", "crop_pct", "mean", "std")  # the data config's fields read here


def _interpolation(config: dict) -> v2.InterpolationMode:
    return v2.InterpolationMode(config.get("interpolation", "bilinear"))


def _to_normalised_tensor(config: dict) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(config["mean"], config["std"])]


def eval_transform(config: dict) -> v2.Compose:
    """timm's evaluation preprocessing: resize to size / crop_pct, centre crop (boxes clipped to it), normalise."""
    size = config["input_size"][-2:]
    return v2.Compose([
        v2.ToImage(), v2.RGB(), v2.Resize(int(size[0] / config["crop_pct"]), interpolation=_interpolation(config)),
        v2.CenterCrop(size), v2.ClampBoundingBoxes("hard"), *_to_normalised_tensor(config),
    ])


def train_transform(config: dict, augmentation: str) -> v2.Compose:
    """Training preprocessing at the config's input size.

    ``imagenet``: random-resized crop (scale 0.08-1) and horizontal flip, as torchvision's ImageNet recipe;
    ``cifar``: 4-pixel zero padding, random crop and flip, the standard CIFAR augmentation; ``none``: the
    evaluation preprocessing.
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}: expected one of {', '.join(AUGMENTATIONS)}")
    if augmentation == "none":
        return eval_transform(config)
    size = config["input_size"][-2:]
    if augmentation == "imagenet":
        crop = [v2.RandomResizedCrop(size, interpolation=_interpolation(config))]
    else:
        crop = [v2.Resize(size, interpolation=_interpolation(config)), v2.RandomCrop(size, padding=4)]
    return v2.Compose([v2.ToImage(), v2.RGB(), *crop, v2.RandomHorizontalFlip(), *_to_normalised_tensor(config)])
