"""``build_dataset``: every reader by name; ``dataset_images``: some of a reader's images, ready for a model."""

from collections.abc import Sequence

import torch

from .base import ImageDataset, Target, check_indices
from .canvas import FashionCanvas, FashionCanvasMulti
from .classification import CIFAR100, FashionMNIST, FashionMNISTIdx, ImageFolderDataset
from .cub import CUB200
from .transforms import eval_transform
from .voc import VOC2012

DATASETS: dict[str, type[ImageDataset]] = {
    "imagenet-folder": ImageFolderDataset,
    "cub": CUB200,
    "voc": VOC2012,
    "cifar100": CIFAR100,
    "fashion-mnist": FashionMNIST,
    "fashion-mnist-idx": FashionMNISTIdx,
    "fashion-canvas": FashionCanvas,
    "fashion-canvas-multi": FashionCanvasMulti,
}


def build_dataset(name: str, root, split: str, transforms=None, download: bool = False, **options) -> ImageDataset:
    """The reader ``name`` of ``DATASETS`` on ``root``; ``options`` go to it (e.g. VOC's ``difficult="drop"``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: known names are {', '.join(DATASETS)}")
    reader = DATASETS[name]
    if download:
        if not reader.downloadable:
            downloadable = [known for known, other in DATASETS.items() if other.downloadable]
            raise ValueError(f"{name!r} cannot be downloaded (only {', '.join(downloadable)} can)")
        options["download"] = True
    return reader(root, split, transforms, **options)


def dataset_images(name: str, root, config: dict, indices: Sequence[int], split: str = "test",
                   **options) -> tuple[torch.Tensor, list[Target]]:
    """The images ``indices`` of ``split`` of the dataset ``name`` (``range(n)``: the first n; ``sample_indices``:
    those a limited evaluation draws), preprocessed for evaluation with the timm data ``config``
    (``transforms.eval_transform``; a checkpoint's is its ``pretrained_cfg``) and stacked [len(indices), C, H, W],
    and their targets; ``options`` go to the reader."""
    data = build_dataset(name, root, split, eval_transform(config), **options)
    samples = [data[index] for index in check_indices(data, indices)]
    return torch.stack([image for image, _ in samples]), [target for _, target in samples]
